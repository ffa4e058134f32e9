"""Convolution, transposed convolution and max pooling, each a Function.

Every stage of Mask R-CNN is built from these: the ResNet backbone and the FPN (Sec. 3,
"Network Architecture") are stacks of 3x3 and 1x1 convolutions with a 3x3 max-pool in the
stem, FPN's extra level P6 is a 1x1 max-pool with stride 2, and the mask head (Fig. 4) ends
with a 2x2 stride-2 transposed convolution ("deconv") that upsamples 14x14 RoI features to
28x28 before the per-class mask logits.

Layouts follow PyTorch: x is (N, C, H, W); a conv weight is (O, C, kh, kw); a transposed-conv
weight is (C_in, C_out, kh, kw).  With stride s, padding p and dilation d the output size is

    H_out = floor((H + 2p - d (kh - 1) - 1) / s) + 1             (conv2d, max_pool2d with d = 1)
    H_out = (H - 1) s - 2p + kh                                    (conv_transpose2d)

How conv2d is computed: im2col + one GEMM
-----------------------------------------
    y[n, o, u, v] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, s u + d i, s v + d j]

Gather every input patch into a column ("im2col"):  cols[(c, i, j), (n, u, v)] =
xpad[n, c, s u + d i, s v + d j], a (C kh kw, N H_out W_out) matrix.  The whole convolution
is then ONE matrix product, which BLAS (CPU) or cuBLAS (GPU) runs near peak speed:

    forward     Y   = W2 @ cols                 W2 = w as an (O, C kh kw) matrix
    backward    gW2 = gY @ cols^T               (the gradient of a product, as in MatMul)
                gcols = W2^T @ gY,  then col2im: each column entry is added back to the
                input pixel it was copied from (gx = sum of the kh*kw shifted slices)

im2col here is kh*kw strided slice copies (no per-element Python loop), and col2im the same
kh*kw slices added back (overlapping windows add up, exactly as the chain rule wants); both
are plain slicing, so they run unchanged on CuPy.  Columns are laid out channel-major
(C kh kw, N H_out W_out) so that all N images share one big GEMM instead of N small ones.
The columns are NOT kept for backward: they are kh*kw times the size of the input (about
1.2 GB for the FPN's 3x3 conv on P2 at 800x1333, batch 2), so backward rebuilds them from
x, as Caffe does; that costs about 7% of a forward+backward.

The other way: shift-and-GEMM (``Conv2dFn(method="shift")``)
--------------------------------------------------------------
The sum over (i, j) can be taken outside: for each of the kh*kw kernel offsets, take the
input shifted by that offset (one strided slice, copied contiguous) and multiply it by the
(O, C) matrix w[:, :, i, j]; accumulate the kh*kw products.  It never holds the whole column
matrix (kh*kw times less memory), but does kh*kw GEMMs with a short inner dimension C instead
of one with C kh kw, and adds into the output kh*kw times.  Measured forward+backward, float32,
on this project's 2-core AMD EPYC with 2 OpenBLAS threads (medians; torch 2 threads):

    shape (N, C, HxW -> O, k, stride)     im2col     shift     torch CPU
    8, 64, 32x32 -> 64, 3x3               ~20 ms     ~25 ms     ~21 ms
    2, 256, 64x64 -> 256, 3x3             ~200 ms    ~240 ms    ~185 ms
    2, 256, 64x64 -> 256, 3x3, stride 2   ~52 ms     ~70 ms     ~50 ms
    2, 256, 64x64 -> 256, 1x1             ~25 ms   (same: one offset)  ~45 ms

so im2col is the default.  A 1x1 stride-1 unpadded conv needs no columns at all: it is a
plain matrix product per image (``_conv1x1``).  ``minimask bench ops`` prints these numbers
for your machine.

max_pool2d takes the maximum over each window with -inf padding; its gradient goes to the
arg-max only (the first one in row-major window order on ties, as PyTorch).
"""

import numpy as np

from ..backend import get_array_module
from ..tensor import Function


# ---- argument checks ----------------------------------------------------------------------
def _pair(v, name, minimum):
    """(a, b) from an int or a pair of ints, each >= minimum; a clear error otherwise."""
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(pair) != 2 or not all(isinstance(a, (int, np.integer)) for a in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(pair[0]), int(pair[1])


def _out_size(size, k, s, p, d, op):
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise ValueError(f"{op}: input size {size} with padding {p} is smaller than the "
                         f"kernel's extent {d * (k - 1) + 1}: the output would be empty")
    return out


def _check_4d(x, name, op):
    if x.ndim != 4:
        raise ValueError(f"{op}: {name} must be 4-D, got shape {tuple(x.shape)}")


def _check_same_dtype(op, **arrays):
    dtypes = {k: a.dtype for k, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{op}: inputs must share one float dtype, got " +
                        ", ".join(f"{k} {v}" for k, v in dtypes.items()))


# ---- im2col / col2im: the gather and its adjoint (the scatter) ----------------------------
def _window_slices(k, s, d, out):
    """For each kernel offset i, the slice of the padded input that offset i reads."""
    return [slice(i * d, i * d + s * (out - 1) + 1, s) for i in range(k)]


def _padded_channel_major(x, padding):
    """x as a zero-padded (C, N, Hp, Wp) array: the layout both methods slice from."""
    xp = get_array_module(x)
    (ph, pw), (n, c, h, w) = padding, x.shape
    xt = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    xt[:, :, ph:ph + h, pw:pw + w] = x.transpose(1, 0, 2, 3)
    return xt


def im2col(x, kernel, stride, padding, dilation):
    """Columns (C kh kw, N Ho Wo) of a (N, C, H, W) array, and (Ho, Wo).

    Copies x channel-major into a zero-padded (C, N, Hp, Wp) buffer once, then one strided
    slice copy per kernel offset (i, j) fills the rows (c, i, j) for every channel c.
    """
    xp = get_array_module(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, w = x.shape
    ho = _out_size(h, kh, sh, ph, dh, "conv2d")
    wo = _out_size(w, kw, sw, pw, dw, "conv2d")
    xt = _padded_channel_major(x, padding)
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    rows, columns = _window_slices(kh, sh, dh, ho), _window_slices(kw, sw, dw, wo)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xt[:, :, rows[i], columns[j]]
    return cols.reshape(c * kh * kw, n * ho * wo), (ho, wo)


def col2im(cols, x_shape, kernel, stride, padding, dilation):
    """The adjoint of im2col: add each column entry back onto the pixel it came from.

    Returns a (N, C, H, W) array.  Overlapping windows read a pixel several times, so its
    gradient is the sum over those reads: one slice addition per kernel offset.
    """
    xp = get_array_module(cols)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, w = x_shape
    ho = _out_size(h, kh, sh, ph, dh, "conv2d")
    wo = _out_size(w, kw, sw, pw, dw, "conv2d")
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    gx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    gt = gx.transpose(1, 0, 2, 3)  # a view in the columns' channel-major order
    rows, columns = _window_slices(kh, sh, dh, ho), _window_slices(kw, sw, dw, wo)
    for i in range(kh):
        for j in range(kw):
            gt[:, :, rows[i], columns[j]] += cols[:, i, j]
    return xp.ascontiguousarray(gx[:, :, ph:ph + h, pw:pw + w])


def _to_nchw(y2, n, ho, wo):
    """(O, N Ho Wo) matrix -> contiguous (N, O, Ho, Wo) array."""
    o = y2.shape[0]
    return get_array_module(y2).ascontiguousarray(y2.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))


def _to_matrix(y):
    """(N, O, Ho, Wo) array -> contiguous (O, N Ho Wo) matrix (the GEMM layout)."""
    n, o, ho, wo = y.shape
    return get_array_module(y).ascontiguousarray(y.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)


# ---- conv2d --------------------------------------------------------------------------------
class Conv2dFn(Function):
    """y = conv(x, w) + b, cross-correlation as in PyTorch (see the module docstring).

    forward:   Y = W2 @ im2col(x) (+ b)
    backward:  gx = col2im(W2^T @ gY),  gw = gY @ im2col(x)^T,  gb = sum of gY over n, u, v

    ``method`` is "im2col" (default) or "shift" (one GEMM per kernel offset); both give the
    same numbers and are kept side by side to compare (the module docstring has timings).
    """

    def __init__(self, stride=1, padding=0, dilation=1, method="im2col"):
        self.stride = _pair(stride, "conv2d: stride", 1)
        self.padding = _pair(padding, "conv2d: padding", 0)
        self.dilation = _pair(dilation, "conv2d: dilation", 1)
        if method not in ("im2col", "shift"):
            raise ValueError(f"conv2d: method must be 'im2col' or 'shift', got {method!r}")
        self.method = method

    def _check(self, x, w, b):
        _check_4d(x, "x", "conv2d")
        _check_4d(w, "w (out, in, kh, kw)", "conv2d")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"conv2d: x has {x.shape[1]} channels but w expects {w.shape[1]} "
                             f"(w is (out, in, kh, kw) = {tuple(w.shape)})")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"conv2d: bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        _check_same_dtype("conv2d", x=x, w=w, b=b)

    def _is_1x1(self, w):
        return (w.shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0))

    def forward(self, x, w, b=None):
        self._check(x, w, b)
        self.x, self.w, self.has_bias = x, w, b is not None
        n, o = x.shape[0], w.shape[0]
        if self._is_1x1(w):
            y = _conv1x1(x, w)
        elif self.method == "shift":
            y = _shift_forward(x, w, self.stride, self.padding, self.dilation)
        else:
            cols, (ho, wo) = im2col(x, w.shape[2:], self.stride, self.padding, self.dilation)
            y = _to_nchw(w.reshape(o, -1) @ cols, n, ho, wo)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def backward(self, gy):
        x, w = self.x, self.w
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        if self._is_1x1(w):
            gx, gw = _conv1x1_backward(x, w, gy, need_x, need_w)
        elif self.method == "shift":
            gx, gw = _shift_backward(x, w, gy, self.stride, self.padding, self.dilation, need_x, need_w)
        else:
            g2 = _to_matrix(gy)
            w2 = w.reshape(w.shape[0], -1)
            gx = gw = None
            if need_w:  # rebuild the columns rather than keeping them from forward (memory)
                cols, _ = im2col(x, w.shape[2:], self.stride, self.padding, self.dilation)
                gw = (g2 @ cols.T).reshape(w.shape)
            if need_x:
                gx = col2im(w2.T @ g2, x.shape, w.shape[2:], self.stride, self.padding, self.dilation)
        if not self.has_bias:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb


def _conv1x1(x, w):
    """A 1x1 conv is a matrix product per image: (O, C) @ (C, H W), no columns needed."""
    n, c, h, wd = x.shape
    y = w.reshape(w.shape[0], c) @ x.reshape(n, c, h * wd)
    return y.reshape(n, w.shape[0], h, wd)


def _conv1x1_backward(x, w, gy, need_x, need_w):
    n, c, h, wd = x.shape
    o = w.shape[0]
    g3 = gy.reshape(n, o, h * wd)
    gx = gw = None
    if need_x:
        gx = (w.reshape(o, c).T @ g3).reshape(x.shape)
    if need_w:  # sum over images of gY_n @ x_n^T
        gw = (g3 @ x.reshape(n, c, h * wd).transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    return gx, gw


def _shift_forward(x, w, stride, padding, dilation):
    """Y = sum over offsets (i, j) of w[:, :, i, j] @ (x shifted by (i, j)): kh*kw GEMMs."""
    xp = get_array_module(x)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0], "conv2d")
    wo = _out_size(wd, kw, stride[1], padding[1], dilation[1], "conv2d")
    xt = _padded_channel_major(x, padding)
    rows, columns = _window_slices(kh, stride[0], dilation[0], ho), _window_slices(kw, stride[1], dilation[1], wo)
    y2 = xp.zeros((o, n * ho * wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            shifted = xp.ascontiguousarray(xt[:, :, rows[i], columns[j]]).reshape(c, -1)
            y2 += w[:, :, i, j] @ shifted
    return _to_nchw(y2, n, ho, wo)


def _shift_backward(x, w, gy, stride, padding, dilation, need_x, need_w):
    xp = get_array_module(x)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = gy.shape[2:]
    (ph, pw) = padding
    xt = _padded_channel_major(x, padding)
    g2 = _to_matrix(gy)
    rows, columns = _window_slices(kh, stride[0], dilation[0], ho), _window_slices(kw, stride[1], dilation[1], wo)
    gw = xp.empty_like(w) if need_w else None
    gxt = xp.zeros_like(xt) if need_x else None
    for i in range(kh):
        for j in range(kw):
            if need_w:
                shifted = xp.ascontiguousarray(xt[:, :, rows[i], columns[j]]).reshape(c, -1)
                gw[:, :, i, j] = g2 @ shifted.T
            if need_x:
                gxt[:, :, rows[i], columns[j]] += (w[:, :, i, j].T @ g2).reshape(c, n, ho, wo)
    gx = None
    if need_x:
        gx = xp.ascontiguousarray(gxt[:, :, ph:ph + h, pw:pw + wd].transpose(1, 0, 2, 3))
    return gx, gw


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation) of x (N, C, H, W) with w (O, C, kh, kw), plus b (O,)."""
    fn = Conv2dFn(stride, padding, dilation)
    return fn(x, w) if b is None else fn(x, w, b)


# ---- conv_transpose2d ----------------------------------------------------------------------
class ConvTranspose2dFn(Function):
    """The transpose (adjoint) of conv2d with respect to its input: the mask head's deconv.

    A conv with weight w (C_in, C_out, kh, kw) read as (O=C_in, C=C_out, kh, kw) maps an
    (N, C_out, H_out, W_out) image to (N, C_in, H, W).  Its adjoint goes the other way, and it
    is exactly conv2d's input-gradient computation, so the three steps swap roles:

    forward:   y  = col2im(W2^T @ X) (+ b)      X = x as a (C_in, N H W) matrix
    backward:  gx = conv2d(gy, w)               (conv2d's forward)
               gw = X @ im2col(gy)^T            (conv2d's weight gradient with x, gy swapped)
               gb = sum of gy over n, u, v

    Each input pixel spreads a kh x kw patch of w over the output, s pixels apart; where
    patches overlap (k > s) they add up.  With k = s = 2 (the mask head) they tile exactly.
    """

    def __init__(self, stride=1, padding=0):
        self.stride = _pair(stride, "conv_transpose2d: stride", 1)
        self.padding = _pair(padding, "conv_transpose2d: padding", 0)

    def forward(self, x, w, b=None):
        _check_4d(x, "x", "conv_transpose2d")
        _check_4d(w, "w (in, out, kh, kw)", "conv_transpose2d")
        if x.shape[1] != w.shape[0]:
            raise ValueError(f"conv_transpose2d: x has {x.shape[1]} channels but w expects {w.shape[0]} "
                             f"(w is (in, out, kh, kw) = {tuple(w.shape)})")
        if b is not None and tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"conv_transpose2d: bias must have shape ({w.shape[1]},), got {tuple(b.shape)}")
        _check_same_dtype("conv_transpose2d", x=x, w=w, b=b)
        n, cin, h, wd = x.shape
        _, cout, kh, kw = w.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        ho, wo = (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw
        if ho < 1 or wo < 1:
            raise ValueError(f"conv_transpose2d: padding {self.padding} is too large for input "
                             f"{h}x{wd} and kernel {kh}x{kw}: the output would be {ho}x{wo}")
        self.x, self.w, self.has_bias = x, w, b is not None
        self.out_shape = (n, cout, ho, wo)
        cols = w.reshape(cin, -1).T @ _to_matrix(x)  # (C_out kh kw, N H W)
        y = col2im(cols, self.out_shape, (kh, kw), self.stride, self.padding, (1, 1))
        if b is not None:
            y += b.reshape(1, cout, 1, 1)
        return y

    def backward(self, gy):
        x, w = self.x, self.w
        gx = gw = None
        if self.needs_input_grad[0]:
            cols, (h, wd) = im2col(gy, w.shape[2:], self.stride, self.padding, (1, 1))
            gx = _to_nchw(w.reshape(w.shape[0], -1) @ cols, x.shape[0], h, wd)
        if self.needs_input_grad[1]:
            cols, _ = im2col(gy, w.shape[2:], self.stride, self.padding, (1, 1))
            gw = (_to_matrix(x) @ cols.T).reshape(w.shape)
        if not self.has_bias:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb


def conv_transpose2d(x, w, b=None, stride=1, padding=0):
    """Transposed convolution of x (N, C_in, H, W) with w (C_in, C_out, kh, kw), plus b (C_out,)."""
    fn = ConvTranspose2dFn(stride, padding)
    return fn(x, w) if b is None else fn(x, w, b)


# ---- max_pool2d ----------------------------------------------------------------------------
class MaxPool2dFn(Function):
    """y[n, c, u, v] = max over the window of xpad (padding is -inf, so it never wins).

    forward:   a running maximum over the kh*kw shifted slices, remembering which offset won
               (only a strictly greater value replaces the current one, so on ties the first
               offset in row-major order wins, as in PyTorch)
    backward:  the max is locally y = x[argmax], so gx[argmax] += gy; everything else gets 0.
               Overlapping windows (stride < kernel) can pick the same pixel: those add up.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel = _pair(kernel_size, "max_pool2d: kernel_size", 1)
        self.stride = self.kernel if stride is None else _pair(stride, "max_pool2d: stride", 1)
        self.padding = _pair(padding, "max_pool2d: padding", 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            # else a window could lie wholly in the padding and its max would be -inf
            raise ValueError(f"max_pool2d: padding {self.padding} must be at most half the "
                             f"kernel size {self.kernel}")

    def forward(self, x):
        _check_4d(x, "x", "max_pool2d")
        xp = get_array_module(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        ho = _out_size(h, kh, sh, ph, 1, "max_pool2d")
        wo = _out_size(w, kw, sw, pw, 1, "max_pool2d")
        xpad = xp.full((n, c, h + 2 * ph, w + 2 * pw), -xp.inf, dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
        rows, columns = _window_slices(kh, sh, 1, ho), _window_slices(kw, sw, 1, wo)
        y = xpad[:, :, rows[0], columns[0]].copy()
        arg = xp.zeros(y.shape, dtype=np.int32)  # the winning offset i * kw + j
        for i in range(kh):
            for j in range(kw):
                if i == 0 and j == 0:
                    continue
                v = xpad[:, :, rows[i], columns[j]]
                better = v > y
                y = xp.where(better, v, y)
                arg = xp.where(better, np.int32(i * kw + j), arg)
        self.arg, self.x_shape = arg, x.shape
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        n, c, h, w = self.x_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        ho, wo = gy.shape[2:]
        gx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=gy.dtype)
        rows, columns = _window_slices(kh, sh, 1, ho), _window_slices(kw, sw, 1, wo)
        zero = xp.zeros((), dtype=gy.dtype)
        for i in range(kh):
            for j in range(kw):
                gx[:, :, rows[i], columns[j]] += xp.where(self.arg == i * kw + j, gy, zero)
        return xp.ascontiguousarray(gx[:, :, ph:ph + h, pw:pw + w])


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling over kernel_size windows of x (N, C, H, W); stride defaults to kernel_size."""
    return MaxPool2dFn(kernel_size, stride, padding)(x)
