"""RoIAlign and RoIPool as differentiable Functions (paper Sec. 3, "RoIAlign", Fig. 3).

Both turn each region of interest (a box on a feature map) into a fixed-size grid of
features, (K, C, oh, ow) for K boxes, which the box and mask heads then process like small
images.  RoIPool (Fast R-CNN) rounds the box and its bins to the feature grid and takes the
maximum in each bin; RoIAlign (Mask R-CNN) rounds nothing and averages bilinearly sampled
points, which keeps the features aligned with the pixels: Table 2c (+3 mask AP at stride 16)
and Table 3 of the paper.

The gradient flows to the features only: the boxes ``rois`` are a plain (K, 5) array of
[batch_index, x1, y1, x2, y2] in image pixels (``spatial_scale`` = 1 / stride maps them to the
feature map), as in torchvision, so the same numbers give the same results.

    RoIAlign:  out = A x,            gx = A^T gy         (A: bilinear weights / samples per bin)
    RoIPool:   out = x[argmax],      gx[argmax] += gy    (the gradient of a max is the arg-max)

The loops live in ``minimask/kernels/roi_align.py`` and ``roi_pool.py`` (reference, Numba, CUDA),
where the exact sampling rules are written out.
"""

import numpy as np

from ..backend import get_array_module, is_cupy_array, to_device
from ..kernels.roi_align import roi_align_backward, roi_align_forward
from ..kernels.roi_pool import roi_pool_backward, roi_pool_forward
from ..tensor import Function, Tensor, as_tensor


def _output_size(output_size):
    """(oh, ow) from an int or a pair, both positive."""
    if isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    oh, ow = (int(v) for v in output_size)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    return oh, ow


def _check(x, rois, name):
    """rois as a float64 array on x's device, after checking shapes and batch indices."""
    if x.ndim != 4:
        raise ValueError(f"{name}: features must be (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: features must be float32 or float64, got {x.dtype}")
    if isinstance(rois, Tensor):
        rois = rois.data
    xp = get_array_module(x)
    if is_cupy_array(x) != is_cupy_array(rois):
        rois = to_device(rois, "gpu" if is_cupy_array(x) else "cpu")
    rois = xp.asarray(rois, dtype=xp.float64)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"{name}: rois must be (K, 5) rows of [batch_index, x1, y1, x2, y2], "
                         f"got shape {rois.shape}")
    if len(rois):
        b = rois[:, 0]
        bad_index = (b != xp.floor(b)) | (b < 0) | (b >= x.shape[0])
        # One device-to-host read for both checks (on the GPU each bool() waits for the device);
        # the details are worked out only when something is wrong.
        if bool(bad_index.any() | ~xp.isfinite(rois).all()):
            if bool(bad_index.any()):
                raise ValueError(f"{name}: rois[:, 0] must be batch indices in 0..{x.shape[0] - 1}, "
                                 f"got values from {float(b.min())} to {float(b.max())}")
            raise ValueError(f"{name}: rois contain NaN or infinity")
    return xp.ascontiguousarray(rois)


class RoIAlignFn(Function):
    """out[k, c, ph, pw] = (1 / count) sum_{samples s of bin (ph, pw)} sum_{4 cells j} w_sj x[b_k, c, j]

    forward:  bilinear samples averaged per bin (rules in kernels/roi_align.py)
    backward: gx[b_k, c, j] += w_sj / count * gy[k, c, ph, pw]  (the same weights, transposed)
    """

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
        self.output_size = _output_size(output_size)
        self.spatial_scale, self.sampling_ratio = float(spatial_scale), int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, x, rois):  # rois: a constant input, already checked by roi_align
        self.save_for_backward(rois=rois, x_shape=x.shape)  # the boxes and a shape, not the features
        return roi_align_forward(x, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.aligned)

    def backward(self, gy):
        gx = roi_align_backward(gy, self.rois, self.x_shape, self.spatial_scale, self.sampling_ratio,
                                self.aligned)
        return gx, None


class RoIPoolFn(Function):
    """out[k, c, ph, pw] = max over the bin's cells of x[b_k, c, :, :] (0 for an empty bin)

    forward:  quantized bins, max and its arg-max (rules in kernels/roi_pool.py)
    backward: gx[b_k, c, argmax] += gy[k, c, ph, pw]
    """

    def __init__(self, output_size, spatial_scale=1.0):
        self.output_size, self.spatial_scale = _output_size(output_size), float(spatial_scale)

    def forward(self, x, rois):  # rois: a constant input, already checked by roi_pool
        out, argmax = roi_pool_forward(x, rois, self.output_size, self.spatial_scale)
        self.save_for_backward(rois=rois, argmax=argmax, x_shape=x.shape)
        return out

    def backward(self, gy):
        return roi_pool_backward(gy, self.rois, self.argmax, self.x_shape), None


def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """RoIAlign of x (N, C, H, W) over rois (K, 5) [b, x1, y1, x2, y2] -> (K, C, oh, ow).

    ``sampling_ratio`` <= 0 samples ceil(box size / output size) points per bin side;
    ``aligned=True`` is the half-pixel-corrected version (Detectron2's default), False the
    original.  As ``torchvision.ops.roi_align``.
    """
    fn, x = RoIAlignFn(output_size, spatial_scale, sampling_ratio, aligned), as_tensor(x)
    return fn(x, _check(x.data, rois, "roi_align"))


def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """RoIPool (Fast R-CNN's quantized max pooling) -> (K, C, oh, ow), as ``torchvision.ops.roi_pool``."""
    fn, x = RoIPoolFn(output_size, spatial_scale), as_tensor(x)
    return fn(x, _check(x.data, rois, "roi_pool"))
