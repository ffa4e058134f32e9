"""From 28 x 28 mask predictions to full-image masks (paper Sec. 3.1, Inference).

"The m x m floating-number mask output is then resized to the RoI size, and binarized at a
threshold of 0.5."  Two ways of doing that resize are in use, and a model's masks depend a
little on which one it was trained and evaluated with, so both are here:

- ``mode="detectron2"`` (default): Detectron2's ``paste_masks_in_image`` (the grid_sample-based
  ``_do_paste_mask``).  Every image pixel whose centre falls near the box samples the mask at
  the matching continuous point, bilinearly, with zero outside the mask; the box keeps its
  fractional coordinates.  A pixel is in the mask when the sample is >= threshold.  The loops
  live in ``minimask/kernels/paste_masks.py`` (NumPy reference, Numba, CUDA).
- ``mode="torchvision"``: torchvision's ``paste_masks_in_image`` (roi_heads.py): the mask is
  padded by one zero cell on each side, the box grown to match and truncated to integers, the
  padded mask resized to the integer box's (w + 1) x (h + 1) pixels with
  ``interpolate(mode="bilinear", align_corners=False)`` (here ``functional.resize.resize_image``,
  the same index tables and weights as torch's), and copied in.  torchvision returns the
  probabilities and its COCO evaluation keeps pixels with probability > 0.5, so this mode
  thresholds with ``>``.  Use it with weights imported from torchvision to get its masks.

Both give (N, H, W) boolean masks, or the probabilities with ``threshold=None``.
"""

import numpy as np

from ..backend import device_of, get_array_module, to_device
from ..functional.resize import resize_image
from ..kernels.paste_masks import paste_masks, paste_masks_reference

MODES = ("detectron2", "torchvision")


def paste_masks_in_image(masks, boxes, image_shape, threshold=0.5, mode="detectron2"):
    """Paste per-detection mask probabilities into the image; see the module docstring.

    masks: (N, Mh, Mw) or (N, 1, Mh, Mw) probabilities in [0, 1] (NumPy or CuPy, or a Tensor).
    boxes: (N, 4) boxes ``x1, y1, x2, y2`` in the image's pixels, one per mask.
    image_shape: (H, W) of the output.
    threshold: in (0, 1); None returns the pasted probabilities (float) instead of booleans.
    Returns (N, H, W) bool (or float) on the masks' device.
    """
    masks, boxes = getattr(masks, "data", masks), getattr(boxes, "data", boxes)
    xp = get_array_module(masks)
    masks = xp.asarray(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, M, M) or (N, 1, M, M), got shape {masks.shape}")
    if masks.dtype.kind != "f":  # e.g. binary ground-truth masks: paste them as 0/1
        masks = masks.astype(xp.float32)
    boxes = xp.asarray(to_device(boxes, device_of(masks)))
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be (N, 4) with N = {masks.shape[0]} (one per mask), got {boxes.shape}")
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(xp.float32)
    if not bool(xp.isfinite(boxes).all()):
        raise ValueError("boxes contain NaN or infinity")
    if len(image_shape) != 2 or int(image_shape[0]) < 0 or int(image_shape[1]) < 0:
        raise ValueError(f"image_shape must be (H, W) with H, W >= 0, got {image_shape}")
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    if threshold is not None and not 0 < threshold < 1:
        # At 0 every pixel of the image would pass, also far from the box: not a mask.
        raise ValueError(f"threshold must be in (0, 1) or None, got {threshold}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")

    if masks.shape[0] == 0:
        dtype = xp.bool_ if threshold is not None else masks.dtype
        return xp.zeros((0,) + image_shape, dtype=dtype)
    if mode == "torchvision":
        probs = paste_masks_torchvision(masks, boxes, image_shape)
        return probs if threshold is None else probs > threshold
    if threshold is None:
        return paste_masks_reference(masks, boxes, image_shape).astype(masks.dtype)
    return paste_masks(masks, boxes, image_shape, threshold)


def paste_masks_torchvision(masks, boxes, image_shape):
    """Probabilities (N, H, W) pasted as torchvision does (see the module docstring)."""
    xp = get_array_module(masks)
    n, mh, mw = masks.shape
    height, width = image_shape
    # One cell of zeros around the mask, so that the resize fades to zero at the box edge; the
    # box grows by the same factor so that the original cells keep their place.
    padded = xp.zeros((n, mh + 2, mw + 2), dtype=masks.dtype)
    padded[:, 1:-1, 1:-1] = masks
    scale = (mw + 2) / mw  # torchvision takes the last axis for both (its masks are square)
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx, cy = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    grown = xp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    grown = np.asarray(to_device(grown, "cpu")).astype(np.int64)  # truncation toward zero, as .to(int64)
    out = xp.zeros((n, height, width), dtype=masks.dtype)
    for i in range(n):
        x0, y0, x1, y1 = (int(c) for c in grown[i])
        # The integer box covers pixels x0..x1 inclusive: w = x1 - x0 + 1 of them.
        resized = resize_image(padded[i], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)))
        xa, xb = max(x0, 0), min(x1 + 1, width)  # the part of the box inside the image
        ya, yb = max(y0, 0), min(y1 + 1, height)
        if xa < xb and ya < yb:
            out[i, ya:yb, xa:xb] = resized[ya - y0:yb - y0, xa - x0:xb - x0]
    return out
