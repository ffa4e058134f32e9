"""Image and target transforms: resize, flip, normalize, pad into a batch.

Sec. 3.1 of the paper: "images are resized such that their scale (shorter edge) is 800 pixels"
(with the longer edge capped at 1333 in the released code), and training uses horizontal flips.
Then images are normalized and zero-padded to one batch whose sides are multiples of 32, so
every FPN level (strides 4 to 64 with P6) divides the padded size evenly.

Images here are (H, W, 3) arrays (uint8 from the data set, or float); a target is the dict of
``CocoDataset``: ``boxes`` (N, 4) xyxy in pixels, ``masks`` (N, H, W), ``crowd_boxes`` (M, 4),
and any other keys, which are carried along unchanged.  Every function returns a new target and
leaves its input alone.  The array code uses only what NumPy and CuPy share (``xp``), so the
model can run these on either device.
"""

import math

from ..backend import get_array_module

# ---------------------------------------------------------------- resize


def resized_size(height, width, min_size, max_size, rounding="round"):
    """(new_h, new_w): shorter side to ``min_size`` unless that makes the longer side pass
    ``max_size``, in which case the longer side becomes ``max_size``; aspect ratio kept.

    scale = min(min_size / short, max_size / long), as torchvision's GeneralizedRCNNTransform.
    ``rounding="round"``: sides rounded to the nearest pixel (Detectron2's ResizeShortestEdge),
    so a 480 x 640 image at min_size 800 becomes exactly 800 x 1067.  ``"floor"``: torchvision's
    ``interpolate(scale_factor=scale, recompute_scale_factor=True)``, which truncates side *
    scale in double precision (800 x 1066 here).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: image size must be positive, got {height}x{width}")
    if min_size <= 0 or max_size <= 0:
        raise ValueError(f"resize: min_size and max_size must be positive, got {min_size}, {max_size}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if rounding == "floor":
        return max(1, int(height * scale)), max(1, int(width * scale))
    if rounding != "round":
        raise ValueError(f"resize: rounding must be 'round' or 'floor', got {rounding!r}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _source_bilinear(n_in, n_out, xp):
    """For each output index along one axis: the two source indices and the weight of the second.

    Half-pixel centres, as PyTorch's interpolate(mode="bilinear", align_corners=False): output
    pixel i covers source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0.
    """
    src = (xp.arange(n_out, dtype=xp.float64) + 0.5) * (n_in / n_out) - 0.5
    src = xp.maximum(src, 0.0)
    i0 = xp.floor(src).astype(xp.int64)
    i0 = xp.minimum(i0, n_in - 1)
    i1 = xp.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(xp.float32)


def resize_image(image, size):
    """Bilinear resize of an (H, W, C) or (H, W) array to ``size`` = (new_h, new_w).

    Separable: interpolate along rows, then along columns; same numbers as PyTorch's
    ``interpolate(..., mode="bilinear", align_corners=False)``.  uint8 in, uint8 out (rounded).
    """
    xp = get_array_module(image)
    h, w = image.shape[:2]
    new_h, new_w = size
    out = image.astype(xp.float32)
    extra = (1,) * (image.ndim - 2)  # broadcast the weights over channels
    if new_h != h:
        y0, y1, ly = _source_bilinear(h, new_h, xp)
        ly = ly.reshape((-1, 1) + extra)
        out = out[y0] * (1 - ly) + out[y1] * ly
    if new_w != w:
        x0, x1, lx = _source_bilinear(w, new_w, xp)
        lx = lx.reshape((1, -1) + extra)
        out = out[:, x0] * (1 - lx) + out[:, x1] * lx
    if image.dtype == xp.uint8:
        return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8)
    return out.astype(image.dtype)


def resize_masks(masks, size):
    """Nearest-neighbour resize of (N, H, W) masks (PyTorch's mode="nearest": floor(i * in / out))."""
    xp = get_array_module(masks)
    n, h, w = masks.shape
    new_h, new_w = size
    rows = xp.minimum((xp.arange(new_h) * (h / new_h)).astype(xp.int64), h - 1)
    cols = xp.minimum((xp.arange(new_w) * (w / new_w)).astype(xp.int64), w - 1)
    return masks[:, rows[:, None], cols[None, :]]


def resize_boxes(boxes, from_size, to_size):
    """Scale xyxy boxes from an image of ``from_size`` (h, w) to one of ``to_size``.

    The model uses it both ways: ground truth into the resized image, and detections back to
    the caller's image (torchvision's ``transform.postprocess``).
    """
    xp = get_array_module(boxes)
    ry = to_size[0] / from_size[0]
    rx = to_size[1] / from_size[1]
    scale = xp.asarray([rx, ry, rx, ry], dtype=boxes.dtype if boxes.dtype.kind == "f" else xp.float32)
    return boxes * scale


def resize(image, target, min_size, max_size, rounding="round"):
    """Resize ``image`` (H, W, C) keeping its aspect ratio, and its target with it
    (``rounding`` of the new sides as in ``resized_size``).

    Returns ``(image, target)``; ``target`` may be None (prediction).  Boxes are scaled by the
    exact ratio of new to old sides, masks resized by nearest neighbour (they stay 0/1).
    """
    if image.ndim != 3:
        raise ValueError(f"resize: expected an (H, W, C) image, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    size = resized_size(h, w, min_size, max_size, rounding)
    image = resize_image(image, size)
    if target is None:
        return image, None
    target = dict(target)
    for key in ("boxes", "crowd_boxes"):
        if key in target:
            target[key] = resize_boxes(target[key], (h, w), size)
    if "masks" in target:
        target["masks"] = resize_masks(target["masks"], size)
    if "keypoints" in target:
        kp = target["keypoints"].copy()
        kp[..., 0] *= size[1] / w
        kp[..., 1] *= size[0] / h
        target["keypoints"] = kp
    return image, target


# ---------------------------------------------------------------- flip


def flip_boxes(boxes, width):
    """Mirror xyxy boxes in an image ``width`` wide: x1' = W - x2, x2' = W - x1."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def hflip(image, target, keypoint_flip_map=None):
    """Mirror the image left-right, with its boxes and masks.

    Keypoints (if present) need ``keypoint_flip_map``: for each keypoint, the index of its
    mirror twin (left eye <-> right eye), since a flipped left eye is a right eye.
    """
    w = image.shape[1]
    image = image[:, ::-1].copy()
    if target is None:
        return image, None
    target = dict(target)
    for key in ("boxes", "crowd_boxes"):
        if key in target:
            target[key] = flip_boxes(target[key], w)
    if "masks" in target:
        target["masks"] = target["masks"][:, :, ::-1].copy()
    if "keypoints" in target:
        if keypoint_flip_map is None:
            raise ValueError("hflip: the target has keypoints, so keypoint_flip_map is needed "
                             "(which keypoint becomes which when mirrored)")
        kp = target["keypoints"][:, keypoint_flip_map].copy()
        kp[..., 0] = w - kp[..., 0]
        target["keypoints"] = kp
    return image, target


class RandomHorizontalFlip:
    """Training augmentation: ``hflip`` with probability ``p``.

    The random draw comes from the generator passed in, not a global one, so the data loader
    can seed it from (seed, epoch, position) and a resumed run flips the same images.
    """

    def __init__(self, p=0.5, keypoint_flip_map=None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.keypoint_flip_map = keypoint_flip_map

    def __call__(self, image, target, rng):
        if rng.random() < self.p:
            return hflip(image, target, self.keypoint_flip_map)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


# ---------------------------------------------------------------- normalize and batch


def normalize(images, mean, std):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(image / 255 - mean) / std``.

    ``mean`` and ``std`` are per channel on the [0, 1] scale (ImageNet's, for a pretrained
    backbone).  Takes one image or a list; returns the same.
    """
    if isinstance(images, (list, tuple)):
        return [normalize(im, mean, std) for im in images]
    image = images
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"normalize: expected an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    xp = get_array_module(image)
    scale = 255.0 if image.dtype == xp.uint8 else 1.0
    mean = xp.asarray(mean, dtype=xp.float32).reshape(3, 1, 1)
    std = xp.asarray(std, dtype=xp.float32).reshape(3, 1, 1)
    chw = xp.transpose(image, (2, 0, 1)).astype(xp.float32) / scale
    return (chw - mean) / std


def batch_images(images, size_divisible=32):
    """Zero-pad (C, H, W) images at the bottom and right into one (N, C, Hp, Wp) float32 array.

    Hp and Wp are the largest height and width rounded up to a multiple of ``size_divisible``.
    Returns ``(batch, sizes)`` with ``sizes`` the list of each image's (H, W) before padding:
    boxes stay valid (padding only adds pixels after the image), and the model clips proposals
    to the true size, not the padded one.
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


__all__ = ["resize", "resized_size", "resize_image", "resize_masks", "resize_boxes", "hflip",
           "flip_boxes", "RandomHorizontalFlip", "normalize", "batch_images"]
