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
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


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


@njit(cache=True, inline="never")
def _add_sample(acc, a, b, c, d, w1, w2, w3, w4):
    """acc += w1 a + w2 b + w3 c + w4 d over the channels (a loop the compiler vectorizes)."""
    for i in range(acc.shape[0]):
        acc[i] += w1 * a[i] + w2 * b[i] + w3 * c[i] + w4 * d[i]


@njit(cache=True, parallel=True)
def _forward_numba(feat, rois, oh, ow, spatial_scale, sampling_ratio, aligned, out):
    """out[k, c, ph, pw] for every box, from channels-last features ``feat`` (N, H, W, C).

    Why channels-last: the four weights and cell indices of a sample are the same for every
    channel, so they are computed once per sample and the innermost loop runs over the C
    channels of the four cells, which are contiguous in (N, H, W, C) memory: the compiler
    vectorizes it (SIMD), and every cache line fetched is fully used.  In (N, C, H, W) the same
    loop would jump H*W elements per channel.  Boxes are independent: prange over boxes.
    """
    H, W, C = feat.shape[1], feat.shape[2], feat.shape[3]
    for k in prange(rois.shape[0]):
        n, y0, x0, bin_h, bin_w, grid_h, grid_w, count = _geometry(rois[k], oh, ow, spatial_scale,
                                                                    sampling_ratio, aligned)
        acc = np.empty(C, dtype=out.dtype)
        w = np.empty(4, dtype=out.dtype)  # weights in the feature dtype: float32 SIMD for float32
        for ph in range(oh):
            for pw in range(ow):
                acc[:] = 0
                for iy in range(grid_h):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        inside, yl, yh, xl, xh, w[0], w[1], w[2], w[3] = _bilinear(y, x, H, W)
                        if inside:
                            _add_sample(acc, feat[n, yl, xl], feat[n, yl, xh], feat[n, yh, xl], feat[n, yh, xh],
                                        w[0], w[1], w[2], w[3])
                for c in range(C):
                    out[k, c, ph, pw] = acc[c] / count


@njit(cache=True, inline="never")
def _scatter_sample(a, b, c, d, g, w1, w2, w3, w4):
    """a += w1 g, b += w2 g, c += w3 g, d += w4 g over a block of channels (vectorized loop)."""
    for i in range(g.shape[0]):
        a[i] += w1 * g[i]
        b[i] += w2 * g[i]
        c[i] += w3 * g[i]
        d[i] += w4 * g[i]


@njit(cache=True, parallel=True)
def _backward_numba(gy, rois, spatial_scale, sampling_ratio, aligned, chunk, gx):
    """gx (N, H, W, C, channels-last, zeroed) += the transpose of the forward, for gy (K, C, oh, ow).

    Bins and boxes overlap, so two boxes may add into the same cell: a prange over boxes would
    race.  Instead each thread owns a block of ``chunk`` channels and walks all boxes for it;
    no two threads ever write the same element.  The sample geometry is recomputed per block
    (cheap next to the channel loop), and the innermost loop again runs over contiguous
    channels of gx.  The block's slice of a bin's gradient is gathered once into ``g``.
    """
    K, C, oh, ow = gy.shape
    H, W = gx.shape[1], gx.shape[2]
    n_blocks = (C + chunk - 1) // chunk
    for block in prange(n_blocks):
        c0 = block * chunk
        c1 = min(C, c0 + chunk)
        g = np.empty(c1 - c0, dtype=gx.dtype)
        w = np.empty(4, dtype=gx.dtype)
        for k in range(K):
            n, y0, x0, bin_h, bin_w, grid_h, grid_w, count = _geometry(rois[k], oh, ow, spatial_scale,
                                                                        sampling_ratio, aligned)
            for ph in range(oh):
                for pw in range(ow):
                    for c in range(c0, c1):
                        g[c - c0] = gy[k, c, ph, pw] / count
                    for iy in range(grid_h):
                        y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            inside, yl, yh, xl, xh, w[0], w[1], w[2], w[3] = _bilinear(y, x, H, W)
                            if inside:
                                _scatter_sample(gx[n, yl, xl, c0:c1], gx[n, yl, xh, c0:c1], gx[n, yh, xl, c0:c1],
                                                gx[n, yh, xh, c0:c1], g, w[0], w[1], w[2], w[3])


def channels_last(x):
    """x (N, C, H, W) as a contiguous (N, H, W, C) array (free when x is already laid out so)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _channel_chunk(C):
    """Channels per backward block: enough blocks for every thread, at least 8 channels each."""
    import numba

    blocks = 4 * numba.get_num_threads()
    return max(8, -(-C // blocks))


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

_cuda_kernels = {}


def _cuda_kernel(name, dtype):
    """The compiled kernel ``name`` for float32 or float64 (compiled once, then cached)."""
    import cupy

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"roi_align on the GPU supports float32 and float64, got {dtype}")
    key = (name, dtype.char)
    if key not in _cuda_kernels:
        ctype = "float" if dtype == np.float32 else "double"
        module = cupy.RawModule(code=f"typedef {ctype} T;\n" + _CUDA_SOURCE)
        _cuda_kernels[key] = module.get_function(name)
    return _cuda_kernels[key]


def _launch_cuda(name, src, rois, dst, C, H, W, oh, ow, spatial_scale, sampling_ratio, aligned):
    import cupy

    total = len(rois) * C * oh * ow
    if total == 0:
        return
    rois = cupy.ascontiguousarray(rois, dtype=cupy.float64)
    threads = 256
    _cuda_kernel(name, dst.dtype)(
        ((total + threads - 1) // threads,), (threads,),
        (cupy.ascontiguousarray(src), rois, dst, np.int64(total), np.int32(C), np.int32(H), np.int32(W),
         np.int32(oh), np.int32(ow), np.float64(spatial_scale), np.int32(sampling_ratio), np.int32(bool(aligned))))


# ---- dispatch ----------------------------------------------------------------------------------
def roi_align_forward(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """(K, C, oh, ow) RoIAlign of x (N, C, H, W) over rois (K, 5); Numba or CUDA by array type."""
    N, C, H, W = x.shape
    oh, ow = output_size
    if is_cupy_array(x):
        import cupy

        out = cupy.zeros((len(rois), C, oh, ow), dtype=x.dtype)
        _launch_cuda("roi_align_forward", x, rois, out, C, H, W, oh, ow, spatial_scale, sampling_ratio, aligned)
        return out
    out = np.zeros((len(rois), C, oh, ow), dtype=x.dtype)
    if len(rois) and C:
        rois = np.ascontiguousarray(rois, dtype=np.float64)
        _forward_numba(channels_last(x), rois, oh, ow, float(spatial_scale), int(sampling_ratio), bool(aligned), out)
    return out


def roi_align_backward(gy, rois, x_shape, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """Gradient (N, C, H, W) of RoIAlign for the output gradient gy (K, C, oh, ow)."""
    N, C, H, W = x_shape
    K, _, oh, ow = gy.shape
    if is_cupy_array(gy):
        import cupy

        gx = cupy.zeros(x_shape, dtype=gy.dtype)
        _launch_cuda("roi_align_backward", gy, rois, gx, C, H, W, oh, ow, spatial_scale, sampling_ratio, aligned)
        return gx
    if K == 0 or C == 0:
        return np.zeros(x_shape, dtype=gy.dtype)
    rois = np.ascontiguousarray(rois, dtype=np.float64)
    gx_last = np.zeros((N, H, W, C), dtype=gy.dtype)
    _backward_numba(np.ascontiguousarray(gy), rois, float(spatial_scale), int(sampling_ratio), bool(aligned),
                    _channel_chunk(C), gx_last)
    return np.ascontiguousarray(gx_last.transpose(0, 3, 1, 2))
