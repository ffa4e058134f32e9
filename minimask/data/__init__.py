"""Data: synthetic shapes, COCO reading, transforms and batching (issue 5).

- ``shapes``: a synthetic COCO-format instance segmentation set (``minimask data shapes``).
- ``coco``: ``CocoDataset``, one COCO JSON plus its images, as (image, target) pairs.
- ``transforms``: resize, flip, normalize, pad-and-batch (Sec. 3.1's input pipeline).
- ``loader``: ``DataLoader``, seeded resumable order, background prefetch.
"""

from .categories import COCO_CATEGORIES, COCO_KEYPOINT_FLIP_MAP, COCO_KEYPOINT_NAMES, coco_class_names
from .coco import CocoDataset
from .loader import DataLoader
from .shapes import make_shapes, make_split
from .transforms import (
    RandomHorizontalFlip,
    batch_images,
    hflip,
    normalize,
    resize,
    resize_boxes,
    resized_size,
)

__all__ = ["CocoDataset", "DataLoader", "make_shapes", "make_split", "RandomHorizontalFlip",
           "batch_images", "hflip", "normalize", "resize", "resize_boxes", "resized_size",
           "COCO_CATEGORIES", "COCO_KEYPOINT_NAMES", "COCO_KEYPOINT_FLIP_MAP", "coco_class_names"]
