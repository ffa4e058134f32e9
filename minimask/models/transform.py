"""The model's input transform and output post-processing (paper Sec. 3.1, "Implementation Details").

torchvision's ``GeneralizedRCNNTransform`` in our words.  The model owns it, so a caller hands
the model plain images of any sizes and gets detections back in those images' own pixels:

    images (H, W, 3) uint8, targets  --  prepare_targets: checked once, moved to the device once
        -> resize: shorter side to min_size, longer capped at max_size (Sec. 3.1: "images are
           resized such that their scale (shorter edge) is 800 pixels"); boxes, masks and
           keypoints scaled with the image
        -> normalize with image_mean / image_std, then zero-pad to one batch whose sides are
           multiples of size_divisible (32, the coarsest stride FPN adds top-down, so that P2..P5
           are the padded size over 4..32 exactly; P6 is only P5 max-pooled)
    ... backbone, RPN, RoI heads ...
    detections in resized pixels  --  postprocess: boxes and keypoints scaled back, the 28x28
        mask probabilities pasted into the original image and binarized (Sec. 3.1, "Inference")

Every resize here is built on ``functional/resize.py``'s index tables (one rule, PyTorch's), and
the array code uses only what NumPy and CuPy share, so the transform runs on either device.
Data augmentation (flips) is not here: it belongs to the data (``data/transforms.py``).
"""

import math

import numpy as np

from .. import nn
from ..backend import get_array_module, to_device
from ..functional.resize import resize_image, resize_masks
from ..ops.masks import paste_masks_in_image

# ---------------------------------------------------------------- sizes


def resized_size(height, width, min_size, max_size, rounding="round"):
    """(new_h, new_w): shorter side to ``min_size`` unless that makes the longer side pass
    ``max_size``, in which case the longer side becomes ``max_size``; aspect ratio kept.

    scale = min(min_size / short, max_size / long), as torchvision's GeneralizedRCNNTransform.
    ``rounding="round"``: sides rounded to the nearest pixel (Detectron2's ResizeShortestEdge),
    so a 480 x 640 image at min_size 800 becomes exactly 800 x 1067.  ``"floor"``: torchvision's
    ``interpolate(scale_factor=scale, recompute_scale_factor=True)``, which floors side * scale
    in double precision (800 x 1066 here).  The scale itself is a double, as torchvision computes
    it in eager mode today (0.16 and later, checked against 0.28 in tests/test_interop.py);
    torchvision 0.9-0.15, and TorchScript/ONNX exports still, take the sizes as a tensor and
    compute the scale in float32, which gives 799 x 1066 for this image (a pixel less on about
    two sizes in five).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: image size must be positive, got {height}x{width}")
    if min_size <= 0 or max_size <= 0:
        raise ValueError(f"resize: min_size and max_size must be positive, got {min_size}, {max_size}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if rounding == "floor":
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    if rounding != "round":
        raise ValueError(f"resize: rounding must be 'round' or 'floor', got {rounding!r}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_boxes(boxes, from_size, to_size):
    """Scale xyxy boxes from an image of ``from_size`` (h, w) to one of ``to_size``.

    Used both ways: ground truth into the resized image, and detections back to the caller's
    image (torchvision's ``transform.postprocess``).
    """
    xp = get_array_module(boxes)
    ry = to_size[0] / from_size[0]
    rx = to_size[1] / from_size[1]
    scale = xp.asarray([rx, ry, rx, ry], dtype=boxes.dtype if boxes.dtype.kind == "f" else xp.float32)
    return boxes * scale


def resize_keypoints(keypoints, from_size, to_size):
    """Scale (N, J, 3) keypoints' x and y like the boxes; the visibility column is kept."""
    out = keypoints.copy()
    out[..., 0] *= to_size[1] / from_size[1]
    out[..., 1] *= to_size[0] / from_size[0]
    return out


def resize(image, target, size):
    """Resize an (H, W, C) ``image`` to ``size`` (h, w), and its target (None at test time) with
    it: boxes scaled by the exact ratio of new to old sides, masks by nearest neighbour (they
    stay 0/1), keypoints like the boxes."""
    h, w = image.shape[:2]
    image = resize_image(image, size)
    if target is None:
        return image, None
    target = dict(target)
    for key in ("boxes", "crowd_boxes"):
        target[key] = resize_boxes(target[key], (h, w), size)
    if "masks" in target:
        target["masks"] = resize_masks(target["masks"], size)
    if "keypoints" in target:
        target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), size)
    return image, target


# ---------------------------------------------------------------- normalize and batch


def normalize(image, mean, std):
    """(H, W, 3) RGB in [0, 1] (float) or [0, 255] (uint8) -> (3, H, W) float32 (x - mean) / std.

    ``mean`` and ``std`` are per channel on the [0, 1] scale (ImageNet's, for a pretrained
    backbone)."""
    xp = get_array_module(image)
    scale = 255.0 if image.dtype == xp.uint8 else 1.0
    mean = xp.asarray(mean, dtype=xp.float32).reshape(3, 1, 1)
    std = xp.asarray(std, dtype=xp.float32).reshape(3, 1, 1)
    chw = xp.transpose(image, (2, 0, 1)).astype(xp.float32) / scale
    return (chw - mean) / std


def batch_images(images, size_divisible=32):
    """Zero-pad (C, H, W) images at the bottom and right into one (N, C, Hp, Wp) float32 array.

    Hp and Wp are the largest height and width rounded up to a multiple of ``size_divisible``.
    Returns ``(batch, sizes)`` with ``sizes`` each image's (H, W) before padding: boxes stay
    valid (padding only adds pixels after the image), and the model clips proposals to the true
    size, not the padded one.
    """
    if len(images) == 0:
        raise ValueError("batch_images: no images given")
    xp = get_array_module(images[0])
    channels = images[0].shape[0]
    for im in images:
        if im.ndim != 3 or im.shape[0] != channels:
            raise ValueError(f"batch_images: expected (C, H, W) images with C={channels}, "
                             f"got shape {tuple(im.shape)}")
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    d = size_divisible
    hp = int(math.ceil(max(h for h, _ in sizes) / d) * d)
    wp = int(math.ceil(max(w for _, w in sizes) / d) * d)
    batch = xp.zeros((len(images), channels, hp, wp), dtype=xp.float32)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch, sizes


# ---------------------------------------------------------------- the transform


class RCNNTransform(nn.Module):
    """The model's input pipeline and output post-processing, for the config ``cfg``.

    ``batch, sizes, targets = transform(images, targets=None)``: images a list of (H, W, 3)
    arrays (uint8, or float in [0, 1]); ``batch`` (N, 3, Hp, Wp) float32 on ``self.device``,
    ``sizes`` the resized (h, w) of each image before padding, ``targets`` checked, moved and
    resized (None at test time).  ``transform.postprocess(detections, sizes, original_sizes)``
    maps the heads' detections back to the caller's pixels.

    A module with no weights: it follows ``model.train()`` / ``model.eval()`` (multi-scale
    training draws the shorter side per batch; test time uses the last scale, as torchvision).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # The training scale is drawn from a generator of our own (not NumPy's global one), so a
        # run is reproducible; ``MaskRCNN.reseed`` replaces it before every iteration.
        self.scale_rng = np.random.default_rng(cfg.seed)
        # Where images and targets are sent.  The transform has no weights for ``Module.to`` to
        # move, so the model tells it where its weights went (``MaskRCNN.to``).
        self.device = "cpu"

    # ---- targets: checked and moved exactly once ----------------------------------------
    def prepare_targets(self, targets, image_sizes):
        """Check each target against its image and put it on ``device`` with fixed dtypes.

        A target is a dict with ``boxes`` (G, 4) xyxy in its image's pixels, ``labels`` (G,) in
        1..K, ``masks`` (G, H, W) (mask models), ``keypoints`` (G, J, 3) (keypoint models) and
        optionally ``crowd_boxes`` (M, 4).  The result always has ``crowd_boxes`` (perhaps
        (0, 4)) and holds float32 boxes, int64 labels, uint8 masks and float32 keypoints, so the
        RPN and the heads use them as they are.  Other keys are dropped.
        """
        cfg, device = self.cfg, self.device
        if len(targets) != len(image_sizes):
            raise ValueError(f"model: {len(image_sizes)} images but {len(targets)} targets (one each)")
        needed = ("boxes", "labels") + ("masks",) * cfg.mask_on + ("keypoints",) * cfg.keypoint_on
        out = []
        for i, (target, size) in enumerate(zip(targets, image_sizes)):
            for key in needed:
                if key not in target or target[key] is None:
                    raise ValueError(f"model: target {i} needs {key!r}, got keys {sorted(target)}")
            t = {k: to_device(getattr(target[k], "data", target[k]), device) for k in needed}
            xp = get_array_module(t["boxes"])
            t["boxes"] = t["boxes"].astype(xp.float32).reshape(-1, 4)
            t["labels"] = t["labels"].astype(xp.int64).reshape(-1)
            crowd = target.get("crowd_boxes")
            crowd = xp.zeros((0, 4)) if crowd is None else to_device(getattr(crowd, "data", crowd), device)
            t["crowd_boxes"] = crowd.astype(xp.float32).reshape(-1, 4)
            g = t["boxes"].shape[0]
            if t["labels"].shape[0] != g:
                raise ValueError(f"model: target {i} has {g} boxes and {t['labels'].shape[0]} labels")
            if cfg.mask_on:
                if t["masks"].shape[0] != g:
                    raise ValueError(f"model: target {i} has {g} boxes, {t['labels'].shape[0]} labels and "
                                     f"{t['masks'].shape[0]} masks (one each)")
                if t["masks"].ndim != 3 or tuple(t["masks"].shape[1:]) != tuple(size):
                    raise ValueError(f"model: target {i} masks should be (G, {size[0]}, {size[1]}) "
                                     f"like its image, got {tuple(t['masks'].shape)}")
                t["masks"] = t["masks"].astype(xp.uint8, copy=False)
            if cfg.keypoint_on:
                t["keypoints"] = t["keypoints"].astype(xp.float32)
                if t["keypoints"].shape != (g, cfg.num_keypoints, 3):
                    raise ValueError(f"model: target {i} keypoints should be ({g}, {cfg.num_keypoints}, 3) "
                                     f"(x, y, visibility per keypoint), got {tuple(t['keypoints'].shape)}")
            if g and (int(t["labels"].min()) < 1 or int(t["labels"].max()) >= cfg.num_classes):
                raise ValueError(f"model: target {i} labels must be in 1..{cfg.num_classes - 1} "
                                 f"(0 is background), got {t['labels'].min()}..{t['labels'].max()}")
            out.append(t)
        return out

    # ---- images -------------------------------------------------------------------------
    def forward(self, images, targets=None):
        cfg, device = self.cfg, self.device
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError("model: pass a list of images, not one (H, W, 3) array")
        images = [getattr(im, "data", im) for im in images]
        if not images:
            raise ValueError("model: no images given")
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"model: image {i} should be (H, W, 3) RGB, got shape {tuple(image.shape)}")
        if targets is not None:
            targets = self.prepare_targets(list(targets), [im.shape[:2] for im in images])
        if self.training:
            min_size = int(cfg.min_size[int(self.scale_rng.integers(len(cfg.min_size)))])
        else:
            min_size = int(cfg.min_size[-1])  # as torchvision: the last scale at test time

        out_images, out_targets = [], []
        for i, image in enumerate(images):
            image = to_device(image, device)  # the uint8 pixels (4x smaller than float) first
            xp = get_array_module(image)
            if image.dtype == xp.uint8:
                image = image.astype(xp.float32) / 255.0
            else:
                image = image.astype(xp.float32)  # floats are taken to be in [0, 1] already
            size = resized_size(image.shape[0], image.shape[1], min_size, cfg.max_size, cfg.resize_rounding)
            # Bilinear resizing is linear with weights summing to one, so it commutes with the
            # per-channel affine normalization: resize first, then normalize into CHW.
            image, target = resize(image, None if targets is None else targets[i], size)
            out_images.append(normalize(image, cfg.image_mean, cfg.image_std))
            out_targets.append(target)
        batch, sizes = batch_images(out_images, cfg.size_divisible)
        return batch, sizes, (None if targets is None else out_targets)

    # ---- detections back to the caller's pixels -------------------------------------------
    def postprocess(self, detections, resized_sizes, original_sizes):
        """Per image: boxes (and keypoints) scaled back to the original pixels; the 28x28 mask
        probabilities pasted into the image and binarized at ``cfg.mask_threshold`` (Sec. 3.1:
        0.5)."""
        return [self._postprocess_one(d, r, o) for d, r, o in zip(detections, resized_sizes, original_sizes)]

    def _postprocess_one(self, detection, resized_size, original_size):
        cfg = self.cfg
        boxes = resize_boxes(detection["boxes"], resized_size, original_size)
        out = dict(boxes=boxes, scores=detection["scores"], labels=detection["labels"])
        if cfg.mask_on:
            out["masks"] = paste_masks_in_image(detection["mask_probs"], boxes, original_size,
                                                threshold=cfg.mask_threshold, mode=cfg.paste_mode)
        if cfg.keypoint_on:
            out["keypoints"] = resize_keypoints(detection["keypoints"], resized_size, original_size)
            out["keypoints_scores"] = detection["keypoints_scores"]
        return out


__all__ = ["RCNNTransform", "resized_size", "resize", "resize_boxes", "resize_keypoints", "normalize",
           "batch_images"]
