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

How conv2d is computed: im2col + GEMM
-------------------------------------
    y[n, o, u, v] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, s u + d i, s v + d j]

Gather every input patch into a column ("im2col"): cols_n[(c, i, j), (u, v)] =
xpad[n, c, s u + d i, s v + d j], a (C kh kw, H_out W_out) matrix per image.  The convolution
is then a matrix product, which BLAS (CPU) or cuBLAS (GPU) runs near peak speed:

    forward     Y_n = W2 @ cols_n                W2 = w as an (O, C kh kw) matrix
    backward    gW2 = sum_n gY_n @ cols_n^T      (the gradient of a product, as in MatMul)
                gx  = col2im(W2^T @ gY_n): each column entry is added back onto the pixel it
                      was copied from, so a pixel read by several windows sums their gradients

im2col is kh*kw strided slice copies (one per kernel offset, all channels at once; no
per-pixel Python loop) and col2im the same slices added back; both are plain slicing, so they
run unchanged on CuPy.  (On the CPU the same copies run as Numba loops, ``kernels/im2col.py``,
in one pass with the padding folded in; ``CPU_COLUMNS`` below.)  Two refinements:

- Columns are kh*kw times the size of the input (1.2 GB for FPN's 3x3 conv on P2 at
  800x1333, batch 2), so they are built a chunk at a time (a few images, or a band of output
  rows) into buffers of at most ``CHUNK_BYTES`` and never kept for backward, which rebuilds
  them (as Caffe does).  Small chunks are also faster on the CPU: the GEMM reads columns that
  are still in cache, and freed buffers are reused instead of fresh pages.
- A 1x1 stride-1 unpadded conv needs no columns: the image itself is the column matrix.

(With stride 1, gx is also a convolution: gy padded by d (k - 1) - p, convolved with w rotated
180 degrees with its channel axes swapped, a gather instead of a scatter-add.  Measured, it was
no faster than col2im here: 8% slower on the first shape below, 3% faster on the second.)

The other way: shift-and-GEMM (``Conv2dFn(method="shift")``)
--------------------------------------------------------------
The sum over (i, j) can be taken outside: for each of the kh*kw kernel offsets, take the
input shifted by that offset (one strided slice, copied contiguous) and multiply it by the
(O, C) matrix w[:, :, i, j]; accumulate the kh*kw products.  It never holds the column
matrix, but does kh*kw GEMMs with a short inner dimension C instead of one with C kh kw, and
reads and writes the output kh*kw times.

Measured forward+backward (``Conv2dFn`` through the autograd engine), float32, on this
project's 2-core AMD EPYC (AVX-512) with OpenBLAS against torch's oneDNN kernels, both on
one thread; CPU time (steadier than wall time on a shared machine), medians of 25-40 runs:

    shape (N, C, HxW -> O, kernel/stride)    im2col    shift    torch    im2col/torch
    8, 64, 32x32 -> 64, 3x3/1                 29 ms    40 ms    19 ms        1.5
    2, 256, 64x64 -> 256, 3x3/1              345 ms   385 ms   298 ms        1.16
    2, 256, 64x64 -> 256, 3x3/2               94 ms   117 ms    83 ms        1.13
    2, 256, 64x64 -> 256, 1x1/1               37 ms    42 ms    39 ms        0.95

so im2col is the default.  Before chunking (one big GEMM over all images, columns laid out
channel-major) the first two rows took 40 and 420 ms.  Of the first row's 29 ms the three
GEMMs take ~23 (torch does everything in 19) and the gathers, scatter-adds and padding ~6.
``minimask bench ops`` prints wall times for your machine and thread count.

max_pool2d takes the maximum over each window with -inf padding; its gradient goes to the
arg-max only (the first one in row-major window order on ties, as PyTorch).
"""

import contextlib

import numpy as np

from ..backend import device_of, get_array_module, is_cupy_array
from ..kernels.epilogue import bias_relu_, epilogue_reference
from ..kernels.im2col import col2im_rows_add, im2col_rows
from ..kernels.maxpool import max_pool_backward, max_pool_forward, max_pool_values
from ..kernels.winograd import tile_counts
from ..tensor import Function, Tensor, as_tensor, records
from . import winograd
from .activation import add_relu


# ---- argument checks ----------------------------------------------------------------------
def _pair(v, name, minimum):
    """(a, b) from an int or a pair of ints, each >= minimum; a clear error otherwise."""
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(a, (int, np.integer)) for a in pair):
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


# ---- geometry: which padded input pixels each output pixel reads --------------------------
class ConvGeometry:
    """Sizes of one convolution, and the input slices each kernel offset reads.

    Output pixel (u, v) with kernel offset (i, j) reads padded-input pixel
    (s u + d i, s v + d j); for a band of output rows u0 <= u < u1 and all columns v that is
    one strided slice of the padded input per (i, j).
    """

    def __init__(self, in_hw, kernel, stride, padding, dilation, op="conv2d"):
        (self.h, self.w), (self.kh, self.kw) = in_hw, kernel
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.ho = _out_size(self.h, self.kh, stride[0], padding[0], dilation[0], op)
        self.wo = _out_size(self.w, self.kw, stride[1], padding[1], dilation[1], op)
        # a 1x1, stride-1, unpadded conv reads each pixel once: its columns ARE the image
        self.pointwise = kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)

    def rows(self, i, u0, u1):
        s, d = self.stride[0], self.dilation[0]
        return slice(u0 * s + i * d, (u1 - 1) * s + i * d + 1, s)

    def cols(self, j):
        s, d = self.stride[1], self.dilation[1]
        return slice(j * d, j * d + s * (self.wo - 1) + 1, s)


def _pad(x, padding):
    """Zero-padded copy of x's last two axes (x itself when there is no padding)."""
    ph, pw = padding
    if ph == pw == 0:
        return x
    n, c, h, w = x.shape
    out = get_array_module(x).zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def _unpad(xpad, padding, h, w):
    ph, pw = padding
    return get_array_module(xpad).ascontiguousarray(xpad[:, :, ph:ph + h, pw:pw + w])


# ---- im2col / col2im: the gather and its adjoint (the scatter) ----------------------------
def _gather(xpad, g, u0, u1):
    """Columns (m, C kh kw, (u1 - u0) Wo) of padded images xpad (m, C, Hp, Wp), output rows u0:u1.

    One strided slice copy per kernel offset (i, j) fills the rows (c, i, j) for every channel c
    at once: kh*kw array operations, no per-pixel Python loop.
    """
    m, c = xpad.shape[:2]
    if g.pointwise:
        return xpad[:, :, u0:u1].reshape(m, c, (u1 - u0) * g.wo)
    cols = get_array_module(xpad).empty((m, c, g.kh, g.kw, u1 - u0, g.wo), dtype=xpad.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            cols[:, :, i, j] = xpad[:, :, g.rows(i, u0, u1), g.cols(j)]
    return cols.reshape(m, c * g.kh * g.kw, (u1 - u0) * g.wo)


def _scatter_add(gxpad, cols, g, u0, u1):
    """The adjoint of _gather: add each column entry back onto the pixel it was read from.

    A pixel read by several windows (overlap, k > s) receives the sum of their gradients,
    as the chain rule wants; slices never repeat a pixel, so plain += is exact.
    """
    m, c = gxpad.shape[:2]
    cols = cols.reshape(m, c, g.kh, g.kw, u1 - u0, g.wo)
    for i in range(g.kh):
        for j in range(g.kw):
            gxpad[:, :, g.rows(i, u0, u1), g.cols(j)] += cols[:, :, i, j]


# Columns are kh*kw times the size of the input: about 1.2 GB for FPN's 3x3 conv on P2 at
# 800x1333, batch 2.  So they are built a chunk at a time (several images, or a band of output
# rows of one image) into buffers of at most this many bytes, GEMM'd and dropped.  Besides the
# memory, small chunks are faster on the CPU: the columns are still in cache when the GEMM reads
# them, and freed buffers are reused instead of fresh pages.  On the GPU, bigger chunks keep
# the GEMMs large.
CHUNK_BYTES = {"cpu": 2 * 2**20, "gpu": 512 * 2**20}
# ... but a band of rows has at least this many output pixels (the GEMM's N), however tall
# the columns: with 2 MiB alone, FPN's 3x3 conv on 256 channels (C kh kw = 2304) got bands of
# one 272-pixel row of P2, narrow GEMMs; with at least 512 pixels the 256- and 512-channel
# 3x3 convs of r50_fpn took 10-20% less time (measured on 2 cores, AVX-512; 1024 gained no
# more).  The shapes model's bands have 896 pixels or more, so its chunks, and its bits, are
# as before.  (Whole-image chunks are one GEMM per image, so more images per chunk would not
# widen them.)
MIN_GEMM_COLUMNS = {"cpu": 512, "gpu": 0}


def column_chunks(n, g, channels, itemsize, device):
    """(n0, n1, u0, u1) blocks of images n0:n1 and output rows u0:u1 covering the output of a
    conv of geometry ``g`` over ``n`` images of ``channels`` channels, each block's columns at
    most ``CHUNK_BYTES[device]`` (``device`` "cpu" or "gpu"), except that a band of rows has
    at least ``MIN_GEMM_COLUMNS[device]`` output pixels (and a single row may exceed it).

    The conv products below build their columns in these blocks; ``minimask bench memory``
    reads them to size the largest column buffer of a step."""
    if g.pointwise:  # no column buffer at all
        yield 0, n, 0, g.ho
        return
    budget = CHUNK_BYTES[device]
    row_bytes = channels * g.kh * g.kw * g.wo * itemsize
    if g.ho * row_bytes <= budget:  # whole images, as many as fit
        step = max(1, budget // (g.ho * row_bytes))
        for n0 in range(0, n, step):
            yield n0, min(n, n0 + step), 0, g.ho
    else:  # bands of rows of one image, at least MIN_GEMM_COLUMNS pixels each
        step = max(1, budget // row_bytes, -(-MIN_GEMM_COLUMNS[device] // g.wo))
        for b in range(n):
            for u0 in range(0, g.ho, step):
                yield b, b + 1, u0, min(g.ho, u0 + step)


def im2col(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """All columns (N, C kh kw, Ho Wo) of a (N, C, H, W) array at once (for lessons and tests).

    cols[n, (c, i, j), (u, v)] = xpad[n, c, s u + d i, s v + d j]
    """
    g = ConvGeometry(x.shape[2:], kernel, stride, padding, dilation)
    return _gather(_pad(x, padding), g, 0, g.ho)


def col2im(cols, x_shape, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """The adjoint of im2col: a (N, C, H, W) array with every column entry added back."""
    g = ConvGeometry(x_shape[2:], kernel, stride, padding, dilation)
    n, c, h, w = x_shape
    gxpad = get_array_module(cols).zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]), dtype=cols.dtype)
    _scatter_add(gxpad, cols, g, 0, g.ho)
    return _unpad(gxpad, padding, h, w)


# On the CPU the columns (and max pooling) are built by the Numba loops of ``kernels/im2col.py``
# and ``kernels/maxpool.py``: one pass over the unpadded input instead of kh*kw NumPy calls and
# two padding copies; the same bits.  In a ``shapes`` training step the slice copies, scatters
# and pads took about a quarter of the time; the loops take about 40% of that.  CuPy runs
# the slice copies.  "slices" here makes the CPU use them too, to compare.
CPU_COLUMNS = "loops"


def _use_loops(x):
    return CPU_COLUMNS == "loops" and not is_cupy_array(x)


def _column_reader(x, g):
    """columns(n0, n1, u0, u1): the columns of images n0:n1 for output rows u0:u1 of x (N, C, H, W)."""
    if g.pointwise:  # the image itself, no copy
        return lambda n0, n1, u0, u1: _gather(x[n0:n1], g, u0, u1)
    if _use_loops(x):
        kernel = (g.kh, g.kw)
        return lambda n0, n1, u0, u1: im2col_rows(x[n0:n1], kernel, g.stride, g.padding, g.dilation,
                                                  u0, u1, g.wo)
    xpad = _pad(x, g.padding)
    return lambda n0, n1, u0, u1: _gather(xpad[n0:n1], g, u0, u1)


# ---- the three products of a convolution, on arrays, chunk by chunk -----------------------
def conv_forward(x, w, stride, padding, dilation):
    """y = W2 @ cols(x): the convolution itself, W2 = w as an (O, C kh kw) matrix."""
    xp = get_array_module(x)
    n, c = x.shape[:2]
    o = w.shape[0]
    g = ConvGeometry(x.shape[2:], w.shape[2:], stride, padding, dilation)
    if _shapes_only is not None:
        return _record("conv", x.shape, w.shape, stride, padding, dilation, g, (n, o, g.ho, g.wo), x.dtype)
    columns, w2 = _column_reader(x, g), w.reshape(o, -1)
    y = xp.empty((n, o, g.ho, g.wo), dtype=x.dtype)
    for n0, n1, u0, u1 in column_chunks(n, g, c, x.itemsize, device_of(x)):
        cols = columns(n0, n1, u0, u1)
        if u1 - u0 == g.ho:  # whole images: the GEMM writes straight into y
            xp.matmul(w2, cols, out=y[n0:n1].reshape(n1 - n0, o, g.ho * g.wo))
        elif n1 - n0 == 1 and xp is np:  # a band of one image's rows: (O, band pixels), a strided
            # view of y (its rows g.ho * g.wo apart) that BLAS writes directly, with no copy
            xp.matmul(w2, cols[0], out=y[n0].reshape(o, g.ho * g.wo)[:, u0 * g.wo:u1 * g.wo])
        else:
            y[n0:n1, :, u0:u1] = (w2 @ cols).reshape(n1 - n0, o, u1 - u0, g.wo)
    return y


def conv_grad_weight(x, gy, kernel, stride, padding, dilation):
    """gW2 = sum over images of gY_n @ cols(x)_n^T: the weight gradient, (O, C, kh, kw)."""
    xp = get_array_module(x)
    n, c = x.shape[:2]
    o = gy.shape[1]
    g = ConvGeometry(x.shape[2:], kernel, stride, padding, dilation)
    columns = _column_reader(x, g)
    gw_t = xp.zeros((c * g.kh * g.kw, o), dtype=x.dtype)  # transposed: the faster GEMM shape
    for n0, n1, u0, u1 in column_chunks(n, g, c, x.itemsize, device_of(x)):
        cols = columns(n0, n1, u0, u1)
        g3 = gy[n0:n1, :, u0:u1].reshape(n1 - n0, o, -1)
        for q in range(n1 - n0):
            gw_t += cols[q] @ g3[q].T
    return xp.ascontiguousarray(gw_t.T).reshape(o, c, g.kh, g.kw)


def conv_grad_input(gy, w, x_shape, stride, padding, dilation):
    """gx = col2im(W2^T @ gY): the input gradient, (N, C, H, W)."""
    xp = get_array_module(gy)
    n, c, h, wd = x_shape
    o = w.shape[0]
    g = ConvGeometry((h, wd), w.shape[2:], stride, padding, dilation)
    if _shapes_only is not None:
        return _record("deconv", x_shape, w.shape, stride, padding, dilation, g, x_shape, gy.dtype)
    if g.pointwise:  # nothing to scatter: every pixel was read exactly once
        return (w.reshape(o, c).T @ gy.reshape(n, o, h * wd)).reshape(x_shape)
    w2_t = w.reshape(o, -1).T
    chunks = column_chunks(n, g, c, gy.itemsize, device_of(gy))
    if _use_loops(gy):  # add straight into gx: no padded copy to cut down afterwards
        gx = np.zeros(x_shape, dtype=gy.dtype)
        for n0, n1, u0, u1 in chunks:
            g3 = gy[n0:n1, :, u0:u1].reshape(n1 - n0, o, -1)
            col2im_rows_add(gx[n0:n1], w2_t @ g3, w.shape[2:], stride, padding, dilation, u0, u1, g.wo)
        return gx
    gxpad = xp.zeros((n, c, h + 2 * padding[0], wd + 2 * padding[1]), dtype=gy.dtype)
    for n0, n1, u0, u1 in chunks:
        g3 = gy[n0:n1, :, u0:u1].reshape(n1 - n0, o, -1)
        _scatter_add(gxpad[n0:n1], w2_t @ g3, g, u0, u1)
    return _unpad(gxpad, padding, h, wd)


# ---- shape-only runs: what ``minimask bench memory`` measures ------------------------------
_shapes_only = None  # the list shapes_only() appends to while it is active


@contextlib.contextmanager
def shapes_only(record):
    """Inside this block ``conv_forward`` and ``conv_grad_input`` (so conv2d and
    conv_transpose2d) skip their products: each returns zeros of its output's shape and appends
    ``(kind, x_shape, w_shape, stride, padding, dilation, geometry)`` to ``record``, kind
    "conv" for conv_forward and "deconv" for conv_grad_input (conv_transpose2d's forward; its
    x_shape is then the shape of the conv whose adjoint it is, i.e. the deconv's output).

    ``minimask bench memory`` runs a whole R50-FPN training forward this way on the CPU, in
    seconds, to size the column matrices and activations of a GPU step.  The numbers that come
    out are meaningless; not for training, and not thread-safe (one module-level switch).
    """
    global _shapes_only
    old, _shapes_only = _shapes_only, record
    try:
        yield record
    finally:
        _shapes_only = old


def _record(kind, x_shape, w_shape, stride, padding, dilation, g, out_shape, dtype):
    _shapes_only.append((kind, x_shape, w_shape, stride, padding, dilation, g))
    return np.zeros(out_shape, dtype=dtype)


# ---- conv2d --------------------------------------------------------------------------------
# Where ``method="auto"`` (the default) uses Winograd's F(2x2, 3x3) (``winograd.py``) instead
# of im2col: on the CPU, for a 3x3 stride-1 conv with at least this many input and output
# channels and at least this much work, counted as 2x2 output tiles times the narrower channel
# count (per product: "forward", and "backward" for its two).  Narrower or smaller convs lose:
# their 16 GEMMs have a short inner dimension and few columns, and the tile transforms cost
# about as much as the products save.  Measured on a 2-core AMD EPYC machine, interleaved with
# im2col (the numbers are in the issue notes): r50_fpn's convs of 128 to 256 channels on its
# larger maps took 0.6 to 0.75 of im2col's time forward and 0.73 to 0.92 backward, its
# 64-channel ones 0.7 to 0.93 forward but 1.09 backward, its C5 (512 channels on 25x34, 113k
# by this count) 0.9 forward; the shapes model's biggest, 64 channels on 4 images of 32x32
# (65k), gained 5-8% inside a training step, too little for a change of arithmetic in the
# preset's schedule, so it stays on im2col, bit for bit.
WINOGRAD_AUTO = {"forward": (64, 100_000), "backward": (128, 200_000)}  # (channels, tiles x channels)
METHODS = ("auto", "im2col", "shift", "winograd")

# When no gradient will be taken (inference), "auto" uses the bigger tiles of F(4x4, 3x3) on
# large maps: at least this many output pixels per image, with at most this many channels
# (its transformed filters are 36 O C numbers, rebuilt on each call).  Measured forward, two
# BLAS threads, against F(2x2, 3x3): 0.42 against 0.64 of im2col's time on r50_fpn's P2
# (256 channels, 200x267), 0.57 / 0.73 on C3 (128, 100x134), 0.56 / 0.62 on C4 and P4 (256,
# 50x68, after the float32 transforms of kernels/winograd.py), and slower on 25x34 maps, on
# 14x14 RoIs and with 512 channels.
WINOGRAD4_AUTO = {"min_pixels": 3_000, "max_channels": 256}


def _winograd_output(x, padding):
    """(ho, wo) of a 3x3 stride-1 conv of x, the size Winograd's tiles cover."""
    return tuple(_out_size(x.shape[2 + a], 3, 1, padding[a], 1, "conv2d") for a in (0, 1))


def winograd_tile(recording, x, w_shape, padding):
    """2 or 4: the tile of Winograd's F(m x m, 3x3) that "auto" uses for this conv's forward
    (4 only where no backward follows: F(4x4) has no backward here, and rounds more)."""
    ho, wo = _winograd_output(x, padding)
    big = ho * wo >= WINOGRAD4_AUTO["min_pixels"]
    return 4 if not recording and big and max(x.shape[1], w_shape[0]) <= WINOGRAD4_AUTO["max_channels"] else 2


def uses_winograd(method, x, w_shape, stride, padding, dilation, product="forward"):
    """Whether ``Conv2dFn(method=...)`` computes ``product`` ("forward" or "backward") of this
    conv by Winograd's F(2x2, 3x3); "winograd" asks for it and is an error where it cannot."""
    fits = winograd.applies(w_shape, stride, padding, dilation)
    if method == "winograd":
        if not fits or is_cupy_array(x):
            raise ValueError(f"conv2d: method 'winograd' computes 3x3 stride-1 undilated convs "
                             f"(padding <= 2) of NumPy arrays, not kernel {tuple(w_shape[2:])}, "
                             f"stride {stride}, dilation {dilation}, padding {padding} on "
                             f"{device_of(x)}")
        return True
    if method != "auto" or not fits or is_cupy_array(x):
        return False
    th, tw = tile_counts(*_winograd_output(x, padding))
    tiles = x.shape[0] * th * tw
    channels, work = WINOGRAD_AUTO[product]
    narrower = min(x.shape[1], w_shape[0])
    return narrower >= channels and tiles * narrower >= work


class Conv2dFn(Function):
    """y = conv(x, w) + b, cross-correlation as in PyTorch (see the module docstring).

    forward:   Y = W2 @ im2col(x) (+ b)
    backward:  gx = col2im(W2^T @ gY),  gw = gY @ im2col(x)^T,  gb = sum of gY over n, u, v

    ``method`` is "im2col", "shift" (one GEMM per kernel offset), "winograd" (F(2x2, 3x3),
    ``winograd.py``; 3x3 stride-1 convs on the CPU) or "auto" (the default: im2col, and
    Winograd where ``uses_winograd`` says it is faster).  All give the same numbers up to
    rounding and are kept side by side to compare (the module docstring has timings).
    """

    def __init__(self, stride=1, padding=0, dilation=1, method="auto"):
        self.stride = _pair(stride, "conv2d: stride", 1)
        self.padding = _pair(padding, "conv2d: padding", 0)
        self.dilation = _pair(dilation, "conv2d: dilation", 1)
        if method not in METHODS:
            raise ValueError(f"conv2d: method must be one of {list(METHODS)}, got {method!r}")
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

    def forward(self, x, w, b=None):
        self._check(x, w, b)
        # x and w, not the columns: backward rebuilds those (they are kh*kw times x's size)
        self.save_for_backward(x=x, w=w, has_bias=b is not None)
        args = self.stride, self.padding, self.dilation
        if self.method == "shift":
            y = _shift_forward(x, w, *args)
        elif uses_winograd(self.method, x, w.shape, *args):
            tile = winograd_tile(self.recording, x, w.shape, self.padding) if self.method == "auto" else 2
            y = winograd.winograd_forward(x, w, self.padding, tile)
        else:
            y = conv_forward(x, w, *args)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        x, w, args = self.x, self.w, (self.stride, self.padding, self.dilation)
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        gx = gw = None
        if self.method == "shift":
            gx, gw = _shift_backward(x, w, gy, *args, need_x, need_w)
        elif uses_winograd(self.method, x, w.shape, *args, product="backward"):
            gx, gw = winograd.winograd_backward(x, w, gy, self.padding, need_x, need_w)
        else:
            # rebuilds the columns rather than keeping them from forward: less memory, and faster
            # (kept ones were fresh pages every step: a shapes step took 259 ms against 204)
            if need_w:
                gw = conv_grad_weight(x, gy, w.shape[2:], *args)
            if need_x:
                gx = conv_grad_input(gy, w, x.shape, *args)
        if not self.has_bias:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb


# ---- the alternative: shift-and-GEMM ------------------------------------------------------
def _to_nchw(y2, n, ho, wo):
    """(O, N Ho Wo) matrix -> contiguous (N, O, Ho, Wo) array."""
    o = y2.shape[0]
    return get_array_module(y2).ascontiguousarray(y2.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))


def _to_matrix(y):
    """(N, O, Ho, Wo) array -> contiguous (O, N Ho Wo) matrix."""
    n, o, ho, wo = y.shape
    return get_array_module(y).ascontiguousarray(y.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)


def _padded_channel_major(x, padding):
    """x as a zero-padded (C, N, Hp, Wp) array, so that one slice gives a (C, N Ho Wo) matrix."""
    return _pad(x, padding).transpose(1, 0, 2, 3)


def _shift_forward(x, w, stride, padding, dilation):
    """Y = sum over offsets (i, j) of w[:, :, i, j] @ (x shifted by (i, j)): kh*kw GEMMs."""
    xp = get_array_module(x)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    g = ConvGeometry(x.shape[2:], (kh, kw), stride, padding, dilation)
    xt = _padded_channel_major(x, padding)
    y2 = xp.zeros((o, n * g.ho * g.wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            shifted = xp.ascontiguousarray(xt[:, :, g.rows(i, 0, g.ho), g.cols(j)]).reshape(c, -1)
            y2 += w[:, :, i, j] @ shifted
    return _to_nchw(y2, n, g.ho, g.wo)


def _shift_backward(x, w, gy, stride, padding, dilation, need_x, need_w):
    """gw[:, :, i, j] = gY @ shifted_ij^T;  gx = sum over (i, j) of w[:, :, i, j]^T @ gY, shifted back."""
    xp = get_array_module(x)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    g = ConvGeometry(x.shape[2:], (kh, kw), stride, padding, dilation)
    xt = _padded_channel_major(x, padding)
    g2 = _to_matrix(gy)
    gw = xp.empty_like(w) if need_w else None
    gxt = xp.zeros(xt.shape, dtype=x.dtype) if need_x else None
    for i in range(kh):
        for j in range(kw):
            window = g.rows(i, 0, g.ho), g.cols(j)
            if need_w:
                shifted = xp.ascontiguousarray(xt[(slice(None), slice(None)) + window]).reshape(c, -1)
                gw[:, :, i, j] = g2 @ shifted.T
            if need_x:
                gxt[(slice(None), slice(None)) + window] += (w[:, :, i, j].T @ g2).reshape(c, n, g.ho, g.wo)
    gx = _unpad(gxt.transpose(1, 0, 2, 3), padding, h, wd) if need_x else None
    return gx, gw


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation) of x (N, C, H, W) with w (O, C, kh, kw), plus b (O,)."""
    fn = Conv2dFn(stride, padding, dilation)
    return fn(x, w) if b is None else fn(x, w, b)


def conv2d_relu(x, w, b=None, residual=None, stride=1, padding=0, dilation=1):
    """relu(conv2d(x, w, b) + residual) (residual optional): a conv with its ReLU, or the end
    of a residual block.

    While training (anything recorded) this is exactly those ops, ``conv2d`` then ``relu`` or
    ``add_relu``, each with its backward.  At inference on the CPU the bias, the residual and
    the ReLU are one in-place pass over the conv's fresh output (``kernels/epilogue.py``)
    instead of three passes and two new arrays: the same numbers to the bit."""
    # A bias of another dtype or shape (conv2d's error) or a residual of another dtype takes
    # the unfused ops; a residual that broadcasts is added by the NumPy steps.
    fusable = (not records(x, w, b, residual) and not is_cupy_array(as_tensor(x).data)
               and (b is None or (b.dtype == x.dtype and tuple(b.shape) == (w.shape[0],)))
               and (residual is None or residual.dtype == x.dtype))
    if not fusable:
        return add_relu(conv2d(x, w, b, stride, padding, dilation), residual)
    y = conv2d(x, w, None, stride, padding, dilation)
    b, r = (None if a is None else as_tensor(a).data for a in (b, residual))
    if r is not None and r.shape != y.shape:
        return Tensor(epilogue_reference(y.data, b, r))
    bias_relu_(y.data, b, r)
    return y


# ---- conv_transpose2d ----------------------------------------------------------------------
class ConvTranspose2dFn(Function):
    """The transpose (adjoint) of conv2d with respect to its input: the mask head's deconv.

    A conv with weight w (C_in, C_out, kh, kw) read as (O=C_in, C=C_out, kh, kw) maps an
    (N, C_out, H_out, W_out) image to (N, C_in, H, W).  Its adjoint goes the other way, and it
    is exactly conv2d's input-gradient computation, so the three products swap roles:

    forward:   y  = col2im(W2^T @ X) (+ b)      = conv_grad_input(x, w)
    backward:  gx = W2 @ im2col(gy)             = conv_forward(gy, w)
               gw = X @ im2col(gy)^T            = conv_grad_weight(gy, x)
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
        n, _, h, wd = x.shape
        _, cout, kh, kw = w.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        ho, wo = (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw
        if ho < 1 or wo < 1:
            raise ValueError(f"conv_transpose2d: padding {self.padding} is too large for input "
                             f"{h}x{wd} and kernel {kh}x{kw}: the output would be {ho}x{wo}")
        self.save_for_backward(x=x, w=w, has_bias=b is not None)
        y = conv_grad_input(x, w, (n, cout, ho, wo), self.stride, self.padding, (1, 1))
        if b is not None:
            y += b.reshape(1, cout, 1, 1)
        return y

    def backward(self, gy):
        x, w, args = self.x, self.w, (self.stride, self.padding, (1, 1))
        gx = conv_forward(gy, w, *args) if self.needs_input_grad[0] else None
        gw = conv_grad_weight(gy, x, w.shape[2:], *args) if self.needs_input_grad[1] else None
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
        g = ConvGeometry((h, w), self.kernel, self.stride, self.padding, (1, 1), "max_pool2d")
        if _use_loops(x) and not self.recording:  # no backward: the values only, row then column
            return max_pool_values(x, self.kernel, self.stride, self.padding, (g.ho, g.wo))
        if _use_loops(x):  # the same, in one pass of kernels/maxpool.py
            y, arg = max_pool_forward(x, self.kernel, self.stride, self.padding, (g.ho, g.wo))
            self.save_for_backward(arg=arg, geometry=g, x_shape=x.shape)
            return y
        ph, pw = self.padding
        xpad = xp.full((n, c, h + 2 * ph, w + 2 * pw), -xp.inf, dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
        y = xpad[:, :, g.rows(0, 0, g.ho), g.cols(0)].copy()
        arg = xp.zeros(y.shape, dtype=np.int32)  # the winning offset i * kw + j
        for i in range(g.kh):
            for j in range(g.kw):
                if i == 0 and j == 0:
                    continue
                v = xpad[:, :, g.rows(i, 0, g.ho), g.cols(j)]
                better = v > y
                y = xp.where(better, v, y)
                arg = xp.where(better, np.int32(i * g.kw + j), arg)
        self.save_for_backward(arg=arg, geometry=g, x_shape=x.shape)  # int32 winners, not the padded x
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        g, (n, c, h, w) = self.geometry, self.x_shape
        if _use_loops(gy):
            return max_pool_backward(gy, self.arg, self.x_shape, self.kernel, self.stride, self.padding)
        gxpad = xp.zeros((n, c, h + 2 * self.padding[0], w + 2 * self.padding[1]), dtype=gy.dtype)
        zero = xp.zeros((), dtype=gy.dtype)
        for i in range(g.kh):
            for j in range(g.kw):
                gxpad[:, :, g.rows(i, 0, g.ho), g.cols(j)] += xp.where(self.arg == i * g.kw + j, gy, zero)
        return _unpad(gxpad, self.padding, h, w)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling over kernel_size windows of x (N, C, H, W); stride defaults to kernel_size."""
    return MaxPool2dFn(kernel_size, stride, padding)(x)
