"""COCO's category names and keypoints, for drawing predictions and flipping keypoints.

Plain constants at the bottom of the package (this file imports nothing), so that the data
(``data/coco.py``: flip maps, OKS sigmas), the weight converter (``interop.py``: the names of
torchvision's 91 outputs) and the drawings can all reach them without the model importing data.

COCO 2017 has 80 object categories with ids 1..90 (ten ids unused).  Models trained by
torchvision predict the category id itself as the label (91 outputs, the unused ones never
trained); models trained here through ``CocoDataset`` predict contiguous labels 1..80 and map
them back with ``dataset.label_to_cat_id``.  Either way this table names them.

The person keypoints (17, in COCO's order) come with their mirror twins: when an image is
flipped left-right, a left eye becomes a right eye (``hflip(..., keypoint_flip_map=...)``).
"""

COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)


def _flip_map(names):
    """For each keypoint, the index of its mirror twin (itself if it has none, like the nose)."""
    index = {n: i for i, n in enumerate(names)}
    twin = lambda n: n.replace("left_", "R_").replace("right_", "left_").replace("R_", "right_")
    return tuple(index[twin(n)] for n in names)


COCO_KEYPOINT_FLIP_MAP = _flip_map(COCO_KEYPOINT_NAMES)

# The limbs drawn between keypoints, 1-based pairs as in COCO's person category "skeleton".
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
                 (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))

# OKS falloff per keypoint (COCO's keypoint evaluation; pycocotools' default kpt_oks_sigmas):
# how far, relative to the object's size, annotators disagree on where each keypoint is.
COCO_KEYPOINT_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                        0.107, 0.107, 0.087, 0.087, 0.089, 0.089)


def keypoint_flip_map(names):
    """For each keypoint named ``left_*``/``right_*``, the index of its mirror twin."""
    return _flip_map(tuple(names))


def coco_class_names(num_classes=91):
    """Names of labels 1..num_classes-1 when labels *are* COCO ids (torchvision's models);
    unused ids are named "N/A" as torchvision does."""
    return tuple(COCO_CATEGORIES.get(i, "N/A") for i in range(1, num_classes))


__all__ = ["COCO_CATEGORIES", "COCO_KEYPOINT_NAMES", "COCO_KEYPOINT_FLIP_MAP", "COCO_SKELETON",
           "COCO_KEYPOINT_SIGMAS", "keypoint_flip_map", "coco_class_names"]
