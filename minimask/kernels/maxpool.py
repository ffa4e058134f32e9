"""Max pooling as Numba loops: ``MaxPool2dFn`` of ``functional/conv.py`` in one pass each way.

``MaxPool2dFn`` (the ResNet stem's 3x3 stride-2 pool, FPN's P6) takes a running maximum over the
kh*kw shifted slices of a -inf-padded copy of x, each step two ``where`` over the whole output,
and sends the gradient back with kh*kw masked slice additions.  These loops do the same per
output pixel, reading x itself (no padded copy):

    forward    y = the window's value at offset 0 (-inf where that is padding), then each later
               offset in row-major order replaces it only when strictly greater; arg = the offset
               i * kw + j that holds y (so ties go to the first offset, as in PyTorch)
    backward   gx[the pixel at offset arg of the window] += gy, window by window

Each input pixel (which several overlapping windows may pick) receives its gradients in the
order of the slicing version's loop over offsets (see ``_max_pool_backward_numba``): the same
bits.
The reference is the slicing version itself (``tests/test_conv.py`` also checks both against a
plain loop over windows).  One thread, as ``kernels/im2col.py`` explains.

At inference no backward follows, so ``arg`` is not needed, and the maximum over a kh x kw
window can be taken in two steps, a max over kw columns in each row and then a max over kh of
those row maxima (``max_pool_values``).  The inner loops then run along whole rows, which the
compiler turns into SIMD code; the window-by-window loop above cannot, because which offset
wins is decided pixel by pixel.  It gives the same values, bit for bit, with ties and NaN
included: both steps start from -inf and take a value only when it is strictly greater, so the
winner is still the first maximum in row-major order and a NaN never wins; then a third step
puts back the one NaN the running max keeps, the one at the window's offset 0, where it starts.
"""

import numpy as np
from numba import njit, uint64


@njit(cache=True)
def _max_pool_numba(x, kh, kw, sh, sw, ph, pw, ho, wo, lowest, y, arg):
    # Flat views with unsigned offsets, as in kernels/im2col.py (signed indices cost a
    # wrap-around test each); windows that overhang the border skip the outside offsets.
    m, c, h, w = x.shape
    xf, yf, af = x.reshape(-1), y.reshape(-1), arg.reshape(-1)
    for t in range(m * c):
        for u in range(ho):
            r0 = u * sh - ph
            i0, i1 = max(0, -r0), min(kh, h - r0)  # offsets i inside the image
            for v in range(wo):
                q0 = v * sw - pw
                j0, j1 = max(0, -q0), min(kw, w - q0)
                best = xf[uint64((t * h + r0) * w + q0)] if i0 == 0 and j0 == 0 else lowest
                at = 0
                for i in range(i0, i1):
                    row = uint64((t * h + r0 + i) * w + q0)
                    for j in range(j0, j1):
                        value = xf[row + uint64(j)]
                        if value > best and (i > 0 or j > 0):
                            best, at = value, i * kw + j
                o = uint64((t * ho + u) * wo + v)
                yf[o] = best
                af[o] = at


@njit(cache=True)
def _max_pool_backward_numba(gy, arg, kw, sh, sw, ph, pw, gx):
    # Windows in reverse raster order: an input pixel read by several windows then receives
    # their gradients by increasing offset i * kw + j (a later offset of the same pixel belongs
    # to an earlier window), the order of the slicing version's loop over offsets.
    m, c, ho, wo = gy.shape
    h, w = gx.shape[2], gx.shape[3]
    for n in range(m):
        for ch in range(c):
            for u in range(ho - 1, -1, -1):
                for v in range(wo - 1, -1, -1):
                    k = arg[n, ch, u, v]
                    r, q = u * sh - ph + k // kw, v * sw - pw + k % kw
                    if 0 <= r < h and 0 <= q < w:
                        gx[n, ch, r, q] += gy[n, ch, u, v]


@njit(cache=True, inline="always")
def _edge_max(xr, q0, kw, lowest):
    """Max over the part inside row xr of a window starting at column q0 (it hangs over an end)."""
    best = lowest
    for j in range(max(0, -q0), min(kw, xr.shape[0] - q0)):
        value = xr[q0 + j]
        best = value if value > best else best
    return best


@njit(cache=True)
def _max_pool_values_numba(x, kh, kw, sh, sw, ph, pw, ho, wo, lowest, y):
    m, c, h, w = x.shape
    rows = np.empty((h, wo), dtype=x.dtype)  # rows[r, v]: max of row r over output column v's window
    v0 = min(wo, -(-pw // sw))  # output columns v0 <= v < v1 have windows inside the row
    v1 = max(v0, min(wo, (w - kw + pw) // sw + 1))
    for b in range(m):
        for ch in range(c):
            for r in range(h):  # step 1: along each row
                xr, rr = x[b, ch, r], rows[r]
                for v in range(v0):
                    rr[v] = _edge_max(xr, v * sw - pw, kw, lowest)
                rr[v0:v1] = lowest
                for j in range(kw):  # offset by offset, over the whole row: SIMD
                    for v in range(v0, v1):
                        value = xr[v * sw - pw + j]
                        rr[v] = value if value > rr[v] else rr[v]
                for v in range(v1, wo):
                    rr[v] = _edge_max(xr, v * sw - pw, kw, lowest)
            for u in range(ho):  # step 2: down the columns of row maxima
                r0 = u * sh - ph
                yu = y[b, ch, u]
                yu[:] = lowest
                for i in range(max(0, -r0), min(kh, h - r0)):
                    src = rows[r0 + i]
                    for v in range(wo):
                        value = src[v]
                        yu[v] = value if value > yu[v] else yu[v]
                if r0 >= 0:  # step 3: a NaN at offset 0 is where the running max starts
                    xr = x[b, ch, r0]
                    for v in range(v0, wo):
                        q0 = v * sw - pw
                        if xr[q0] != xr[q0]:
                            yu[v] = xr[q0]


def max_pool_values(x, kernel, stride, padding, out_hw):
    """y of max pooling x (N, C, H, W), a NumPy array, without ``arg``: the same values as
    ``max_pool_forward``, row by row then column by column (see above), for inference."""
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_hw
    y = np.empty(x.shape[:2] + (ho, wo), dtype=x.dtype)
    lowest = x.dtype.type(-np.inf)
    _max_pool_values_numba(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, ho, wo, lowest, y)
    return y


def max_pool_forward(x, kernel, stride, padding, out_hw):
    """(y, arg) of max pooling x (N, C, H, W), a NumPy array; arg is int32 (see above)."""
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_hw
    y = np.empty(x.shape[:2] + (ho, wo), dtype=x.dtype)
    arg = np.empty(y.shape, dtype=np.int32)
    lowest = x.dtype.type(-np.inf)  # -inf of x's own dtype: the running max stays in it
    _max_pool_numba(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, ho, wo, lowest, y, arg)
    return y, arg


def max_pool_backward(gy, arg, x_shape, kernel, stride, padding):
    """gx (N, C, H, W): each output gradient added onto the input pixel its window's max came from."""
    (_, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    gx = np.zeros(x_shape, dtype=gy.dtype)
    _max_pool_backward_numba(np.ascontiguousarray(gy), np.ascontiguousarray(arg), kw, sh, sw, ph, pw, gx)
    return gx
