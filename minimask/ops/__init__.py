"""Box geometry for detection, on plain NumPy or CuPy arrays (nothing here is differentiated).

- ``boxes``: area, IoU, IoA (crowd regions), clipping, small-box removal, the Faster R-CNN box coder.
- ``anchors``: the RPN's reference boxes over an FPN pyramid.
- ``matcher``: IoU-based labels for anchors and proposals, and the balanced mini-batch sampler.
- ``nms``: greedy non-maximum suppression, plain and per group (kernels in ``minimask/kernels``).
- ``masks``: pasting each detection's 28x28 mask probabilities into the full image.
"""

from .anchors import AnchorGenerator
from .boxes import (
    CROWD_IOA_THRESH,
    BoxCoder,
    box_area,
    box_ioa,
    box_iou,
    clip_boxes,
    crowd_ignore_mask,
    remove_small_boxes,
)
from .masks import paste_masks_in_image
from .matcher import BalancedPositiveNegativeSampler, Matcher
from .nms import batched_nms, nms

__all__ = [
    "box_area", "box_iou", "box_ioa", "crowd_ignore_mask", "CROWD_IOA_THRESH", "clip_boxes",
    "remove_small_boxes", "BoxCoder",
    "AnchorGenerator",
    "Matcher", "BalancedPositiveNegativeSampler",
    "nms", "batched_nms",
    "paste_masks_in_image",
]
