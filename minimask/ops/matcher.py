"""Label anchors/proposals by IoU with the ground truth, and sample a balanced mini-batch.

``Matcher`` (torchvision ``models/detection/_utils.py``, Detectron2 ``modeling/matcher.py``):

- RPN (Faster R-CNN, Sec. 3.1.2): an anchor is positive when its IoU with some ground-truth box
  is above 0.7, or when it has the highest IoU with a ground-truth box (so that every object gets
  at least one anchor, even when no anchor reaches 0.7); negative when its IoU is below 0.3 for
  all ground-truth boxes; anchors in between do not contribute to training.
  -> ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.
- Box and mask heads (Mask R-CNN, Sec. 3.1, "Training"): "An RoI is considered positive if it
  has IoU with a ground-truth box of at least 0.5 and negative otherwise."
  -> ``Matcher(0.5, 0.5, allow_low_quality_matches=False)``.

``BalancedPositiveNegativeSampler``: each image contributes a fixed number of examples with at
most a given fraction of positives, the rest filled with negatives -- 256 anchors at up to 1:1
for the RPN (Faster R-CNN, Sec. 3.1.3), 512 RoIs at 1:3 for the heads (Mask R-CNN, Sec. 3.1:
"sampled RoIs ... with a ratio of 1:3 of positive to negatives").
"""

import numpy as np

from ..backend import get_array_module, is_cupy_array, to_device


class Matcher:
    """Assign each prediction (column) to its best ground-truth box (row) of an IoU matrix.

    ``matcher(iou)`` with ``iou`` of shape ``(num_gt, num_pred)`` returns an int64 array of
    ``num_pred`` entries: the index of the matched ground-truth box where the best IoU is
    ``>= high_threshold``; ``BELOW_LOW_THRESHOLD`` (-1, background) where it is
    ``< low_threshold``; ``BETWEEN_THRESHOLDS`` (-2, ignored) otherwise.

    With ``allow_low_quality_matches``, every prediction whose IoU with some ground-truth box
    equals that box's highest IoU (over all predictions; ties all count) keeps its match even
    when it is below ``high_threshold``.  As in torchvision, such a prediction is matched to *its
    own* best ground-truth box (the first one on a tie), which is almost always that box.

    A ground-truth box whose best IoU is 0 would, under this rule, make every prediction with
    IoU 0 to it positive; torchvision does the same, and the same happens here, so give real
    (non-empty) ground-truth boxes.  With no ground-truth boxes at all every prediction is
    background (-1), as torchvision's heads treat an image without objects.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold "
                             f"({high_threshold})")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix):
        iou = match_quality_matrix
        if iou.ndim != 2:
            raise ValueError(f"expected an IoU matrix of shape (num_gt, num_pred); got {tuple(iou.shape)}")
        xp = get_array_module(iou)
        num_gt, num_pred = iou.shape
        if num_gt == 0:  # an image without objects: everything is background
            return xp.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=xp.int64)
        if num_pred == 0:
            return xp.zeros((0,), dtype=xp.int64)

        matched_vals = iou.max(axis=0)  # best IoU of each prediction
        matches = iou.argmax(axis=0).astype(xp.int64)  # ... and the gt giving it (first on ties)
        all_matches = matches.copy() if self.allow_low_quality_matches else None

        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            # For each gt, the predictions reaching its best IoU (all of them on ties) get their
            # match back: no object is left without an anchor.
            best_per_gt = iou.max(axis=1)  # (num_gt,)
            is_best = iou == best_per_gt[:, None]  # (num_gt, num_pred)
            preds = xp.nonzero(is_best.any(axis=0))[0]
            matches[preds] = all_matches[preds]
        return matches


class BalancedPositiveNegativeSampler:
    """Pick up to ``batch_size_per_image`` examples per image, at most ``positive_fraction`` positive.

    ``sampler(matched_labels_list)`` takes one label array per image (``>= 1`` positive, ``0``
    negative, ``-1`` ignored) and returns one ``(pos_mask, neg_mask)`` pair of boolean arrays per
    image.  As torchvision: ``num_pos = min(#positives, int(batch_size * positive_fraction))``,
    then ``num_neg = min(#negatives, batch_size - num_pos)`` (negatives fill the places positives
    leave free), each drawn uniformly without replacement by a random permutation.

    The draws come from the sampler's own ``numpy.random.Generator`` (seeded by ``seed``), on the
    CPU even for CuPy labels (the chosen indices are then moved to the GPU), so that a seed gives
    the same sample on either device.
    """

    def __init__(self, batch_size_per_image, positive_fraction, seed=None):
        if batch_size_per_image < 0:
            raise ValueError(f"batch_size_per_image must be >= 0; got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1]; got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.rng = np.random.default_rng(seed)

    def __call__(self, matched_labels_list):
        out = []
        for labels in matched_labels_list:
            if labels.ndim != 1:
                raise ValueError(f"expected one 1-D label array per image; got shape {tuple(labels.shape)}")
            xp = get_array_module(labels)
            labels_cpu = to_device(labels, "cpu")
            positive = np.nonzero(labels_cpu >= 1)[0]
            negative = np.nonzero(labels_cpu == 0)[0]

            num_pos = min(positive.size, int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.size, self.batch_size_per_image - num_pos)
            pos_idx = positive[self.rng.permutation(positive.size)[:num_pos]]
            neg_idx = negative[self.rng.permutation(negative.size)[:num_neg]]

            pos_mask = xp.zeros(labels.shape, dtype=bool)
            neg_mask = xp.zeros(labels.shape, dtype=bool)
            if is_cupy_array(labels):
                pos_idx, neg_idx = xp.asarray(pos_idx), xp.asarray(neg_idx)
            pos_mask[pos_idx] = True
            neg_mask[neg_idx] = True
            out.append((pos_mask, neg_mask))
        return out
