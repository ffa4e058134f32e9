"""RoIAlign kernels: forward and backward, in three layers (paper Sec. 3, "RoIAlign", Fig. 3).

RoIAlign turns a box of any size on a feature map into a fixed (oh, ow) grid of features
without any rounding: the box is cut into oh x ow bins, a few regularly spaced points are
sampled in each bin by bilinear interpolation of the four nearest feature cells, and the bin
is the mean of its samples.  Because nothing is quantized, the pooled features stay aligned
with the pixels; the paper measures this alignment as +3 mask AP over RoIPool at stride 16
(Table 2c) and much more at stride 32 (Table 2d: +10.5 AP^75).

The rules, exactly those of torchvision's C++/CUDA ``roi_align`` (so that the same numbers give
the same results); for a box [b, x1, y1, x2, y2] on an (H, W) map and output (oh, ow):

1. Scale the box to the map: start = x1 * spatial_scale, end = x2 * spatial_scale (y alike).
   ``aligned=True`` then subtracts 0.5 from both: a pixel's value sits at its centre, so the
   continuous coordinate of cell j's centre is j + 0.5 (Detectron2's fix of the half-pixel
   shift).  ``aligned=False`` is the legacy behaviour of the paper's era: no shift, and the box
   width and height are clamped to at least 1 (so a tiny box still covers one cell).
2. The bins have size bin_h = roi_h / oh, bin_w = roi_w / ow.
3. Each bin samples a grid of gh x gw points: gh = sampling_ratio when it is > 0, otherwise
   ceil(roi_h / oh) (about one point per feature cell); gw alike.  Point (iy, ix) of bin (ph,
   pw) sits at y = start_y + ph * bin_h + (iy + 0.5) * bin_h / gh, x alike.
4. Bilinear interpolation at (y, x): a point with y < -1 or y > H (or x < -1 or x > W) lies
   too far outside the map and contributes 0.  Otherwise y and x are clamped at 0 from below;
   y_low = floor(y) and y_high = y_low + 1, except that when y_low >= H - 1 both become H - 1
   and y is set to H - 1 (the border rule: the last row is repeated).  With ly = y - y_low,
   hy = 1 - ly (x alike) the four weights are hy*hx, hy*lx, ly*hx, ly*lx.
5. The bin's value is the sum of its samples divided by count = max(gh * gw, 1); samples that
   fell outside (rule 4) still count in the divisor.

RoIAlign is linear in the features: out = A x for a sparse matrix A that depends only on the
boxes.  So the backward is the transpose: each output gradient is spread back to the four
cells of each sample with the same weights / count (scatter-add, since bins and boxes overlap).

Coordinates are computed in float64 here in all three layers (torchvision uses the feature
dtype); for float32 features this changes the sample positions by ~1e-7 of a cell.

The three layers, each tested against the one before:
- ``roi_align_reference`` / ``roi_align_backward_reference``: plain Python loops over boxes,
  bins and samples (vectorized over channels only), reading like the rules above.
- Numba (NumPy arrays): see ``_forward_numba`` for the memory layout that makes it fast.
- CuPy ``RawKernel`` (CuPy arrays): one GPU thread per output element, atomicAdd in backward.
``roi_align_forward`` / ``roi_align_backward`` pick the layer from the array type.
"""

import math

import numpy as np
from numba import njit, prange

from ..backend import is_cupy_array
from .cuda_sources import CudaSource, cuda_function


# ---- 1. the reference: plain Python, one sample at a time ------------------------------------
def roi_geometry(roi, output_size, spatial_scale, sampling_ratio, aligned):
    """(batch index, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count) of one box (rules 1-3, 5)."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in roi[1:5])
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: a box is at least one cell wide
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / oh)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / ow)
    count = max(grid_h * grid_w, 1)
    return int(roi[0]), y1, x1, bin_h, bin_w, grid_h, grid_w, count


def bilinear_neighbours(y, x, height, width):
    """The four (row, col, weight) that interpolate the map at (y, x), or [] outside (rule 4)."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:  # border rule: repeat the last row
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
            (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def bin_samples(geometry, ph, pw, height, width):
    """All (row, col, weight) terms of bin (ph, pw): the bin = sum of weight * x[row, col] / count."""
    _, y0, x0, bin_h, bin_w, grid_h, grid_w, _ = geometry
    terms = []
    for iy in range(grid_h):
        y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
            x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            terms += bilinear_neighbours(y, x, height, width)
    return terms


def roi_align_reference(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """RoIAlign forward as plain loops: out[k, :, ph, pw] = mean of the bin's bilinear samples."""
    x = np.asarray(x)
    _, C, H, W = x.shape
    oh, ow = output_size
    out = np.zeros((len(rois), C, oh, ow), dtype=x.dtype)
    for k, roi in enumerate(np.asarray(rois, dtype=np.float64)):
        geo = roi_geometry(roi, output_size, spatial_scale, sampling_ratio, aligned)
        n, count = geo[0], geo[-1]
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(C, dtype=np.float64)
                for row, col, weight in bin_samples(geo, ph, pw, H, W):
                    acc += weight * x[n, :, row, col]
                out[k, :, ph, pw] = acc / count
    return out


def roi_align_backward_reference(gy, rois, x_shape, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """RoIAlign backward as plain loops: each sample gives weight / count of the bin's gradient back."""
    gy = np.asarray(gy)
    _, C, H, W = x_shape
    oh, ow = gy.shape[2:]
    gx = np.zeros(x_shape, dtype=np.float64)
    for k, roi in enumerate(np.asarray(rois, dtype=np.float64)):
        geo = roi_geometry(roi, (oh, ow), spatial_scale, sampling_ratio, aligned)
        n, count = geo[0], geo[-1]
        for ph in range(oh):
            for pw in range(ow):
                for row, col, weight in bin_samples(geo, ph, pw, H, W):
                    gx[n, :, row, col] += weight / count * gy[k, :, ph, pw]
    return gx.astype(gy.dtype)


# ---- 2. Numba, for NumPy arrays ----------------------------------------------------------------
@njit(cache=True)
def _geometry(roi, oh, ow, spatial_scale, sampling_ratio, aligned):
    """Rules 1-3 and 5 for one box (the same as ``roi_geometry``)."""
    offset = 0.5 if aligned else 0.0
    x1 = roi[1] * spatial_scale - offset
    y1 = roi[2] * spatial_scale - offset
    roi_w = roi[3] * spatial_scale - offset - x1
    roi_h = roi[4] * spatial_scale - offset - y1
    if not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / oh))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / ow))
    count = max(grid_h * grid_w, 1)
    return int(roi[0]), y1, x1, roi_h / oh, roi_w / ow, grid_h, grid_w, count


@njit(cache=True)
def _bilinear(y, x, height, width):
    """Rule 4 (as ``bilinear_neighbours``): (inside, y_low, y_high, x_low, x_high, 4 weights)."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return False, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_low = height - 1
        y_high = y_low
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = width - 1
        x_high = x_low
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return True, y_low, y_high, x_low, x_high, hy * hx, hy * lx, ly * hx, ly * lx


@njit(cache=True)
def _span(start, bin_size, grid, bins, size):
    """First and last cell (inclusive) that the samples along one axis can read."""
    first = start + 0.5 * bin_size / max(grid, 1)
    last = start + (bins - 1) * bin_size + (grid - 0.5) * bin_size / max(grid, 1)
    lo, hi = max(min(first, last), 0.0), max(max(first, last), 0.0)
    return min(int(lo), size - 1), min(int(hi) + 1, size - 1)


@njit(cache=True, parallel=True)
def _windows(rois, oh, ow, spatial_scale, sampling_ratio, aligned, height, width):
    """(K, 4) rows [row0, row1, col0, col1]: the window of cells each box's samples read."""
    out = np.empty((rois.shape[0], 4), dtype=np.int64)
    for k in prange(rois.shape[0]):
        n, y0, x0, bin_h, bin_w, grid_h, grid_w, count = _geometry(rois[k], oh, ow, spatial_scale,
                                                                    sampling_ratio, aligned)
        out[k, 0], out[k, 1] = _span(y0, bin_h, grid_h, oh, height)
        out[k, 2], out[k, 3] = _span(x0, bin_w, grid_w, ow, width)
    return out


@njit(cache=True, inline="never")
def _add_sample(acc, src, yl, yh, xl, xh, w1, w2, w3, w4):
    """acc += the bilinear mix of 4 cells of src (rows, cols, C), over the channels.

    A separate function so that the compiler sees one simple loop it can vectorize; cells are
    passed as indices, not as views (each view would touch src's reference count, an atomic
    shared by all threads)."""
    for i in range(acc.shape[0]):
        acc[i] += w1 * src[yl, xl, i] + w2 * src[yl, xh, i] + w3 * src[yh, xl, i] + w4 * src[yh, xh, i]


@njit(cache=True, parallel=True)
def _forward_numba(x, feat, windows, rois, oh, ow, spatial_scale, sampling_ratio, aligned, whole_map, out):
    """out[k, c, ph, pw] for every box; prange over boxes (they are independent).

    Why channels-last: the four weights and cells of a sample are the same for every channel,
    so they are computed once per sample and the innermost loop runs over the C channels of
    the four cells, which are contiguous in (H, W, C) memory: the compiler vectorizes it (SIMD)
    and every cache line fetched is fully used.  In (C, H, W) the same loop would jump H*W
    elements per channel.  The channels-last features come from one of two places:

    - ``whole_map``: ``feat`` (N, H, W, C), one transposed copy of x shared by all boxes; or
    - each box copies just the window of cells it reads from x (N, C, H, W) into its own
      (rows, cols, C) buffer: less memory when boxes are small next to the map (a 200x336 FPN
      level is 138 MB at 256 channels, a box there reads a few hundred cells).  In practice
      this copy loop is slower than NumPy's transpose of the whole map, so the forward uses
      the map unless told otherwise (the backward is another story: ``_use_whole_map``).
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for k in prange(rois.shape[0]):
        n, y0, x0, bin_h, bin_w, grid_h, grid_w, count = _geometry(rois[k], oh, ow, spatial_scale,
                                                                    sampling_ratio, aligned)
        if whole_map:
            src = feat[n]
            r0, c0 = 0, 0
        else:
            r0, r1, c0, c1 = windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3]
            src = np.empty((r1 - r0 + 1, c1 - c0 + 1, C), dtype=x.dtype)
            for c in range(C):
                for i in range(r1 - r0 + 1):
                    for j in range(c1 - c0 + 1):
                        src[i, j, c] = x[n, c, r0 + i, c0 + j]
        acc = np.empty(C, dtype=out.dtype)
        w = np.empty(4, dtype=out.dtype)  # weights in the feature dtype: float32 SIMD for float32
        for ph in range(oh):
            for pw in range(ow):
                acc[:] = 0
                for iy in range(grid_h):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        xx = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        inside, yl, yh, xl, xh, w[0], w[1], w[2], w[3] = _bilinear(y, xx, H, W)
                        if inside:
                            yl, yh, xl, xh = yl - r0, yh - r0, xl - c0, xh - c0
                            _add_sample(acc, src, yl, yh, xl, xh, w[0], w[1], w[2], w[3])
                for c in range(C):
                    out[k, c, ph, pw] = acc[c] / count


@njit(cache=True, inline="never")
def _scatter_sample(dst, yl, yh, xl, xh, g, w1, w2, w3, w4):
    """dst[cell, i] += w_cell g[i] for the 4 cells, over a block of channels (see _add_sample).

    One loop per cell: at the border two cells can be the same (rule 4), and a single loop
    writing four possibly-equal places is one the compiler will not vectorize."""
    n = g.shape[0]
    for i in range(n):
        dst[yl, xl, i] += w1 * g[i]
    for i in range(n):
        dst[yl, xh, i] += w2 * g[i]
    for i in range(n):
        dst[yh, xl, i] += w3 * g[i]
    for i in range(n):
        dst[yh, xh, i] += w4 * g[i]


@njit(cache=True, parallel=True)
def _backward_numba(gy, windows, rois, spatial_scale, sampling_ratio, aligned, whole_map, gx_blocks, gx):
    """The transpose of the forward: gradient for x from gy (K, C, oh, ow).

    Bins and boxes overlap, so two boxes may add into the same cell: a prange over boxes would
    race.  Instead each thread owns a block of ``chunk`` channels and walks all boxes for it;
    no two threads ever write the same element.  There is one block per thread, since every
    block recomputes all sample positions.  The innermost loop runs over contiguous channels.
    The gradient is accumulated as the forward reads, either

    - ``whole_map``: straight into ``gx_blocks`` (N, blocks, H, W, chunk), channels-last per
      block so that each thread writes its own contiguous slab, indexed from 0 (indexing an
      (N, H, W, C) array at c0 + i stopped the compiler from vectorizing: 2x slower); the
      caller puts the channels back in order; or
    - per box into a zeroed (rows, cols, chunk) window, then added into ``gx`` (N, C, H, W).
    """
    K, C, oh, ow = gy.shape
    H, W = gx.shape[2], gx.shape[3]
    n_blocks, chunk = gx_blocks.shape[1], gx_blocks.shape[4]
    for block in prange(n_blocks):
        c0 = block * chunk
        nc = min(C, c0 + chunk) - c0
        g = np.empty(nc, dtype=gx.dtype)
        w = np.empty(4, dtype=gx.dtype)
        for k in range(K):
            n, y0, x0, bin_h, bin_w, grid_h, grid_w, count = _geometry(rois[k], oh, ow, spatial_scale,
                                                                        sampling_ratio, aligned)
            if whole_map:
                dst = gx_blocks[n, block]
                r0, col0 = 0, 0
            else:
                r0, r1, col0, col1 = windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3]
                dst = np.zeros((r1 - r0 + 1, col1 - col0 + 1, chunk), dtype=gx.dtype)
            for ph in range(oh):
                for pw in range(ow):
                    for c in range(nc):
                        g[c] = gy[k, c0 + c, ph, pw] / count
                    for iy in range(grid_h):
                        y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            inside, yl, yh, xl, xh, w[0], w[1], w[2], w[3] = _bilinear(y, x, H, W)
                            if inside:
                                yl, yh, xl, xh = yl - r0, yh - r0, xl - col0, xh - col0
                                _scatter_sample(dst, yl, yh, xl, xh, g, w[0], w[1], w[2], w[3])
            if not whole_map:
                for c in range(nc):
                    for i in range(dst.shape[0]):
                        for j in range(dst.shape[1]):
                            gx[n, c0 + c, r0 + i, col0 + j] += dst[i, j, c]


def _channel_chunk(C):
    """Channels per backward block: one block per thread (at least 8 channels each).  Every
    block recomputes all sample positions, so more blocks than threads only cost time."""
    import numba

    return max(8, -(-C // numba.get_num_threads()))


def _use_whole_map(windows, x_shape, layout, default):
    """Work on one channels-last copy of the whole map, or on each box's window of cells?

    ``layout`` forces "map" or "windows".  Otherwise: the forward reads a window far more often
    than it copies it, and NumPy's transpose of the whole map is fast, so the forward uses the
    map (``default="map"``).  The backward on the map must zero, fill and transpose back a
    whole channels-last gradient, so it uses windows (``default="windows"``) when the windows
    together hold fewer than twice the map's cells (small boxes on a big map: the FPN's P2
    and P3), as measured on 2 CPU cores with the benchmark in ``minimask/bench/kernels.py``.
    """
    if layout is not None:
        if layout not in ("map", "windows"):
            raise ValueError(f"layout must be None, 'map' or 'windows', got {layout!r}")
        return layout == "map"
    if default == "map":
        return True
    cells = ((windows[:, 1] - windows[:, 0] + 1) * (windows[:, 3] - windows[:, 2] + 1)).sum()
    return cells > 2 * x_shape[0] * x_shape[2] * x_shape[3]


# ---- 3. CuPy RawKernels, for CuPy arrays ------------------------------------------------------
_CUDA_SOURCE = r"""
// Rule 4 of the module docstring; returns false for a point outside the map.
__device__ bool bilinear(double y, double x, int H, int W, int* yl, int* yh, int* xl, int* xh, double* w) {
    if (y < -1.0 || y > H || x < -1.0 || x > W) return false;
    if (y < 0) y = 0;
    if (x < 0) x = 0;
    *yl = (int)y;
    *xl = (int)x;
    if (*yl >= H - 1) { *yl = *yh = H - 1; y = (double)*yl; } else { *yh = *yl + 1; }
    if (*xl >= W - 1) { *xl = *xh = W - 1; x = (double)*xl; } else { *xh = *xl + 1; }
    double ly = y - *yl, lx = x - *xl, hy = 1.0 - ly, hx = 1.0 - lx;
    w[0] = hy * hx; w[1] = hy * lx; w[2] = ly * hx; w[3] = ly * lx;
    return true;
}

// Rules 1-3 and 5 for box r.
__device__ void geometry(const double* r, int oh, int ow, double scale, int sampling, int aligned,
                         double* y0, double* x0, double* bh, double* bw, int* gh, int* gw, double* count) {
    double offset = aligned ? 0.5 : 0.0;
    *x0 = r[1] * scale - offset;
    *y0 = r[2] * scale - offset;
    double rw = r[3] * scale - offset - *x0, rh = r[4] * scale - offset - *y0;
    if (!aligned) { rw = fmax(rw, 1.0); rh = fmax(rh, 1.0); }
    *bh = rh / oh;
    *bw = rw / ow;
    *gh = sampling > 0 ? sampling : (int)ceil(rh / oh);
    *gw = sampling > 0 ? sampling : (int)ceil(rw / ow);
    *count = (double)max(*gh * *gw, 1);
}

// One thread per output element (k, c, ph, pw) of the (K, C, oh, ow) output.
extern "C" __global__ void roi_align_forward(const T* x, const double* rois, T* out, long long total,
        int C, int H, int W, int oh, int ow, double scale, int sampling, int aligned) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int pw = i % ow, ph = (i / ow) % oh, c = (i / ow / oh) % C;
    long long k = i / ow / oh / C;
    const double* r = rois + 5 * k;
    double y0, x0, bh, bw, count; int gh, gw;
    geometry(r, oh, ow, scale, sampling, aligned, &y0, &x0, &bh, &bw, &gh, &gw, &count);
    const T* plane = x + ((long long)r[0] * C + c) * H * W;
    double acc = 0.0, w[4];
    int yl, yh, xl, xh;
    for (int iy = 0; iy < gh; iy++) {
        double y = y0 + ph * bh + (iy + 0.5) * bh / gh;
        for (int ix = 0; ix < gw; ix++) {
            double xx = x0 + pw * bw + (ix + 0.5) * bw / gw;
            if (!bilinear(y, xx, H, W, &yl, &yh, &xl, &xh, w)) continue;
            acc += w[0] * plane[yl * W + xl] + w[1] * plane[yl * W + xh]
                 + w[2] * plane[yh * W + xl] + w[3] * plane[yh * W + xh];
        }
    }
    out[i] = (T)(acc / count);
}

// One thread per output-gradient element; boxes overlap, so the adds must be atomic.
extern "C" __global__ void roi_align_backward(const T* gy, const double* rois, T* gx, long long total,
        int C, int H, int W, int oh, int ow, double scale, int sampling, int aligned) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int pw = i % ow, ph = (i / ow) % oh, c = (i / ow / oh) % C;
    long long k = i / ow / oh / C;
    const double* r = rois + 5 * k;
    double y0, x0, bh, bw, count; int gh, gw;
    geometry(r, oh, ow, scale, sampling, aligned, &y0, &x0, &bh, &bw, &gh, &gw, &count);
    T* plane = gx + ((long long)r[0] * C + c) * H * W;
    double g = (double)gy[i] / count, w[4];
    int yl, yh, xl, xh;
    for (int iy = 0; iy < gh; iy++) {
        double y = y0 + ph * bh + (iy + 0.5) * bh / gh;
        for (int ix = 0; ix < gw; ix++) {
            double xx = x0 + pw * bw + (ix + 0.5) * bw / gw;
            if (!bilinear(y, xx, H, W, &yl, &yh, &xl, &xh, w)) continue;
            atomicAdd(plane + yl * W + xl, (T)(g * w[0]));
            atomicAdd(plane + yl * W + xh, (T)(g * w[1]));
            atomicAdd(plane + yh * W + xl, (T)(g * w[2]));
            atomicAdd(plane + yh * W + xh, (T)(g * w[3]));
        }
    }
}
"""

CUDA_SOURCES = {
    "roi_align": CudaSource(_CUDA_SOURCE, kernels=("roi_align_forward", "roi_align_backward"),
                            dtypes=("float32", "float64")),
}


def _launch_cuda(name, src, rois, dst, C, H, W, oh, ow, spatial_scale, sampling_ratio, aligned):
    import cupy

    total = len(rois) * C * oh * ow
    if total == 0:
        return
    rois = cupy.ascontiguousarray(cupy.asarray(rois, dtype=cupy.float64))
    threads = 256
    cuda_function(CUDA_SOURCES["roi_align"], name, dst.dtype, "roi_align")(
        ((total + threads - 1) // threads,), (threads,),
        (cupy.ascontiguousarray(src), rois, dst, np.int64(total), np.int32(C), np.int32(H), np.int32(W),
         np.int32(oh), np.int32(ow), np.float64(spatial_scale), np.int32(sampling_ratio),
         np.int32(bool(aligned))))


# ---- dispatch ----------------------------------------------------------------------------------
def roi_align_forward(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True, layout=None):
    """(K, C, oh, ow) RoIAlign of x (N, C, H, W) over rois (K, 5); Numba or CUDA by array type.

    ``layout`` (Numba only) forces ``"map"`` or ``"windows"`` (see ``_forward_numba`` and
    ``_use_whole_map``).
    """
    N, C, H, W = x.shape
    oh, ow = output_size
    if is_cupy_array(x):
        import cupy

        out = cupy.zeros((len(rois), C, oh, ow), dtype=x.dtype)
        _launch_cuda("roi_align_forward", x, rois, out, C, H, W, oh, ow,
                     spatial_scale, sampling_ratio, aligned)
        return out
    out = np.zeros((len(rois), C, oh, ow), dtype=x.dtype)
    if len(rois) == 0 or x.size == 0:
        return out
    rois = np.ascontiguousarray(rois, dtype=np.float64)
    settings = float(spatial_scale), int(sampling_ratio), bool(aligned)
    windows = _windows(rois, oh, ow, *settings, H, W)
    whole_map = _use_whole_map(windows, x.shape, layout, "map")
    if whole_map:
        x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    else:
        x_last = np.empty((1, 1, 1, C), dtype=x.dtype)  # not read
    _forward_numba(np.ascontiguousarray(x), x_last, windows, rois, oh, ow, *settings, whole_map, out)
    return out


def roi_align_backward(gy, rois, x_shape, spatial_scale=1.0, sampling_ratio=0, aligned=True, layout=None):
    """Gradient (N, C, H, W) of RoIAlign for the output gradient gy (K, C, oh, ow)."""
    N, C, H, W = x_shape
    K, _, oh, ow = gy.shape
    if is_cupy_array(gy):
        import cupy

        gx = cupy.zeros(x_shape, dtype=gy.dtype)
        _launch_cuda("roi_align_backward", gy, rois, gx, C, H, W, oh, ow,
                     spatial_scale, sampling_ratio, aligned)
        return gx
    gx = np.zeros(x_shape, dtype=gy.dtype)
    if K == 0 or gx.size == 0:
        return gx
    rois = np.ascontiguousarray(rois, dtype=np.float64)
    settings = float(spatial_scale), int(sampling_ratio), bool(aligned)
    windows = _windows(rois, oh, ow, *settings, H, W)
    whole_map = _use_whole_map(windows, x_shape, layout, "windows")
    chunk = _channel_chunk(C)
    n_blocks = -(-C // chunk)
    shape = (N, n_blocks, H, W, chunk) if whole_map else (1, n_blocks, 1, 1, chunk)  # the latter unused
    gx_blocks = np.zeros(shape, dtype=gy.dtype)
    _backward_numba(np.ascontiguousarray(gy), windows, rois, *settings, whole_map, gx_blocks, gx)
    if whole_map:  # (N, blocks, H, W, chunk) -> (N, C, H, W)
        gx = gx_blocks.transpose(0, 1, 4, 2, 3).reshape(N, n_blocks * chunk, H, W)[:, :C]
        gx = np.ascontiguousarray(gx)
    return gx
