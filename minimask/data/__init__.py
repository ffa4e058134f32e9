"""Data: synthetic shapes, COCO reading, transforms and batching (issue 5).

- ``shapes``: a synthetic COCO-format instance segmentation set (``minimask data shapes``).
- ``coco``: ``CocoDataset``, one COCO JSON plus its images, as (image, target) pairs.
- ``transforms``: horizontal flips (the model resizes, normalizes and batches its own input).
- ``synthetic``: the data sets minimask draws itself, by name (``GENERATORS``).
- ``loader``: ``DataLoader``, seeded resumable order, background prefetch.
"""

from ..categories import COCO_CATEGORIES, COCO_KEYPOINT_FLIP_MAP, COCO_KEYPOINT_NAMES, coco_class_names
from .coco import CocoDataset
from .loader import DataLoader
from .shapes import make_shapes, make_split
from .transforms import RandomHorizontalFlip, flip_boxes, hflip

__all__ = ["CocoDataset", "DataLoader", "make_shapes", "make_split", "RandomHorizontalFlip", "hflip",
           "flip_boxes", "COCO_CATEGORIES", "COCO_KEYPOINT_NAMES", "COCO_KEYPOINT_FLIP_MAP",
           "coco_class_names"]
