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
