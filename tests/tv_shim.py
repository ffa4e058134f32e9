"""torchvision on a CPU-only torch, for tests: its Python model code with our stand-in kernels.

torchvision's detection models are plain Python on top of a few compiled operators
(``torch.ops.torchvision.nms``, ``roi_align``, ...).  The torchvision wheel on the package index
is built against a CUDA torch, so its compiled extension (``_C.so``) does not load next to the
CPU build of torch used here, and since torchvision 0.2x ``import torchvision`` then fails
outright (``_meta_registrations.py`` registers fake kernels for ``torchvision::nms``, which does
not exist).  This module fills the gap, for the tests only (never imported by ``minimask``):

1. it *defines* every operator the compiled extension would define (same names and schemas,
   ``torch.library``), so that torchvision's Python registrations find them;
2. it gives ``nms`` and ``roi_align`` CPU implementations written from torchvision's C++ CPU
   kernels (``csrc/ops/cpu/nms_kernel.cpp``, ``roi_align_kernel.cpp``): the same float32
   arithmetic in the same order, vectorized over boxes with NumPy instead of looped in C++;
   the other operators raise a clear error if called (Mask R-CNN inference never calls them);
3. it makes ``torchvision.extension._has_ops()`` true, by letting torchvision's own attempt to
   load ``_C.so`` succeed as a no-op (the operators are already there), so that torchvision
   takes the same code paths it takes with its real extension.

    from tv_shim import import_torchvision   # tests/ is on sys.path under pytest
    torchvision = import_torchvision()      # raises ImportError (with the reason) if impossible

Being a second, independent implementation of the two kernels, it is also an oracle for ours
(``minimask/kernels``), which ``tests/test_interop.py`` uses.
"""

import numpy as np

_LIBRARY = None  # the torch.library.Library holding our definitions (must stay alive)
_TORCHVISION = None

# Schemas as torchvision's C++ declares them (TORCH_LIBRARY_FRAGMENT(torchvision, m) in csrc/ops/*.cpp).
SCHEMAS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "_cuda_version() -> int",
]


# ---------------------------------------------------------------- nms (nms_kernel.cpp)


def nms_numpy(boxes, scores, iou_threshold):
    """Greedy NMS as torchvision's CPU kernel: indices kept, by falling score.

    Order: a *stable* descending sort of the scores.  Each kept box suppresses every later box
    whose IoU with it is strictly greater than the threshold; IoU is inter / (area_i + area_j -
    inter) in the boxes' own precision, compared with the threshold in double (as C++ promotes
    the float to compare it with the double argument).  The inner loop over j is vectorized.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")  # negation is exact: a stable descending sort
    x1, y1, x2, y2, areas = x1[order], y1[order], x2[order], y2[order], areas[order]
    zero = boxes.dtype.type(0)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(order[i])
        rest = slice(i + 1, n)
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= ovr.astype(np.float64) > iou_threshold
    return np.asarray(keep, np.int64)


# ---------------------------------------------------------------- roi_align (roi_align_kernel.cpp)


def _sample_axis(start, bin_size, grid, pooled, size, dtype):
    """Sample positions along one axis for R rois: low/high indices and weights, (R, pooled, grid).

    yy = start + p * bin + (i + .5) * bin / grid, left to right in the rois' precision.  A
    sample more than one pixel outside the map counts zero; otherwise it is clamped at 0 and
    its upper neighbour at the last pixel (pre_calc_for_bilinear_interpolate).
    """
    p = np.arange(pooled, dtype=dtype)[None, :, None]
    i = (np.arange(grid, dtype=dtype) + dtype(0.5))[None, None, :]
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    pos = start + p * bin_size + i * bin_size / dtype(grid)
    valid = ~((pos < -1.0) | (pos > size))
    pos = np.where(pos <= 0, dtype(0), pos)
    low = pos.astype(np.int64)  # pos >= 0 here: truncation is floor
    at_edge = low >= size - 1
    low = np.where(at_edge, size - 1, low)
    high = np.where(at_edge, size - 1, low + 1)
    pos = np.where(at_edge, low.astype(dtype), pos)
    frac = pos - low.astype(dtype)
    return low, high, (dtype(1) - frac), frac, valid


def roi_align_numpy(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, chunk=64):
    """RoIAlign forward as torchvision's CPU kernel; features (N, C, H, W), rois (K, 5).

    Per roi: start = roi * spatial_scale - (0.5 if aligned), size = end - start (at least 1 when
    not aligned), bin = size / pooled, grid = sampling_ratio or ceil(size / pooled); each output
    bin is the sum over its grid of bilinear samples w1 v1 + w2 v2 + w3 v3 + w4 v4 (weights
    products hy hx, hy lx, ly hx, ly lx), accumulated in the same order, divided by the count.
    """
    features = np.asarray(features)
    rois = np.asarray(rois)
    dtype = features.dtype.type
    n, c, height, width = features.shape
    out = np.zeros((rois.shape[0], c, pooled_h, pooled_w), features.dtype)
    if rois.shape[0] == 0:
        return out
    offset = 0.5 if aligned else 0.0
    # roi * spatial_scale is evaluated in double (spatial_scale is a double) and stored as T.
    start_w = (rois[:, 1].astype(np.float64) * spatial_scale - offset).astype(dtype)
    start_h = (rois[:, 2].astype(np.float64) * spatial_scale - offset).astype(dtype)
    end_w = (rois[:, 3].astype(np.float64) * spatial_scale - offset).astype(dtype)
    end_h = (rois[:, 4].astype(np.float64) * spatial_scale - offset).astype(dtype)
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
        roi_w, roi_h = np.maximum(roi_w, dtype(1)), np.maximum(roi_h, dtype(1))
    bin_w, bin_h = roi_w / dtype(pooled_w), roi_h / dtype(pooled_h)
    if sampling_ratio > 0:
        grid_h = np.full(len(rois), sampling_ratio, np.int64)
        grid_w = grid_h.copy()
    else:
        grid_h = np.ceil(roi_h / dtype(pooled_h)).astype(np.int64)
        grid_w = np.ceil(roi_w / dtype(pooled_w)).astype(np.int64)
    batch = rois[:, 0].astype(np.int64)
    flat = features.transpose(0, 2, 3, 1)  # (N, H, W, C): one gather fetches all channels

    # Rois sharing a grid size are done together, ``chunk`` at a time (bounded memory).
    for gh, gw in sorted(set(zip(grid_h.tolist(), grid_w.tolist()))):
        group = np.nonzero((grid_h == gh) & (grid_w == gw))[0]
        count = dtype(max(gh * gw, 1))
        for s in range(0, len(group), chunk):
            idx = group[s:s + chunk]
            ylo, yhi, hy, ly, yok = _sample_axis(start_h[idx], bin_h[idx], gh, pooled_h, height, dtype)
            xlo, xhi, hx, lx, xok = _sample_axis(start_w[idx], bin_w[idx], gw, pooled_w, width, dtype)
            b = batch[idx][:, None, None]
            acc = np.zeros((len(idx), pooled_h, pooled_w, c), features.dtype)
            for iy in range(gh):
                for ix in range(gw):
                    ok = (yok[:, :, iy, None] & xok[:, None, :, ix])[..., None]
                    y0, y1 = ylo[:, :, iy, None], yhi[:, :, iy, None]
                    x0, x1 = xlo[:, None, :, ix], xhi[:, None, :, ix]
                    w1 = (hy[:, :, iy, None] * hx[:, None, :, ix])[..., None]
                    w2 = (hy[:, :, iy, None] * lx[:, None, :, ix])[..., None]
                    w3 = (ly[:, :, iy, None] * hx[:, None, :, ix])[..., None]
                    w4 = (ly[:, :, iy, None] * lx[:, None, :, ix])[..., None]
                    term = (w1 * flat[b, y0, x0] + w2 * flat[b, y0, x1]
                            + w3 * flat[b, y1, x0] + w4 * flat[b, y1, x1])
                    acc += np.where(ok, term, dtype(0))
            out[idx] = (acc / count).transpose(0, 3, 1, 2)
    return out


# ---------------------------------------------------------------- registration


def _not_provided(name):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"tests/tv_shim.py: torchvision::{name} has no CPU implementation in the "
                                  "shim (only nms and roi_align, what Mask R-CNN inference needs)")
    return kernel


def _define_ops(torch):
    global _LIBRARY
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    def nms(dets, scores, iou_threshold):
        keep = nms_numpy(dets.detach().cpu().numpy(), scores.detach().cpu().numpy(), iou_threshold)
        return torch.from_numpy(keep).to(dets.device)

    def roi_align(inp, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        if inp.dtype != rois.dtype:
            raise RuntimeError(f"roi_align: input {inp.dtype} and rois {rois.dtype} must have one dtype")
        out = roi_align_numpy(inp.detach().cpu().numpy(), rois.detach().cpu().numpy(), spatial_scale,
                              int(pooled_height), int(pooled_width), int(sampling_ratio), bool(aligned))
        return torch.from_numpy(out).to(inp.device)

    lib.impl("nms", nms, "CPU")
    lib.impl("roi_align", roi_align, "CPU")
    lib.impl("_cuda_version", lambda: -1, "CompositeExplicitAutograd")
    for schema in SCHEMAS:
        name = schema.split("(", 1)[0]
        if name not in ("nms", "roi_align", "_cuda_version"):
            lib.impl(name, _not_provided(name), "CPU")
    _LIBRARY = lib


def import_torchvision():
    """Import torchvision with the shim's operators; the module, or ImportError with the reason."""
    global _TORCHVISION
    if _TORCHVISION is not None:
        return _TORCHVISION
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"torch is not installed ({e})") from None
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed (pip install --no-deps torchvision matching torch)")
    if not hasattr(torch.ops, "torchvision") or not hasattr(torch.ops.torchvision, "nms"):
        _define_ops(torch)
    # torchvision's extension.py tries torch.ops.load_library(<its _C.so>) and sets _has_ops
    # from the outcome.  While it imports, loading that one file is a no-op that succeeds: the
    # operators it would register are ours.  Any other library loads as usual.
    real_load = torch.ops.load_library

    def load_library(path):
        if "torchvision" in str(path) and str(path).rsplit("/", 1)[-1].startswith("_C"):
            return None
        return real_load(path)

    torch.ops.load_library = load_library
    try:
        import torchvision
    except Exception as e:  # any failure means "no torchvision here": the tests skip with it
        raise ImportError(f"torchvision could not be imported with the CPU shim: "
                          f"{type(e).__name__}: {e}") from e
    finally:
        torch.ops.load_library = real_load
    if not torchvision.extension._has_ops():
        raise ImportError("torchvision imported, but its _has_ops() is still false")
    _TORCHVISION = torchvision
    return torchvision
