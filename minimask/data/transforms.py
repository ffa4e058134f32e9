"""Data augmentation: horizontal flips of an image with its boxes, masks and keypoints.

Horizontal flips (probability 0.5) are the one augmentation of the reference implementations
(Detectron, Detectron2, torchvision's references/detection), as in Fast R-CNN before them; the
Mask R-CNN paper itself lists none for its COCO models beyond Sec. 5's scale jitter.  The
rest of the input pipeline (resize, normalize, pad into a batch) is the model's own:
``models/transform.py``, as torchvision's ``GeneralizedRCNNTransform``, so the model takes
images of any size and the data knows nothing of the model.

Images here are (H, W, 3) arrays; a target is the dict of ``CocoDataset``: ``boxes`` (N, 4)
xyxy in pixels, ``masks`` (N, H, W), ``crowd_boxes`` (M, 4), ``keypoints`` (N, J, 3), and any
other keys, which are carried along unchanged.  Every function returns a new target and leaves
its input alone.  The array code uses only what NumPy and CuPy share.
"""


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


__all__ = ["hflip", "flip_boxes", "RandomHorizontalFlip"]
