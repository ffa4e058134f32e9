"""Multi-level RoIAlign: pool each RoI from the FPN level that matches its size.

Mask R-CNN with FPN (paper Sec. 3.1, "Network Architecture", and Lin et al., FPN, Sec. 4.2)
takes the features of each RoI from one pyramid level, chosen by the RoI's size (FPN Eq. 1):

    k = floor(k0 + log2(sqrt(w h) / 224)),   clamped to [k_min, k_max]

with k0 = 4: a 224 x 224 box (the ImageNet training size) is pooled from P4 (stride 16), a box
half as wide from P3, twice as wide from P5.  Each level's RoIs are then pooled with RoIAlign
(paper Sec. 3, "RoIAlign") at that level's scale 1 / stride, and the results are put back in
the order of the input boxes.

Two families of pretrained weights use slightly different settings, both reachable here:

- torchvision (default, so that its weights import unchanged): ``sampling_ratio=2``,
  ``aligned=False``, and an epsilon of 1e-6 added to k before the floor.
- Detectron2 ("ROIAlignV2"): ``sampling_ratio=0`` (adaptive), ``aligned=True`` (the half-pixel
  shift that makes box corners land on pixel corners); it adds its epsilon (2.2e-16) to the
  size ratio inside the log instead, which changes no level in practice.

We follow torchvision's epsilon: a box of exactly 448 x 448 should go to P5, but sqrt and log2
in floating point can give 0.9999999 instead of 1 and the floor would drop it a level; 1e-6
is far above that rounding and far below any real difference in box size (it moves the level
boundaries by a factor 2**-1e-6, less than a millionth of a pixel per pixel of box).
"""

import math

import numpy as np

from .. import functional as F
from ..backend import device_of, get_array_module, to_device
from ..tensor import Tensor

POOLER_TYPES = ("roialign", "roipool", "roiwarp")


def assign_boxes_to_levels(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4, eps=1e-6):
    """Pyramid level of each box (FPN Eq. 1), as an index from 0 (0 means ``min_level``).

    boxes: (K, 4) array ``x1, y1, x2, y2`` in image pixels, or a list of such arrays (one per
    image; they are concatenated).  Returns (K,) int64 on the boxes' device.
    """
    if isinstance(boxes, (list, tuple)):
        xp = get_array_module(*boxes) if boxes else np
        boxes = xp.concatenate([xp.asarray(b).reshape(-1, 4) for b in boxes]) if boxes else np.zeros((0, 4))
    xp = get_array_module(boxes)
    boxes = xp.asarray(boxes, dtype=xp.float64)  # float64: the level boundaries are exact powers of 2
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) x1, y1, x2, y2, got shape {boxes.shape}")
    if min_level > max_level:
        raise ValueError(f"min_level {min_level} > max_level {max_level}")
    area = xp.maximum(boxes[:, 2] - boxes[:, 0], 0) * xp.maximum(boxes[:, 3] - boxes[:, 1], 0)
    # An empty box has size 0 and log2(0) = -inf: it goes to the finest level after the clamp.
    size = xp.maximum(xp.sqrt(area), 1e-12)
    level = xp.floor(canonical_level + xp.log2(size / canonical_box_size) + eps)
    level = xp.clip(level, min_level, max_level)
    return level.astype(xp.int64) - min_level


def infer_strides(features, image_size):
    """Stride of each feature map: image height / feature height, rounded to a power of 2.

    As torchvision's MultiScaleRoIAlign: the batch is padded (to a multiple of 32 here), so
    feature height * stride is the padded height only up to rounding; the nearest power of two
    is the stride.  ``image_size`` is (H, W) of the batch, or a list of per-image (H, W) of
    which the largest height is used (torchvision's choice).
    """
    if len(image_size) and isinstance(image_size[0], (tuple, list)):
        image_h = max(int(s[0]) for s in image_size)
    else:
        image_h = int(image_size[0])
    strides = []
    for f in features:
        ratio = f.shape[-2] / image_h
        strides.append(2 ** -round(math.log2(ratio)))
    return strides


class MultiScaleRoIAlign:
    """Pool a fixed-size feature for every box from the FPN level that suits its size.

    pooler = MultiScaleRoIAlign(output_size=7)
    x = pooler([p2, p3, p4, p5], [boxes_image0, boxes_image1], image_size=(H, W))  # (K, C, 7, 7)

    features: list of Tensors (N, C, Hl, Wl), finest first (P2..P5); boxes_per_image: list of N
    (Ki, 4) arrays in image pixels.  Give either ``image_size`` (strides are inferred) or
    ``strides`` (here or in the constructor).  The output rows follow the boxes, image by image,
    and gradients flow back to the features (the boxes are constants).

    canonical_box_size, canonical_level: FPN Eq. 1's 224 and k0 = 4 (``cfg.canonical_box_size``,
    ``cfg.canonical_level``).  224 is ImageNet's image size, right for COCO's 800-pixel images;
    on images of 128 pixels every RoI is smaller than 112 and lands on the finest level, so a
    canonical size scaled with the images (e.g. 224 x 128 / 800, about 36) spreads them out again.

    pooler_type selects the paper's Table 2c ablation:
      "roialign": bilinear samples at exact (unquantized) positions: RoIAlign, the paper's choice.
      "roipool":  Fast R-CNN's RoIPool: box and bins quantized to the grid, max in each bin.
      "roiwarp":  as in MNC (Dai et al., 2016): the box is quantized to the feature grid (its
                  corners rounded, as RoIPool rounds them), then bilinearly sampled like RoIAlign.
                  So it is RoIAlign on rounded boxes, with aligned=False as RoIPool's grid has
                  no half-pixel shift.  In Table 2c the quantization alone costs 3 mask AP
                  (RoIWarp 27.2, RoIPool 26.9, RoIAlign 30.2; ResNet-50-C4).
    """

    def __init__(self, output_size=7, sampling_ratio=2, aligned=False, pooler_type="roialign",
                 canonical_box_size=224, canonical_level=4, strides=None):
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"unknown pooler_type {pooler_type!r}: expected one of {POOLER_TYPES}")
        if not canonical_box_size > 0:
            raise ValueError(f"canonical_box_size must be positive (pixels), got {canonical_box_size!r}")
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pooler_type = pooler_type
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.strides = None if strides is None else list(strides)

    def __repr__(self):
        return (f"MultiScaleRoIAlign(output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, pooler_type={self.pooler_type!r}, "
                f"canonical_box_size={self.canonical_box_size}, canonical_level={self.canonical_level})")

    def _levels(self, strides):
        """min and max pyramid level from the strides, which must be 2**k, 2**(k+1), ..."""
        levels = [math.log2(s) for s in strides]
        if any(abs(k - round(k)) > 1e-6 for k in levels):
            raise ValueError(f"feature strides must be powers of 2, got {strides}")
        levels = [round(k) for k in levels]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError("features must form a pyramid (each stride twice the one before), "
                             f"got strides {strides}")
        return levels[0], levels[-1]

    def _pool(self, feature, rois, stride):
        scale = 1.0 / stride
        if self.pooler_type == "roipool":
            return F.roi_pool(feature, rois, self.output_size, spatial_scale=scale)
        if self.pooler_type == "roiwarp":
            xp = get_array_module(rois)
            rois = rois.copy()
            # Round the corners on the feature grid, then express them in image pixels again.
            rois[:, 1:] = xp.round(rois[:, 1:] * scale) / scale
            return F.roi_align(feature, rois, self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=False)
        return F.roi_align(feature, rois, self.output_size, spatial_scale=scale,
                           sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def __call__(self, features, boxes_per_image, image_size=None, strides=None):
        features = [f if isinstance(f, Tensor) else Tensor(f) for f in features]
        if not features:
            raise ValueError("no feature maps given")
        n, channels = features[0].shape[:2]
        if len(boxes_per_image) != n:
            raise ValueError(f"{len(boxes_per_image)} box arrays for a batch of {n} images (one per image)")
        for f in features:
            if f.ndim != 4 or f.shape[:2] != (n, channels):
                raise ValueError(f"feature maps must all be (N={n}, C={channels}, H, W), got {f.shape}")
        strides = strides if strides is not None else self.strides
        if strides is None:
            if image_size is None:
                raise ValueError("give image_size (strides are inferred from it) or strides")
            strides = infer_strides(features, image_size)
        if len(strides) != len(features):
            raise ValueError(f"{len(strides)} strides for {len(features)} feature maps")
        min_level, max_level = self._levels(strides)

        # RoIs as (K, 5) [batch_index, x1, y1, x2, y2] on the features' device and dtype.
        xp = get_array_module(features[0].data)
        dtype, device = features[0].dtype, device_of(features[0].data)
        parts = []
        for i, b in enumerate(boxes_per_image):
            b = xp.asarray(to_device(getattr(b, "data", b), device), dtype=dtype).reshape(-1, 4)
            parts.append(xp.concatenate([xp.full((len(b), 1), i, dtype=dtype), b], axis=1))
        rois = xp.concatenate(parts, axis=0)
        if len(rois) == 0:
            return Tensor(xp.zeros((0, channels) + self.output_size, dtype=dtype))
        if len(features) == 1:
            return self._pool(features[0], rois, strides[0])

        levels = to_device(assign_boxes_to_levels(rois[:, 1:], min_level, max_level,
                                                  self.canonical_box_size, self.canonical_level), "cpu")
        outputs, order = [], []
        for level, (feature, stride) in enumerate(zip(features, strides)):
            index = np.nonzero(levels == level)[0]
            if len(index) == 0:
                continue
            outputs.append(self._pool(feature, rois[xp.asarray(index)], stride))
            order.append(index)
        # The rows now come level by level; row j of the concatenation is box order[j].  Indexing
        # with the inverse permutation puts box i back at row i, and its backward (a scatter)
        # sends each row's gradient to the level it came from.
        order = np.concatenate(order)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return F.concat(outputs, axis=0)[xp.asarray(inverse)]


def pooler_settings(cfg):
    """The ``MultiScaleRoIAlign`` arguments a config sets (every pooler of the RoI heads uses
    them): sampling ratio, alignment, the Table 2c pooler type and FPN Eq. 1's canonical size and
    level."""
    return dict(sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned, pooler_type=cfg.pooler_type,
                canonical_box_size=cfg.canonical_box_size, canonical_level=cfg.canonical_level)

