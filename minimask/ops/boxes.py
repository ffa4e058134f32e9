"""Box geometry: area, IoU and IoA, clipping, and the Faster R-CNN box parameterization.

Boxes are ``(N, 4)`` arrays of ``x1, y1, x2, y2`` in pixels, with width ``x2 - x1`` (no +1), as
in torchvision and Detectron2.  Everything here takes and returns plain NumPy or CuPy arrays (no
Tensors): box geometry is never differentiated in Mask R-CNN; the losses differentiate the
predicted *deltas*, and ``BoxCoder.encode`` only makes their targets.

- IoU (intersection over union) is the overlap measure used everywhere: to label anchors and
  proposals (Faster R-CNN, Ren et al. 2015, Sec. 3.1.2; Mask R-CNN Sec. 3.1 "Training": an RoI
  is positive if its IoU with a ground-truth box is at least 0.5), and in NMS.
- IoA (intersection over the first box's area) decides which anchors and proposals lie in
  a crowd region, to be ignored in training.
- ``BoxCoder`` is the box regression target of Faster R-CNN Sec. 3.1.2 (Eq. 2), which it takes
  from R-CNN (Girshick et al. 2014, Appendix C):

      tx = (x - xa) / wa,  ty = (y - ya) / ha,  tw = log(w / wa),  th = log(h / ha)

  with (x, y, w, h) the centre and size of the target box and (xa, ya, wa, ha) those of the anchor
  (or proposal).  Following torchvision's ``BoxCoder`` / Detectron2's ``Box2BoxTransform``, each
  target is multiplied by a weight (1, 1, 1, 1 for the RPN; 10, 10, 5, 5 for the box head, which
  brings the targets to roughly unit variance).
"""

import math

from ..backend import get_array_module


def _check_boxes(boxes, name="boxes"):
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as x1, y1, x2, y2; got {tuple(boxes.shape)}")


def box_area(boxes):
    """Area ``(x2 - x1) * (y2 - y1)`` of each of the ``(N, 4)`` boxes, shape ``(N,)``."""
    _check_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _intersection(boxes1, boxes2):
    """``(N, M)`` intersection areas: the box between the larger top-left and the smaller
    bottom-right corner, empty (area 0) where those cross."""
    xp = get_array_module(boxes1, boxes2)
    top_left = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = xp.maximum(bottom_right - top_left, 0)  # crossed corners: no overlap, not negative
    return wh[:, :, 0] * wh[:, :, 1]


def box_iou(boxes1, boxes2):
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes: an ``(N, M)`` array.

    IoU = |A intersect B| / |A union B|.

    Where the union is 0 (two zero-area boxes) torchvision returns 0/0 = NaN; we return 0, since
    such boxes do not overlap in any useful sense and a NaN would leak into the Matcher (NaN
    fails every threshold comparison and so is neither background nor ignored).  NMS reaches the
    same answer: a NaN IoU is not "greater than the threshold", so it never suppresses.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    xp = get_array_module(boxes1, boxes2)
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    safe_union = xp.where(union > 0, union, 1)  # inter is 0 wherever union is 0
    return inter / safe_union


def box_ioa(boxes, regions):
    """Pairwise intersection over the area of the *first* boxes: an ``(N, M)`` array.

    IoA = |box intersect region| / |box|: how much of each box lies inside each region.  Unlike
    IoU it is not symmetric, and a small box wholly inside a large region scores 1 (its IoU would
    be small).  That is what a crowd region needs (``crowd_ignore_mask``), and what COCO's own
    evaluation uses for crowd ground truth.  A zero-area box has IoA 0 with everything.
    """
    _check_boxes(boxes, "boxes")
    _check_boxes(regions, "regions")
    xp = get_array_module(boxes, regions)
    return _intersection(boxes, regions) / xp.maximum(box_area(boxes), 1e-12)[:, None]


# An anchor or proposal with more than this fraction of its area inside a crowd region is
# ignored in training (Detectron's CROWD_FILTER_THRESH, tensorpack's anchor rule).
CROWD_IOA_THRESH = 0.7


def crowd_ignore_mask(boxes, crowd_boxes, threshold=CROWD_IOA_THRESH):
    """``(N,)`` bool: True for boxes lying mostly inside some crowd region, IoA > ``threshold``.

    COCO marks groups of objects too dense to outline one by one as ``iscrowd`` regions.  Such a
    region is no ground truth to learn a box from, but an anchor or RoI inside it is not
    background either: training it as background would teach the detector to miss the people
    in a crowd.  Both stages therefore ignore such boxes (neither positive nor negative), the
    RPN for its would-be negative anchors, the RoI heads for their proposals (Detectron's
    ``_filter_crowd_proposals``).  The overlap is IoA (``box_ioa``), not IoU, since a small box
    inside a large crowd region has a small IoU but is still covered.  ``crowd_boxes`` may be
    None or empty (no crowd: nothing is ignored).
    """
    xp = get_array_module(boxes)
    if crowd_boxes is None or len(crowd_boxes) == 0 or len(boxes) == 0:
        return xp.zeros((len(boxes),), dtype=bool)
    return box_ioa(boxes, crowd_boxes).max(axis=1) > threshold


def clip_boxes(boxes, image_size):
    """Clip ``(N, 4)`` boxes to an image of ``image_size = (height, width)``.

    x is clamped to [0, width] and y to [0, height] (the image's outer edges, as torchvision's
    ``clip_boxes_to_image``).  Returns a new array; proposals leaving the image are clipped before
    NMS (Faster R-CNN Sec. 3.3, "Implementation Details").
    """
    _check_boxes(boxes)
    xp = get_array_module(boxes)
    height, width = image_size
    out = boxes.copy()
    out[:, 0::2] = xp.clip(boxes[:, 0::2], 0, width)
    out[:, 1::2] = xp.clip(boxes[:, 1::2], 0, height)
    return out


def remove_small_boxes(boxes, min_size):
    """Indices of the boxes whose width and height are both ``>= min_size`` (an int64 array)."""
    _check_boxes(boxes)
    xp = get_array_module(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return xp.nonzero(keep)[0].astype(xp.int64)


class BoxCoder:
    """Encode boxes as deltas relative to reference boxes, and decode them back.

    ``weights = (wx, wy, ww, wh)`` scale the four targets (Faster R-CNN Eq. 2 times a weight):

        dx = wx * (gx - px) / pw     dy = wy * (gy - py) / ph
        dw = ww * log(gw / pw)       dh = wh * log(gh / ph)

    where (px, py, pw, ph) is the centre and size of the anchor or proposal and (gx, gy, gw, gh)
    those of the box being encoded.  ``decode`` inverts this, first clamping dw and dh at
    ``bbox_xform_clip = log(1000 / 16)`` so that ``exp`` cannot blow up early in training (a box
    may grow at most 62.5 times the anchor's size, as in torchvision and Detectron2).
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"weights must be four numbers (wx, wy, ww, wh); got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, reference_boxes, proposals):
        """Deltas ``(N, 4)`` that take each of ``proposals`` onto its ``reference_boxes`` row.

        ``reference_boxes`` are the targets (the matched ground-truth boxes), ``proposals`` the
        anchors or proposals they are encoded against (torchvision's argument order).  Lists of
        per-image arrays are accepted too and give a list back, split the same way.
        """
        if isinstance(reference_boxes, (list, tuple)):
            xp = get_array_module(*reference_boxes)
            sizes = [len(b) for b in reference_boxes]
            deltas = self.encode(xp.concatenate(reference_boxes), xp.concatenate(proposals))
            return list(xp.split(deltas, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]))
        _check_boxes(reference_boxes, "reference_boxes")
        _check_boxes(proposals, "proposals")
        if reference_boxes.shape != proposals.shape:
            raise ValueError(f"reference_boxes {tuple(reference_boxes.shape)} and proposals "
                             f"{tuple(proposals.shape)} must pair up row by row")
        xp = get_array_module(reference_boxes, proposals)
        wx, wy, ww, wh = self.weights

        pw = proposals[:, 2] - proposals[:, 0]
        ph = proposals[:, 3] - proposals[:, 1]
        px = proposals[:, 0] + 0.5 * pw
        py = proposals[:, 1] + 0.5 * ph

        gw = reference_boxes[:, 2] - reference_boxes[:, 0]
        gh = reference_boxes[:, 3] - reference_boxes[:, 1]
        gx = reference_boxes[:, 0] + 0.5 * gw
        gy = reference_boxes[:, 1] + 0.5 * gh

        dx = wx * (gx - px) / pw
        dy = wy * (gy - py) / ph
        dw = ww * xp.log(gw / pw)
        dh = wh * xp.log(gh / ph)
        return xp.stack([dx, dy, dw, dh], axis=1)

    def decode(self, deltas, boxes):
        """Apply ``deltas`` to ``boxes``: the predicted boxes, in the shape of ``deltas``.

        ``deltas`` is ``(N, 4)``, or ``(N, 4 * K)`` for class-specific regression (the box head
        predicts one box per class, Faster R-CNN / Fast R-CNN Sec. 2.3): every group of four is
        applied to the same reference box, giving ``(N, 4 * K)`` boxes, as torchvision's
        ``decode_single``.  ``boxes`` is ``(N, 4)``.  The result has the dtype of ``deltas``.
        """
        _check_boxes(boxes)
        if deltas.ndim != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != boxes.shape[0]:
            raise ValueError(f"deltas must have shape (N, 4*K) with N = {boxes.shape[0]} boxes; "
                             f"got {tuple(deltas.shape)}")
        xp = get_array_module(deltas, boxes)
        boxes = boxes.astype(deltas.dtype, copy=False)
        wx, wy, ww, wh = self.weights

        widths = boxes[:, 2:3] - boxes[:, 0:1]  # (N, 1): broadcasts over the K classes
        heights = boxes[:, 3:4] - boxes[:, 1:2]
        ctr_x = boxes[:, 0:1] + 0.5 * widths
        ctr_y = boxes[:, 1:2] + 0.5 * heights

        dx = deltas[:, 0::4] / wx  # (N, K)
        dy = deltas[:, 1::4] / wy
        # Clamp before exp: an untrained head can predict huge dw and exp would overflow to inf.
        dw = xp.minimum(deltas[:, 2::4] / ww, self.bbox_xform_clip)
        dh = xp.minimum(deltas[:, 3::4] / wh, self.bbox_xform_clip)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (xp.exp(dw) * widths)
        half_h = 0.5 * (xp.exp(dh) * heights)

        out = xp.empty_like(deltas)
        out[:, 0::4] = pred_ctr_x - half_w
        out[:, 1::4] = pred_ctr_y - half_h
        out[:, 2::4] = pred_ctr_x + half_w
        out[:, 3::4] = pred_ctr_y + half_h
        return out
