"""Non-maximum suppression, plain and per group (torchvision ``ops/boxes.py`` semantics).

NMS removes duplicate detections of one object.  It is used twice in Mask R-CNN: on RPN proposals
(Faster R-CNN Sec. 3.3: "we adopt non-maximum suppression (NMS) on the proposal regions based on
their cls scores. We fix the IoU threshold for NMS at 0.7"), per pyramid level in the FPN version;
and per class on the final detections (Mask R-CNN Sec. 3.1, "Inference", threshold 0.5).

The loops live in ``minimask/kernels/nms.py`` (NumPy reference, Numba, CUDA); this file checks
the input and picks the kernel for the array's device.
"""

from ..backend import get_array_module
from ..kernels.nms import nms_kernel


def _check(boxes, scores):
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2; got {tuple(boxes.shape)}")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), one per box; "
                         f"got {tuple(scores.shape)}")


def nms(boxes, scores, iou_threshold):
    """Greedy NMS: the indices (int64) of the boxes kept, by falling score.

    Boxes are visited from the highest score down (equal scores in input order); a box is
    dropped when a box kept before it has IoU *strictly greater* than ``iou_threshold`` with it.
    """
    _check(boxes, scores)
    xp = get_array_module(boxes)
    if boxes.shape[0] == 0:
        return xp.zeros((0,), dtype=xp.int64)
    return nms_kernel(boxes, scores, float(iou_threshold))


def batched_nms(boxes, scores, idxs, iou_threshold):
    """NMS within each group (class, or image, or pyramid level) given by ``idxs``, never across.

    torchvision's trick: move every group to its own region of the plane, far enough that boxes
    of different groups cannot overlap, and run one NMS over all boxes.  Group g is shifted by
    ``g * (span + 1)``, where ``span = max - min`` over all coordinates (torchvision uses ``max + 1``,
    which lets groups overlap when coordinates go below -1).  The shift is done in float64 so that
    it does not round the boxes (in float32, shifting by 80 classes x 1000 pixels would move a box
    by up to 1/128 of a pixel and could change which boxes are kept).

    Returns the kept indices (int64) by falling score, as ``nms``.
    """
    _check(boxes, scores)
    xp = get_array_module(boxes)
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape {tuple(scores.shape)}, one group per box; "
                         f"got {tuple(idxs.shape)}")
    if boxes.shape[0] == 0:
        return xp.zeros((0,), dtype=xp.int64)
    boxes64 = boxes.astype(xp.float64)
    span = boxes64.max() - boxes64.min()
    offsets = idxs.astype(xp.float64) * (span + 1.0)
    return nms(boxes64 + offsets[:, None], scores, iou_threshold)
