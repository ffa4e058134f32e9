"""RoIPool kernels: the quantized max pooling of Fast R-CNN, in three layers.

Mask R-CNN's paper (Sec. 3, "RoIAlign", Fig. 3) explains what is wrong with RoIPool: the box
is rounded to the feature grid, and so are its bin edges, so the pooled features are shifted
by up to a cell from the box (16 pixels at stride 16).  That hardly matters for classifying a
box but hurts pixel-accurate masks; Table 2c/2d and Table 3 compare it with RoIAlign.  It is
kept here for those ablations.

The rules, exactly those of torchvision's C++/CUDA ``roi_pool``, for a box [b, x1, y1, x2, y2]
on an (H, W) map and output (oh, ow):

1. Round the scaled box to cells: start_x = round(x1 * spatial_scale), end_x = round(x2 *
   spatial_scale) (round half away from zero, as C's ``round``; NumPy's rounds half to even).
   The box covers cells start..end inclusive: roi_w = max(end_x - start_x + 1, 1) (y alike).
2. Bin (ph, pw) covers rows floor(ph * roi_h / oh) .. ceil((ph + 1) * roi_h / oh) - 1 (relative
   to start_y), columns alike, clipped to the map [0, H) x [0, W).
3. The bin's value is the maximum over its cells (the first one in row-major order wins a tie);
   an empty bin (clipped away) gives 0.
4. Backward: the bin's gradient goes entirely to the arg-max cell (none for an empty bin).

Bin edges are computed in float64 in all three layers (torchvision uses the feature dtype);
in float32 an edge that falls exactly on an integer can, rarely, land one cell apart.

Layers: ``roi_pool_reference`` (plain loops), Numba (NumPy arrays), CuPy ``RawKernel`` (CuPy
arrays); ``roi_pool_forward`` / ``roi_pool_backward`` pick one by array type.  The forward
returns the arg-max (flat index h * W + w in the box's image and channel, -1 for an empty bin)
which the backward needs.
"""

import math

import numpy as np
from numba import njit, prange

from ..backend import is_cupy_array
from .cuda_sources import CudaSource, cuda_function


def round_half_away(v):
    """C's ``round``: halves go away from zero (2.5 -> 3, -2.5 -> -3)."""
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


# ---- 1. the reference: plain loops --------------------------------------------------------------
def bin_window(roi, ph, pw, output_size, spatial_scale, height, width):
    """(h_start, h_end, w_start, w_end) of bin (ph, pw), end exclusive, clipped (rules 1-2)."""
    oh, ow = output_size
    start_x, start_y, end_x, end_y = (round_half_away(float(v) * spatial_scale) for v in roi[1:5])
    roi_w, roi_h = max(end_x - start_x + 1, 1), max(end_y - start_y + 1, 1)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    h0 = min(max(math.floor(ph * bin_h) + start_y, 0), height)
    h1 = min(max(math.ceil((ph + 1) * bin_h) + start_y, 0), height)
    w0 = min(max(math.floor(pw * bin_w) + start_x, 0), width)
    w1 = min(max(math.ceil((pw + 1) * bin_w) + start_x, 0), width)
    return h0, h1, w0, w1


def roi_pool_reference(x, rois, output_size, spatial_scale=1.0):
    """RoIPool forward as plain loops: (out (K, C, oh, ow), argmax (K, C, oh, ow))."""
    x = np.asarray(x)
    _, C, H, W = x.shape
    oh, ow = output_size
    out = np.zeros((len(rois), C, oh, ow), dtype=x.dtype)
    argmax = np.full((len(rois), C, oh, ow), -1, dtype=np.int64)
    for k, roi in enumerate(np.asarray(rois, dtype=np.float64)):
        n = int(roi[0])
        for ph in range(oh):
            for pw in range(ow):
                h0, h1, w0, w1 = bin_window(roi, ph, pw, output_size, spatial_scale, H, W)
                for c in range(C):
                    best, best_idx = None, -1
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            if best_idx < 0 or x[n, c, h, w] > best:  # strict >: the first maximum wins a tie
                                best, best_idx = x[n, c, h, w], h * W + w
                    if best_idx >= 0:
                        out[k, c, ph, pw], argmax[k, c, ph, pw] = best, best_idx
    return out, argmax


def roi_pool_backward_reference(gy, rois, argmax, x_shape):
    """RoIPool backward as plain loops: each bin's gradient goes to its arg-max cell."""
    gx = np.zeros(x_shape, dtype=gy.dtype)
    W = x_shape[3]
    for k, roi in enumerate(np.asarray(rois, dtype=np.float64)):
        n = int(roi[0])
        for c, ph, pw in np.ndindex(*gy.shape[1:]):
            idx = argmax[k, c, ph, pw]
            if idx >= 0:
                gx[n, c, idx // W, idx % W] += gy[k, c, ph, pw]
    return gx


# ---- 2. Numba, for NumPy arrays ------------------------------------------------------------------
@njit(cache=True)
def _round_half_away(v):
    r = math.floor(abs(v) + 0.5)
    return int(r) if v >= 0 else -int(r)


@njit(cache=True, inline="never")
def _take_max(best, best_idx, src, h, w, idx):
    """Per channel: keep src[h, w, c] if it beats best[c] (strict >: the first maximum wins).

    A loop over contiguous channels that the compiler vectorizes (compare and select)."""
    for c in range(best.shape[0]):
        v = src[h, w, c]
        if v > best[c]:
            best[c] = v
            best_idx[c] = idx


@njit(cache=True, parallel=True)
def _forward_numba(feat, rois, oh, ow, spatial_scale, out, argmax):
    """Boxes are independent: prange over boxes.  ``feat`` is channels-last (N, H, W, C), so
    each cell of a bin's window updates the running maximum of all channels at once (the same
    layout reason as in roi_align.py's ``_forward_numba``)."""
    H, W, C = feat.shape[1], feat.shape[2], feat.shape[3]
    for k in prange(rois.shape[0]):
        n = int(rois[k, 0])
        start_x = _round_half_away(rois[k, 1] * spatial_scale)
        start_y = _round_half_away(rois[k, 2] * spatial_scale)
        roi_w = max(_round_half_away(rois[k, 3] * spatial_scale) - start_x + 1, 1)
        roi_h = max(_round_half_away(rois[k, 4] * spatial_scale) - start_y + 1, 1)
        bin_h = roi_h / oh
        bin_w = roi_w / ow
        best = np.empty(C, dtype=out.dtype)
        best_idx = np.empty(C, dtype=np.int64)
        src = feat[n]
        for ph in range(oh):
            h0 = min(max(int(math.floor(ph * bin_h)) + start_y, 0), H)
            h1 = min(max(int(math.ceil((ph + 1) * bin_h)) + start_y, 0), H)
            for pw in range(ow):
                w0 = min(max(int(math.floor(pw * bin_w)) + start_x, 0), W)
                w1 = min(max(int(math.ceil((pw + 1) * bin_w)) + start_x, 0), W)
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: out stays 0, argmax -1
                best[:] = src[h0, w0]  # the first cell, then the others in row-major order
                best_idx[:] = h0 * W + w0
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        if h > h0 or w > w0:
                            _take_max(best, best_idx, src, h, w, h * W + w)
                for c in range(C):
                    out[k, c, ph, pw] = best[c]
                    argmax[k, c, ph, pw] = best_idx[c]


@njit(cache=True, parallel=True)
def _backward_numba(gy, rois, argmax, gx):
    """gx[n, c, argmax] += gy.  Boxes overlap, so prange over channels (never over boxes):
    two threads never touch the same channel plane."""
    K, C, oh, ow = gy.shape
    W = gx.shape[3]
    for c in prange(C):
        for k in range(K):
            n = int(rois[k, 0])
            for ph in range(oh):
                for pw in range(ow):
                    idx = argmax[k, c, ph, pw]
                    if idx >= 0:
                        gx[n, c, idx // W, idx % W] += gy[k, c, ph, pw]


# ---- 3. CuPy RawKernels, for CuPy arrays ------------------------------------------------------
_CUDA_SOURCE = r"""
// One thread per output element (k, c, ph, pw); rules 1-3 of the module docstring.
extern "C" __global__ void roi_pool_forward(const T* x, const double* rois, T* out, long long* argmax,
        long long total, int C, int H, int W, int oh, int ow, double scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int pw = i % ow, ph = (i / ow) % oh, c = (i / ow / oh) % C;
    long long k = i / ow / oh / C;
    const double* r = rois + 5 * k;
    int sx = (int)round(r[1] * scale), sy = (int)round(r[2] * scale);  // round: half away from 0
    int rw = max((int)round(r[3] * scale) - sx + 1, 1), rh = max((int)round(r[4] * scale) - sy + 1, 1);
    double bh = (double)rh / oh, bw = (double)rw / ow;
    int h0 = min(max((int)floor(ph * bh) + sy, 0), H), h1 = min(max((int)ceil((ph + 1) * bh) + sy, 0), H);
    int w0 = min(max((int)floor(pw * bw) + sx, 0), W), w1 = min(max((int)ceil((pw + 1) * bw) + sx, 0), W);
    const T* plane = x + ((long long)r[0] * C + c) * H * W;
    T best = 0;
    long long best_idx = -1;
    for (int h = h0; h < h1; h++)
        for (int w = w0; w < w1; w++)
            if (best_idx < 0 || plane[h * W + w] > best) { best = plane[h * W + w]; best_idx = h * W + w; }
    out[i] = best_idx < 0 ? (T)0 : best;
    argmax[i] = best_idx;
}

// One thread per output-gradient element: gx[arg-max] += gy, atomically (boxes overlap).
extern "C" __global__ void roi_pool_backward(const T* gy, const double* rois, const long long* argmax, T* gx,
        long long total, int C, int H, int W, int oh, int ow) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total || argmax[i] < 0) return;
    int c = (i / ow / oh) % C;
    long long k = i / ow / oh / C;
    atomicAdd(gx + ((long long)rois[5 * k] * C + c) * H * W + argmax[i], gy[i]);
}
"""

CUDA_SOURCES = {
    "roi_pool": CudaSource(_CUDA_SOURCE, kernels=("roi_pool_forward", "roi_pool_backward"),
                           dtypes=("float32", "float64")),
}


def _cuda_kernel(name, dtype):
    """The compiled kernel ``name`` for float32 or float64 features."""
    return cuda_function(CUDA_SOURCES["roi_pool"], name, dtype, "roi_pool")


def _device_rois(rois):
    """rois as a contiguous float64 CuPy array (the kernels read them as double)."""
    import cupy

    return cupy.ascontiguousarray(cupy.asarray(rois, dtype=cupy.float64))


# ---- dispatch ----------------------------------------------------------------------------------
def roi_pool_forward(x, rois, output_size, spatial_scale=1.0):
    """(out, argmax), each (K, C, oh, ow); Numba or CUDA by array type."""
    N, C, H, W = x.shape
    oh, ow = output_size
    K = len(rois)
    if is_cupy_array(x):
        import cupy

        out = cupy.zeros((K, C, oh, ow), dtype=x.dtype)
        argmax = cupy.full((K, C, oh, ow), -1, dtype=cupy.int64)
        total = K * C * oh * ow
        if total:
            threads = 256
            _cuda_kernel("roi_pool_forward", x.dtype)(
                ((total + threads - 1) // threads,), (threads,),
                (cupy.ascontiguousarray(x), _device_rois(rois), out, argmax,
                 np.int64(total), np.int32(C), np.int32(H), np.int32(W), np.int32(oh), np.int32(ow),
                 np.float64(spatial_scale)))
        return out, argmax
    out = np.zeros((K, C, oh, ow), dtype=x.dtype)
    argmax = np.full((K, C, oh, ow), -1, dtype=np.int64)
    if K and C and H and W:
        x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # channels-last (see _forward_numba)
        _forward_numba(x_last, np.ascontiguousarray(rois, dtype=np.float64), oh, ow, float(spatial_scale),
                       out, argmax)
    return out, argmax


def roi_pool_backward(gy, rois, argmax, x_shape):
    """Gradient (N, C, H, W) of RoIPool: each bin's gradient added at its arg-max."""
    N, C, H, W = x_shape
    if is_cupy_array(gy):
        import cupy

        gx = cupy.zeros(x_shape, dtype=gy.dtype)
        total = gy.size
        if total:
            threads = 256
            _cuda_kernel("roi_pool_backward", gy.dtype)(
                ((total + threads - 1) // threads,), (threads,),
                (cupy.ascontiguousarray(gy), _device_rois(rois), argmax, gx,
                 np.int64(total), np.int32(C), np.int32(H), np.int32(W), np.int32(gy.shape[2]),
                 np.int32(gy.shape[3])))
        return gx
    gx = np.zeros(x_shape, dtype=gy.dtype)
    if gy.size:
        _backward_numba(np.ascontiguousarray(gy), np.ascontiguousarray(rois, dtype=np.float64), argmax, gx)
    return gx
