"""im2col and col2im as Numba loops: the column copies of ``functional/conv.py`` in one pass.

``functional/conv.py`` explains the convolution as im2col + GEMM and builds the columns with
kh*kw strided slice copies of a zero-padded copy of the input (``_gather``), and scatters them
back with kh*kw slice additions into a padded gradient (``_scatter_add``).  That is the
clearest way to write it and it runs unchanged on CuPy, but on the CPU every slice is a
separate NumPy call over a (images, channels, rows, columns) view with short inner rows (4 to
64 pixels in the ``shapes`` model), and the padding costs two more copies (pad x, unpad gx).
The loops here do the same copies in one pass, read the unpadded input and write zeros where
a window hangs over the border.

    im2col:  cols[n, (c, i, j), (u - u0) Wo + v] = x[n, c, s u + d i - p, s v + d j - p]  (0 outside)
    col2im:  gx[n, c, s u + d i - p, s v + d j - p] += cols[n, (c, i, j), (u - u0) Wo + v]

col2im adds into each pixel in the order of the slicing version (kernel offsets (i, j) in
row-major order, starting from zero), so both give the same bits.

They run on one thread, on purpose (the comment above them says why).

Layers, each tested against the one before (``tests/test_im2col.py``): ``im2col_reference`` /
``col2im_reference`` (plain loops over every column entry, reading like the formula above),
the Numba loops (NumPy arrays), and the slicing version in ``functional/conv.py`` (which the
GPU uses; CuPy runs it as a few elementwise kernels).
"""

import numpy as np
from numba import njit, uint64


# ---- 1. the reference: one column entry at a time ----------------------------------------
def _out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def im2col_reference(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """All columns (N, C kh kw, Ho Wo) of x (N, C, H, W), entry by entry (slow; for tests)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = _out(h, kh, sh, ph, dh), _out(w, kw, sw, pw, dw)
    cols = np.zeros((n, c * kh * kw, ho * wo), dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for u in range(ho):
                        for v in range(wo):
                            y, xx = sh * u + dh * i - ph, sw * v + dw * j - pw
                            if 0 <= y < h and 0 <= xx < w:
                                cols[b, (ch * kh + i) * kw + j, u * wo + v] = x[b, ch, y, xx]
    return cols


def col2im_reference(cols, x_shape, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """The adjoint of im2col_reference: every column entry added onto its pixel (N, C, H, W)."""
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = _out(h, kh, sh, ph, dh), _out(w, kw, sw, pw, dw)
    gx = np.zeros(x_shape, dtype=cols.dtype)
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for u in range(ho):
                        for v in range(wo):
                            y, xx = sh * u + dh * i - ph, sw * v + dw * j - pw
                            if 0 <= y < h and 0 <= xx < w:
                                gx[b, ch, y, xx] += cols[b, (ch * kh + i) * kw + j, u * wo + v]
    return gx


# ---- 2. Numba: one pass over each (image, channel) plane --------------------------------
# The loops index flat views of the arrays with unsigned offsets.  Numba wraps negative indices
# around as Python does, so a signed index it cannot prove non-negative (base + v) costs a test
# per element and keeps LLVM from vectorizing the copy: written with signed offsets (or with a
# row view per output row) these loops were 2-3x slower than NumPy's slice copies, and with
# unsigned ones they are about twice as fast (the scatter 3-8x).
#
# One thread, on purpose: a conv step calls these hundreds of times, each for well under a
# millisecond, between BLAS calls that have threads of their own.  A parallel loop (Numba's
# OpenMP pool) ends each call at a barrier that waits for its slowest thread, and on a busy
# 2-core machine, with OpenBLAS's threads spinning beside it, that thread is often not running.
# Measured on such a machine (CPU time of a shapes training step, default thread counts),
# parallel loops took about three times the CPU time of the slice copies, and the slice copies
# about ten times that of the same step with every pool at one thread: threads waiting on each
# other, which is the caller's business (how many BLAS threads), not these loops'.
@njit(cache=True, inline="always")
def _valid_columns(j, wo, sw, pw, dw, width):
    """The output columns v whose input column s v + d j - p lies inside [0, width): v0 <= v < v1."""
    off = j * dw - pw
    v0 = 0
    while v0 < wo and v0 * sw + off < 0:
        v0 += 1
    v1 = wo
    while v1 > v0 and (v1 - 1) * sw + off >= width:
        v1 -= 1
    return v0, v1


@njit(cache=True)
def _im2col_numba(x, kh, kw, sh, sw, ph, pw, dh, dw, u0, u1, wo, cols):
    m, c, h, w = x.shape
    xf, cf = x.reshape(-1), cols.reshape(-1)
    row_len = (u1 - u0) * wo  # one column row: output rows u0:u1 of one (c, i, j)
    step = uint64(sw)
    for t in range(m * c):  # plane t = (n, c) of x, rows t kh kw .. of cols (both flat)
        for i in range(kh):
            for j in range(kw):
                v0, v1 = _valid_columns(j, wo, sw, pw, dw, w)
                for u in range(u1 - u0):
                    y = (u0 + u) * sh + i * dh - ph
                    o = uint64(((t * kh + i) * kw + j) * row_len + u * wo)
                    if y < 0 or y >= h or v1 == v0:  # the window hangs wholly over the border
                        for v in range(uint64(wo)):
                            cf[o + v] = 0
                        continue
                    for v in range(uint64(v0)):
                        cf[o + v] = 0
                    src, dst = uint64((t * h + y) * w + v0 * sw + j * dw - pw), o + uint64(v0)
                    if sw == 1:  # contiguous: a vectorized copy
                        for v in range(uint64(v1 - v0)):
                            cf[dst + v] = xf[src + v]
                    else:
                        for v in range(uint64(v1 - v0)):
                            cf[dst + v] = xf[src + v * step]
                    for v in range(uint64(v1), uint64(wo)):
                        cf[o + v] = 0


# The common case, a "same" convolution (stride 1 and Wo == W: a 3x3 conv with padding 1),
# has a shortcut.  For fixed (c, i, j) the column block is the input plane shifted by a
# constant: cols[u Wo + v] = x[(u + d i - p) W + (v + d j - p)], and since the rows of both are
# W long that is ONE flat offset for the whole block.  So each block is a single long copy
# (vectorized, no per-row bookkeeping), after which the entries that wrapped round a row's end
# are overwritten with the zeros they should be (the columns v < v0 and v >= v1), and the
# rows above and below the image are zeroed.  The same bits as the loop above, which on the
# shapes model's 4-32 pixel rows spends most of its time starting and ending rows.
@njit(cache=True, inline="always")
def _rows_inside(i, dh, ph, u0, u1, h):
    """Kernel row i's shift d i - p, and the output rows ua <= u < ub (within u0:u1) whose
    input row u + d i - p lies inside [0, h)."""
    shift_y = i * dh - ph
    return shift_y, max(u0, -shift_y), min(u1, h - shift_y)


@njit(cache=True, inline="always")
def _flat_span(ua, ub, w, shift_x):
    """The part [first, last) of the flat block of rows ua:ub whose shifted reads start and end
    inside the plane: the flat copy (or add) runs over it, the wrapped entries are fixed apart."""
    return max(0, -shift_x), (ub - ua) * w - max(0, shift_x)


@njit(cache=True, inline="always")
def _zero_wrapped(cf, o, r0, r1, w, v0, v1):
    """Zero the columns v < v0 and v >= v1 of block rows r0:r1 (those that read the padding)."""
    for u in range(r0, r1):
        r = o + uint64(u * w)
        for v in range(uint64(v0)):
            cf[r + v] = 0
        for v in range(uint64(v1), uint64(w)):
            cf[r + v] = 0


@njit(cache=True)
def _im2col_same_numba(x, kh, kw, ph, pw, dh, dw, u0, u1, cols):
    m, c, h, w = x.shape  # here Wo == W and the stride is 1
    xf, cf = x.reshape(-1), cols.reshape(-1)
    row_len = (u1 - u0) * w
    for t in range(m * c):
        for i in range(kh):
            shift_y, ua, ub = _rows_inside(i, dh, ph, u0, u1, h)
            for j in range(kw):
                o = uint64(((t * kh + i) * kw + j) * row_len)
                if ub <= ua:
                    for q in range(uint64(row_len)):
                        cf[o + q] = 0
                    continue
                for q in range(uint64((ua - u0) * w)):  # rows above the image
                    cf[o + q] = 0
                shift_x = j * dw - pw
                # one copy: dst (u - u0) w + v  <-  src (u + shift_y) w + v + shift_x, for
                # ua <= u < ub and all v (the wrapped v are zeroed after)
                first, last = _flat_span(ua, ub, w, shift_x)
                dst = o + uint64((ua - u0) * w + first)
                src = uint64(t * h * w + (ua + shift_y) * w + first + shift_x)
                if last > first:  # (not when a dilated window reaches wholly past the sides)
                    for q in range(uint64(last - first)):
                        cf[dst + q] = xf[src + q]
                v0, v1 = _valid_columns(j, w, 1, pw, dw, w)
                _zero_wrapped(cf, o, ua - u0, ub - u0, w, v0, v1)
                for q in range(uint64((ub - u0) * w), uint64(row_len)):  # rows below
                    cf[o + q] = 0


@njit(cache=True)
def _col2im_numba(cols, kh, kw, sh, sw, ph, pw, dh, dw, u0, u1, wo, gx):
    m, c, h, w = gx.shape
    cf, gf = cols.reshape(-1), gx.reshape(-1)
    row_len = (u1 - u0) * wo
    step = uint64(sw)
    for t in range(m * c):  # plane by plane
        for i in range(kh):
            for j in range(kw):
                v0, v1 = _valid_columns(j, wo, sw, pw, dw, w)
                if v1 == v0:
                    continue
                for u in range(u1 - u0):
                    y = (u0 + u) * sh + i * dh - ph
                    if y < 0 or y >= h:
                        continue
                    src = uint64(((t * kh + i) * kw + j) * row_len + u * wo + v0)
                    dst = uint64((t * h + y) * w + v0 * sw + j * dw - pw)
                    if sw == 1:
                        for v in range(uint64(v1 - v0)):
                            gf[dst + v] += cf[src + v]
                    else:
                        for v in range(uint64(v1 - v0)):
                            gf[dst + v * step] += cf[src + v]


# col2im has the same shortcut for a "same" convolution: one flat shifted add per (c, i, j)
# block.  The entries that would wrap round a row's end belong to the padding and must add
# nothing, so they are first set to zero in ``cols`` (scratch: the callers' cols is the fresh
# product W2^T gY); adding 0 leaves a pixel's bits as they are, and the blocks are added in
# the loop's (c, i, j) order, so the sums are the same bits as the loop above.
@njit(cache=True)
def _col2im_same_numba(cols, kh, kw, ph, pw, dh, dw, u0, u1, gx):
    m, c, h, w = gx.shape
    cf, gf = cols.reshape(-1), gx.reshape(-1)
    row_len = (u1 - u0) * w
    for t in range(m * c):
        for i in range(kh):
            shift_y, ua, ub = _rows_inside(i, dh, ph, u0, u1, h)
            if ub <= ua:
                continue
            for j in range(kw):
                o = uint64(((t * kh + i) * kw + j) * row_len)
                shift_x = j * dw - pw
                v0, v1 = _valid_columns(j, w, 1, pw, dw, w)
                _zero_wrapped(cf, o, ua - u0, ub - u0, w, v0, v1)
                first, last = _flat_span(ua, ub, w, shift_x)
                if last > first:
                    src = o + uint64((ua - u0) * w + first)
                    dst = uint64(t * h * w + (ua + shift_y) * w + first + shift_x)
                    for q in range(uint64(last - first)):
                        gf[dst + q] += cf[src + q]


def im2col_rows(x, kernel, stride, padding, dilation, u0, u1, wo, out=None):
    """Columns (m, C kh kw, (u1 - u0) Wo) of output rows u0:u1 of x (m, C, H, W), a NumPy array.

    ``out`` (optional) is filled and returned instead of a new array."""
    m, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if out is None:
        out = np.empty((m, c * kh * kw, (u1 - u0) * wo), dtype=x.dtype)
    if sh == sw == 1 and wo == x.shape[3]:  # a "same" convolution: one copy per block
        _im2col_same_numba(np.ascontiguousarray(x), kh, kw, ph, pw, dh, dw, u0, u1, out)
    else:
        _im2col_numba(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, dh, dw, u0, u1, wo, out)
    return out


def col2im_rows_add(gx, cols, kernel, stride, padding, dilation, u0, u1, wo):
    """gx (m, C, H, W) += col2im of the columns (m, C kh kw, (u1 - u0) Wo) of output rows u0:u1
    (gx must be a C-contiguous NumPy array; it is changed in place).  For a "same" convolution
    ``cols`` is used as scratch: its entries that fall in the padding are set to zero."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if not gx.flags.c_contiguous:
        raise ValueError("col2im_rows_add: gx must be C-contiguous (it is written in place)")
    if sh == sw == 1 and wo == gx.shape[3]:
        _col2im_same_numba(np.ascontiguousarray(cols), kh, kw, ph, pw, dh, dw, u0, u1, gx)
    else:
        _col2im_numba(np.ascontiguousarray(cols), kh, kw, sh, sw, ph, pw, dh, dw, u0, u1, wo, gx)
