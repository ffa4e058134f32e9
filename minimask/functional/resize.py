"""Resizing feature maps: nearest-neighbour and bilinear interpolation on (N, C, H, W).

The FPN's top-down pathway (Lin et al. 2017, Sec. 3; used by Mask R-CNN, Sec. 3 "Network
Architecture") upsamples each coarser map 2x by nearest neighbour before adding the lateral
connection: that is the hot path here, and it gets its own exact shortcut (a repeat forward,
a backward that adds up each block).

Both modes are *separable*: output pixel (i, j) reads input rows chosen by i alone and columns
chosen by j alone.  So each mode is described by two 1-D tables (one per axis) of source indices
and weights; forward gathers with them.  Along one axis the resize is a linear map, an (out, in)
matrix A with one or two nonzeros per row, so the whole resize is y = A_h x A_w^T and its
backward is the transpose, dx = A_h^T gy A_w: a source pixel read by several outputs collects
all their gradients.

Coordinates follow PyTorch's ``F.interpolate`` exactly, so the same numbers give the same
results.  With ``ratio = in / out`` (or ``1 / scale_factor`` when a scale factor is given,
PyTorch's default ``recompute_scale_factor=None``):

    nearest (PyTorch's legacy "nearest"):   src = min(floor(dst * ratio), in - 1)
    bilinear, align_corners=False:          src = max((dst + 0.5) * ratio - 0.5, 0)
                                            (pixel centres line up; clamped at the top/left edge)
    bilinear, align_corners=True:           src = dst * (in - 1) / (out - 1)
                                            (corner pixels line up)

and bilinear reads rows floor(src) and floor(src) + 1 (clamped to the image) with weights
1 - frac and frac.  PyTorch computes nearest indices in float32 always, and bilinear coordinates
in float32 for float32 maps; so do we, to pick the same pixels.  Exact rational arithmetic
would round some nearest indices differently (2 -> 82 pixels, dst 41: 41 * 2 / 82 is exactly
1.0, but 0.99999994 in float32, so floor gives 0).  PyTorch's CPU kernels (AVX2 and AVX-512
builds) and CUDA kernels compute ``ratio * (dst + 0.5) - 0.5`` as one fused multiply-add, a
single rounding; we round once too, so our float32 bilinear weights are PyTorch's bit for bit
(its plain "DEFAULT" CPU build rounds twice and can differ in a weight's last bit).

These tables are the one resize rule of minimask: ``interpolate`` below (the differentiable
feature-map resize), the array-level ``resize_image`` and ``resize_masks`` at the end of the file
(the model's input transform) and torchvision-style mask pasting (``ops/masks.py``) all gather
with them.
"""

import math

import numpy as np

from ..backend import get_array_module
from ..tensor import Function


def _output_size(in_hw, size, scale_factor):
    """(out_h, out_w) and the per-axis scale factors (None where the size was given)."""
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size or scale_factor")
    if size is not None:
        out = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(out) != 2:
            raise ValueError(f"interpolate: size must be an int or (height, width), got {size!r}")
        scales = (None, None)
    else:
        scales = (scale_factor, scale_factor) if np.isscalar(scale_factor) else tuple(scale_factor)
        if len(scales) != 2 or any(s <= 0 for s in scales):
            raise ValueError(f"interpolate: scale_factor must be positive, one number or two, "
                             f"got {scale_factor!r}")
        scales = tuple(float(s) for s in scales)
        out = tuple(int(math.floor(n * s)) for n, s in zip(in_hw, scales))
    if min(out) < 1:
        raise ValueError(f"interpolate: output size {out} from input {in_hw} has an empty axis")
    return out, scales


def _ratio(n_in, n_out, scale, dtype):
    """Input pixels per output pixel, in ``dtype`` as PyTorch computes it."""
    if scale is not None:
        return dtype.type(1.0 / scale)
    return dtype.type(n_in) / dtype.type(n_out)


def nearest_table(n_in, n_out, scale=None):
    """Source index of each output position along one axis (a NumPy int64 array), as PyTorch's
    ``mode="nearest"``: ``min(floor(dst * ratio), n_in - 1)`` with ``ratio = n_in / n_out`` (or
    ``1 / scale``) in float32.

    ``x[nearest_table(n_in, n_out)]`` resizes axis 0 of ``x`` from ``n_in`` to ``n_out``.
    """
    ratio = _ratio(n_in, n_out, scale, np.dtype(np.float32))  # float32 always, as PyTorch
    src = np.floor(np.arange(n_out, dtype=np.float32) * ratio).astype(np.int64)
    return np.minimum(src, n_in - 1)


def linear_table(n_in, n_out, scale=None, align_corners=False, dtype=np.float32):
    """Along one axis: the two source indices (i0, i1) (NumPy int64) and weights (w0, w1) (in
    ``dtype``) of each output, as PyTorch's ``mode="bilinear"``, so that
    ``x[i0] * w0 + x[i1] * w1`` resizes axis 0 of ``x`` from ``n_in`` to ``n_out``.

    ``dtype`` is the precision PyTorch computes coordinates in: float32 for float32 (and
    narrower) data, float64 for float64.  With ``align_corners=False`` the source coordinate is
    ``max(ratio * (dst + 0.5) - 0.5, 0)``, half-pixel centres, clamped at the first pixel.
    """
    dtype = np.dtype(dtype)
    dst = np.arange(n_out, dtype=dtype)
    if align_corners:
        ratio = dtype.type(n_in - 1) / dtype.type(n_out - 1) if n_out > 1 else dtype.type(0)
        src = dst * ratio
    else:
        ratio = _ratio(n_in, n_out, scale, dtype)
        if dtype == np.float32:
            # PyTorch's compiled kernels fuse this multiply-add (one rounding).  float64 holds
            # ratio * (dst + 0.5) - 0.5 exactly (a 24-bit ratio times a 25-bit half-integer, less
            # 0.5, fits in 53 bits for any size below 2^24), so one rounding to float32 from
            # there is the fused result.
            src = (np.float64(ratio) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
        else:
            src = (dst + dtype.type(0.5)) * ratio - dtype.type(0.5)
        src = np.maximum(src, dtype.type(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)  # at the last row both taps are the same pixel
    w1 = np.clip(src - i0, 0, 1).astype(dtype)
    return i0, i1, (1 - w1).astype(dtype), w1


def _integer_factor(table, n_in, n_out):
    """k when ``table`` is exactly "each input repeated k times" (out = k * in), else None."""
    if n_out % n_in:
        return None
    k = n_out // n_in
    return k if np.array_equal(table, np.arange(n_out) // k) else None


def interpolation_matrix(n_in, taps, dtype):
    """The (out, in) matrix A of one axis's resize, y = A x along that axis, from its taps
    (pairs of index and weight arrays, one entry per output).  Taps may hit the same input
    twice (bilinear at the last row), so they are added, not assigned."""
    n_out = len(taps[0][0])
    a = np.zeros((n_out, n_in), dtype=dtype)
    for index, weight in taps:
        np.add.at(a, (np.arange(n_out), index), weight)
    return a


def _backward_through_matrices(gy, rows, cols):
    """dx = A_rows^T gy A_cols: the transpose of a resize is the resize's matrices transposed.

    Each output pixel's gradient goes back to the input pixels it was read from, with the same
    weights; a dense matrix product does this scatter-add exactly, and for feature-map sizes
    faster than a scatter (np.add.at) would.
    """
    xp = get_array_module(gy)
    return xp.matmul(rows.T, gy @ cols)  # (H, Ho) @ (N, C, Ho, W) broadcasts over N, C


class NearestResize(Function):
    """y[n, c, i, j] = x[n, c, rows[i], cols[j]];  dx[n, c, r, s] = sum of gy[n, c, i, j] over the
    (i, j) with rows[i] = r and cols[j] = s.

    For integer factors (every input pixel copied to a kh x kw block, the FPN's 2x) forward is a
    repeat and backward adds up each block: no index tables, no matrices.
    """

    def __init__(self, out_hw, scales):
        self.out_hw, self.scales = out_hw, scales

    def forward(self, x):
        xp = get_array_module(x)
        n, c, h, w = x.shape
        (oh, ow), (sh, sw) = self.out_hw, self.scales
        rows, cols = nearest_table(h, oh, sh), nearest_table(w, ow, sw)
        kh, kw = _integer_factor(rows, h, oh), _integer_factor(cols, w, ow)
        self.save_for_backward(in_shape=x.shape, kh=kh, kw=kw)
        if kh and kw:
            return x.repeat(kh, axis=2).repeat(kw, axis=3)  # backward needs only the factors
        ones = np.ones(1, dtype=x.dtype)
        self.save_for_backward(rows=xp.asarray(interpolation_matrix(h, [(rows, ones)], x.dtype)),
                               cols=xp.asarray(interpolation_matrix(w, [(cols, ones)], x.dtype)))
        return x[:, :, xp.asarray(rows)[:, None], xp.asarray(cols)[None, :]]

    def backward(self, gy):
        n, c, h, w = self.in_shape
        if not (self.kh and self.kw):
            return _backward_through_matrices(gy, self.rows, self.cols)
        # Add the kh rows of each block, then its kw columns.  Adding k strided slices is several
        # times faster in NumPy than gy.reshape(n, c, h, kh, w, kw).sum(axis=(3, 5)).
        g = gy.reshape(n, c, h, self.kh, w * self.kw)
        acc = g[:, :, :, 0]
        for i in range(1, self.kh):
            acc = acc + g[:, :, :, i]
        g = acc.reshape(n, c, h, w, self.kw)
        acc = g[..., 0]
        for j in range(1, self.kw):
            acc = acc + g[..., j]
        return acc


class BilinearResize(Function):
    """Along each axis y = w0 * x[i0] + w1 * x[i1] (rows first, then columns), i.e. y = A_h x A_w^T;

    dx = A_h^T gy A_w: each output's gradient goes back to its four source pixels with the
    same bilinear weights.
    """

    def __init__(self, out_hw, scales, align_corners):
        self.out_hw, self.scales, self.align_corners = out_hw, scales, align_corners

    def forward(self, x):
        xp = get_array_module(x)
        (oh, ow), (sh, sw) = self.out_hw, self.scales
        dtype = np.float64 if x.dtype == np.float64 else np.float32  # PyTorch's "opmath" type
        r0, r1, rw0, rw1 = linear_table(x.shape[2], oh, sh, self.align_corners, dtype)
        c0, c1, cw0, cw1 = linear_table(x.shape[3], ow, sw, self.align_corners, dtype)
        a_rows = interpolation_matrix(x.shape[2], [(r0, rw0), (r1, rw1)], x.dtype)
        a_cols = interpolation_matrix(x.shape[3], [(c0, cw0), (c1, cw1)], x.dtype)
        self.save_for_backward(rows=xp.asarray(a_rows), cols=xp.asarray(a_cols))  # not x: dx = A^T gy A
        r0, r1, c0, c1 = (xp.asarray(a) for a in (r0, r1, c0, c1))
        rw0, rw1, cw0, cw1 = (xp.asarray(a.astype(x.dtype)) for a in (rw0, rw1, cw0, cw1))
        t = x[:, :, r0, :] * rw0[:, None] + x[:, :, r1, :] * rw1[:, None]  # rows: (N, C, Ho, W)
        return t[..., c0] * cw0 + t[..., c1] * cw1  # then columns: (N, C, Ho, Wo)

    def backward(self, gy):
        return _backward_through_matrices(gy, self.rows, self.cols)


def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=False):
    """Resize (N, C, H, W) maps to ``size`` (int or (h, w)) or by ``scale_factor``, as
    ``torch.nn.functional.interpolate`` with ``mode="nearest"`` or ``"bilinear"``."""
    if x.ndim != 4:
        raise ValueError(f"interpolate: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
    out_hw, scales = _output_size(tuple(x.shape[2:]), size, scale_factor)
    if mode == "nearest":
        if align_corners:
            raise ValueError("interpolate: align_corners is only for mode='bilinear'")
        return NearestResize(out_hw, scales)(x)
    if mode == "bilinear":
        return BilinearResize(out_hw, scales, bool(align_corners))(x)
    raise ValueError(f"interpolate: unknown mode {mode!r}: expected 'nearest' or 'bilinear'")


# ---------------------------------------------------------------- arrays (no gradient)
# The model's input transform resizes images and their masks before any Tensor exists; these
# gather with the same tables as ``interpolate``, on NumPy or CuPy arrays.


def _resize_axis(x, axis, n_out, dtype):
    """Bilinear resize of ``x`` (float, in ``dtype``) along ``axis`` (0 or 1) to ``n_out``."""
    xp = get_array_module(x)
    i0, i1, w0, w1 = (xp.asarray(a) for a in linear_table(x.shape[axis], n_out, dtype=dtype))
    if axis == 0:
        shape = (-1,) + (1,) * (x.ndim - 1)  # the weights broadcast over the other axes
        return x[i0] * w0.reshape(shape) + x[i1] * w1.reshape(shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x[:, i0] * w0.reshape(shape) + x[:, i1] * w1.reshape(shape)


def resize_image(image, size):
    """Bilinear resize of an (H, W, C) or (H, W) array to ``size`` = (new_h, new_w), the numbers
    of PyTorch's ``interpolate(mode="bilinear", align_corners=False)`` on the float image.

    Computed in float32 (float64 for float64 images, as PyTorch); uint8 in gives uint8 out
    (rounded half to even, as ``torch.round``), any float dtype gives that dtype.  Columns are
    interpolated first, then rows: the order of PyTorch's CPU loop, so the sums round alike.
    An axis whose size does not change is left alone (exactly what the tables would give).
    """
    xp = get_array_module(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"resize_image: expected an (H, W, C) or (H, W) array, got shape {image.shape}")
    new_h, new_w = (int(s) for s in size)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"resize_image: size must be positive, got {tuple(size)}")
    dtype = np.float64 if image.dtype == np.float64 else np.float32
    out = image.astype(dtype, copy=False)
    if new_w != image.shape[1]:
        out = _resize_axis(out, 1, new_w, dtype)
    if new_h != image.shape[0]:
        out = _resize_axis(out, 0, new_h, dtype)
    if image.dtype == np.uint8:
        return xp.clip(xp.rint(out), 0, 255).astype(np.uint8)
    if out is not image and out.dtype == image.dtype:
        return out
    return out.astype(image.dtype)  # a new array also when nothing was resized


def resize_masks(masks, size):
    """Nearest-neighbour resize of (N, H, W) masks to ``size`` = (new_h, new_w), PyTorch's
    ``interpolate(mode="nearest")`` (``nearest_table``); any dtype, values only copied, so 0/1
    masks stay 0/1."""
    xp = get_array_module(masks)
    if masks.ndim != 3:
        raise ValueError(f"resize_masks: expected (N, H, W) masks, got shape {masks.shape}")
    new_h, new_w = (int(s) for s in size)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"resize_masks: size must be positive, got {tuple(size)}")
    if (new_h, new_w) == masks.shape[1:]:
        return masks.copy()
    rows = xp.asarray(nearest_table(masks.shape[1], new_h))
    cols = xp.asarray(nearest_table(masks.shape[2], new_w))
    return masks[:, rows[:, None], cols[None, :]]
