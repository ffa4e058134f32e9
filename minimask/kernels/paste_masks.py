"""Pasting M x M mask probabilities into full-image masks (inference, Sec. 3.1 of the paper).

At test time the mask branch predicts an M x M map (28 x 28) per detection; "the m x m
floating-number mask output is then resized to the RoI size, and binarized at a threshold of
0.5" (paper, Sec. 3.1, Inference).  This file holds the loops that do the resize and paste,
following Detectron2's ``paste_masks_in_image`` (the ``grid_sample`` version of
``detectron2/layers/mask_ops.py``, not its older ``paste_mask_in_image_old``):

For an image pixel (px, py), whose centre is (px + 0.5, py + 0.5), and a box (x0, y0, x1, y1),
the mask is sampled at the continuous mask coordinates

    u = (px + 0.5 - x0) / (x1 - x0) * Mw - 0.5        v = (py + 0.5 - y0) / (y1 - y0) * Mh - 0.5

(mask cell j has its centre at u = j), bilinearly, with the four taps that fall off the mask
counting as zero.  That is ``grid_sample(..., align_corners=False, padding_mode="zeros")``: the
mask fades to zero over half a mask cell beyond the box edge instead of stopping with a step,
and everything farther away is zero.  The pixel is in the mask when the sample is >= threshold.

Three layers, each tested against the one before (see tests/test_paste_masks.py):

- ``paste_masks_reference``: NumPy/CuPy, vectorized over the whole image, one mask at a time;
  reads like the formula above.  It can also return the probabilities (``threshold=None``).
- ``paste_masks_numba``: the same arithmetic per pixel under Numba, visiting only the pixels
  whose sample can be non-zero (the box grown by half a mask cell), so many small masks in a
  big image cost little.  Parallel over masks.
- ``paste_masks_cupy``: a CUDA RawKernel with one thread per output pixel.

All three compute in float64, in the same order of operations, so that they agree bit for bit
(the CUDA kernel is compiled with ``--fmad=false`` so that the compiler does not fuse a multiply
and an add into one differently rounded instruction); a pixel whose probability is a rounding
error away from the threshold then still lands on the same side in every version.
"""

import math

import numpy as np
from numba import njit, prange

from ..backend import get_array_module, is_cupy_array
from .cuda_sources import CudaSource, cuda_function


def _bilinear_zero_padded(mask, v, u):
    """Sample ``mask`` (Mh, Mw) at rows ``v`` (H,) x columns ``u`` (W,); taps off the mask are 0."""
    xp = get_array_module(mask)
    mh, mw = mask.shape
    v0, u0 = xp.floor(v), xp.floor(u)
    fv, fu = v - v0, u - u0
    r0, c0 = v0.astype(xp.int64), u0.astype(xp.int64)

    def tap(index, size):  # a clipped index (safe to read) and whether the tap is on the mask
        inside = (index >= 0) & (index < size)
        return xp.clip(index, 0, size - 1), inside.astype(mask.dtype)

    (r0, r0_in), (r1, r1_in) = tap(r0, mh), tap(r0 + 1, mh)
    (c0, c0_in), (c1, c1_in) = tap(c0, mw), tap(c0 + 1, mw)
    rows0 = mask[r0] * r0_in[:, None]  # (H, Mw): the upper row of taps, zero where off the mask
    rows1 = mask[r1] * r1_in[:, None]
    # Along x first, then along y: the same order as the Numba and CUDA loops.
    top = rows0[:, c0] * c0_in * (1.0 - fu) + rows0[:, c1] * c1_in * fu
    bottom = rows1[:, c0] * c0_in * (1.0 - fu) + rows1[:, c1] * c1_in * fu
    return top * (1.0 - fv)[:, None] + bottom * fv[:, None]


def paste_masks_reference(masks, boxes, image_shape, threshold=None):
    """(N, Mh, Mw) masks into (N, H, W): probabilities (threshold None) or ``prob >= threshold``.

    Plain and slow on purpose: every pixel of the image is sampled for every mask.  Boxes with
    zero or negative width or height paste nothing.
    """
    xp = get_array_module(masks)
    masks = masks.astype(xp.float64)
    boxes = xp.asarray(boxes).astype(xp.float64)
    n, mh, mw = masks.shape
    height, width = image_shape
    probs = xp.zeros((n, height, width), dtype=xp.float64)
    px = xp.arange(width, dtype=xp.float64)
    py = xp.arange(height, dtype=xp.float64)
    for i in range(n):
        x0, y0, x1, y1 = (float(c) for c in boxes[i])
        if not (x1 - x0 > 0 and y1 - y0 > 0):
            continue
        u = ((px + 0.5) - x0) / (x1 - x0) * mw - 0.5  # pixel centre -> mask coordinate
        v = ((py + 0.5) - y0) / (y1 - y0) * mh - 0.5
        probs[i] = _bilinear_zero_padded(masks[i], v, u)
    return probs if threshold is None else probs >= threshold


@njit(cache=True)
def _sample(mask, v, u):
    """One bilinear sample of ``mask`` at (v, u), taps off the mask counting as zero."""
    mh, mw = mask.shape
    v0, u0 = math.floor(v), math.floor(u)
    fv, fu = v - v0, u - u0
    r0, c0 = int(v0), int(u0)
    top = 0.0
    bottom = 0.0
    if 0 <= r0 < mh:
        if 0 <= c0 < mw:
            top += mask[r0, c0] * (1.0 - fu)
        if 0 <= c0 + 1 < mw:
            top += mask[r0, c0 + 1] * fu
    if 0 <= r0 + 1 < mh:
        if 0 <= c0 < mw:
            bottom += mask[r0 + 1, c0] * (1.0 - fu)
        if 0 <= c0 + 1 < mw:
            bottom += mask[r0 + 1, c0 + 1] * fu
    return top * (1.0 - fv) + bottom * fv


@njit(cache=True, parallel=True)
def _paste_numba(masks, boxes, threshold, out):
    n, mh, mw = masks.shape
    height, width = out.shape[1], out.shape[2]
    for i in prange(n):
        x0, y0, x1, y1 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        w, h = x1 - x0, y1 - y0
        if not (w > 0 and h > 0):
            continue
        # The sample is non-zero only for -1 < u < Mw, i.e. for pixel centres less than half a
        # mask cell outside the box; visit those pixels (with a pixel of slack) and no others.
        grow_x, grow_y = 0.5 * w / mw, 0.5 * h / mh
        px_lo = int(max(math.floor(x0 - 0.5 - grow_x), 0.0))
        px_hi = int(min(math.ceil(x1 - 0.5 + grow_x) + 1.0, width))
        py_lo = int(max(math.floor(y0 - 0.5 - grow_y), 0.0))
        py_hi = int(min(math.ceil(y1 - 0.5 + grow_y) + 1.0, height))
        for py in range(py_lo, py_hi):
            v = ((py + 0.5) - y0) / h * mh - 0.5
            for px in range(px_lo, px_hi):
                u = ((px + 0.5) - x0) / w * mw - 0.5
                out[i, py, px] = _sample(masks[i], v, u) >= threshold


def paste_masks_numba(masks, boxes, image_shape, threshold):
    """``paste_masks_reference(...)`` thresholded, on NumPy arrays, visiting only box pixels."""
    masks = np.ascontiguousarray(masks, dtype=np.float64)
    boxes = np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((masks.shape[0],) + tuple(image_shape), dtype=np.bool_)
    _paste_numba(masks, boxes, float(threshold), out)
    return out


_CUDA_SOURCE = r"""
__device__ double sample_zero_padded(const double* mask, int mh, int mw, double v, double u) {
    double v0 = floor(v), u0 = floor(u);
    double fv = v - v0, fu = u - u0;
    int r0 = (int)v0, c0 = (int)u0;
    double top = 0.0, bottom = 0.0;
    if (r0 >= 0 && r0 < mh) {
        if (c0 >= 0 && c0 < mw) top += mask[r0 * mw + c0] * (1.0 - fu);
        if (c0 + 1 >= 0 && c0 + 1 < mw) top += mask[r0 * mw + c0 + 1] * fu;
    }
    if (r0 + 1 >= 0 && r0 + 1 < mh) {
        if (c0 >= 0 && c0 < mw) bottom += mask[(r0 + 1) * mw + c0] * (1.0 - fu);
        if (c0 + 1 >= 0 && c0 + 1 < mw) bottom += mask[(r0 + 1) * mw + c0 + 1] * fu;
    }
    return top * (1.0 - fv) + bottom * fv;
}

extern "C" __global__ void paste_masks(const double* masks, const double* boxes, int n, int mh, int mw,
                                       int height, int width, double threshold, bool* out) {
    long long total = (long long)n * height * width;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total;
         k += (long long)blockDim.x * gridDim.x) {
        int px = (int)(k % width);
        int py = (int)((k / width) % height);
        int i = (int)(k / ((long long)width * height));
        double x0 = boxes[4 * i], y0 = boxes[4 * i + 1], x1 = boxes[4 * i + 2], y1 = boxes[4 * i + 3];
        double w = x1 - x0, h = y1 - y0;
        bool inside = false;
        if (w > 0 && h > 0) {
            double u = ((px + 0.5) - x0) / w * mw - 0.5;
            double v = ((py + 0.5) - y0) / h * mh - 0.5;
            // Only pixels whose sample can be non-zero need the mask; the rest are simply false.
            if (u > -1.0 && u < mw && v > -1.0 && v < mh)
                inside = sample_zero_padded(masks + (long long)i * mh * mw, mh, mw, v, u) >= threshold;
        }
        out[k] = inside;
    }
}
"""

CUDA_SOURCES = {
    # --fmad=false: keep a*b + c as two roundings, as NumPy and Numba do (see the docstring).
    "paste_masks": CudaSource(_CUDA_SOURCE, kernels=("paste_masks",), options=("--fmad=false",)),
}


def paste_masks_cupy(masks, boxes, image_shape, threshold):
    """``paste_masks_reference(...)`` thresholded, on CuPy arrays: one CUDA thread per pixel."""
    import cupy

    masks = cupy.ascontiguousarray(masks, dtype=cupy.float64)
    boxes = cupy.ascontiguousarray(cupy.asarray(boxes), dtype=cupy.float64).reshape(-1, 4)
    n, mh, mw = masks.shape
    height, width = (int(s) for s in image_shape)
    out = cupy.empty((n, height, width), dtype=cupy.bool_)
    total = n * height * width
    if total:
        threads = 256
        blocks = min((total + threads - 1) // threads, 65535)
        args = (masks, boxes, np.int32(n), np.int32(mh), np.int32(mw), np.int32(height), np.int32(width),
                np.float64(threshold), out)
        cuda_function(CUDA_SOURCES["paste_masks"], "paste_masks")((blocks,), (threads,), args)
    return out


def paste_masks(masks, boxes, image_shape, threshold):
    """Thresholded paste on the masks' device: the CUDA kernel for CuPy arrays, Numba otherwise."""
    if is_cupy_array(masks):
        return paste_masks_cupy(masks, boxes, image_shape, threshold)
    return paste_masks_numba(masks, boxes, image_shape, threshold)
