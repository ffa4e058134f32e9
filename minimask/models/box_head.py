"""The box branch of the RoI heads: classify each RoI and refine its box (paper Sec. 3, Fig. 4).

Mask R-CNN keeps Faster R-CNN's second stage unchanged (Sec. 3: "The second stage ... in
parallel to predicting the class and box offset, Mask R-CNN also outputs a binary mask"):

    RoIAlign 7x7 -> flatten -> fc6 -> ReLU -> fc7 -> ReLU -> cls_score (K+1)
                                                        -> bbox_pred (4 (K+1), one box per class)

The two fc layers of 1024 are the FPN paper's "2-fc MLP head" (Fig. 4 right of Mask R-CNN,
FPN Sec. 4.2).  Training uses L_cls + L_box of Eq. 1; inference turns the outputs into final
detections (Sec. 3.1, "Inference").  Names follow torchvision's ``TwoMLPHead`` and
``FastRCNNPredictor`` so that its weights map one to one.
"""

import math

from .. import functional as F
from .. import nn
from ..backend import get_array_module
from ..ops import batched_nms, clip_boxes, remove_small_boxes


class BoxHead(nn.Module):
    """Two fully connected layers on the flattened pooled features (torchvision ``TwoMLPHead``)."""

    def __init__(self, in_features, dim):
        super().__init__()
        self.fc6 = nn.Linear(in_features, dim)
        self.fc7 = nn.Linear(dim, dim)

    def forward(self, x):
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: NumPy cannot infer it for 0 RoIs
        x = F.relu(self.fc6(x))
        return F.relu(self.fc7(x))


class BoxPredictor(nn.Module):
    """Class scores (K+1, background first) and class-specific box deltas (4 per class).

    Initialised as Detectron2's ``FastRCNNOutputLayers``: small Gaussian weights (std 0.01 for
    the scores, 0.001 for the deltas) and zero biases, so that an untrained head predicts nearly
    uniform classes and boxes close to the proposals, and the first steps are gentle.
    """

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets, beta=1.0 / 9):
    """L_cls and L_box of Eq. 1 over the sampled RoIs of the whole batch.

    class_logits (S, K+1) and box_regression (S, 4 (K+1)) are Tensors; labels (S,) int and
    regression_targets (S, 4) plain arrays.  As Fast R-CNN (Sec. 2.3) the box loss is taken
    only on positive RoIs and only on the four deltas of their ground-truth class; as
    torchvision it is a smooth L1 (beta 1/9 there, ``cfg.box_smooth_l1_beta`` here) summed and
    divided by the number of *sampled* RoIs (not of positives), which weighs it against L_cls by
    the positive fraction.
    """
    xp = get_array_module(labels)
    loss_cls = F.cross_entropy(class_logits, labels)
    num_sampled = labels.shape[0]
    pos = xp.nonzero(labels > 0)[0]
    per_class = box_regression.reshape(num_sampled, box_regression.shape[1] // 4, 4)
    deltas = per_class[pos, labels[pos]]  # (P, 4): the deltas of each positive's own class only
    target = regression_targets[pos].astype(deltas.dtype, copy=False)
    loss_box = F.smooth_l1_loss(deltas, target, beta=beta, reduction="sum") / float(max(num_sampled, 1))
    return loss_cls, loss_box


def postprocess_detections(class_probs, boxes_per_class, image_sizes, rois_per_image,
                           score_thresh, nms_thresh, detections_per_img, min_size=1e-2):
    """Final detections from the box head's outputs (Sec. 3.1, "Inference").

    class_probs (R, K+1) softmax scores and boxes_per_class (R, 4 (K+1)) decoded boxes, for the
    R proposals of the batch, image after image (``rois_per_image`` of each).  For each image,
    as torchvision's ``postprocess_detections``: every (RoI, class) pair except background is a
    candidate box; clip it to the image, keep score > ``score_thresh``, drop boxes thinner than
    ``min_size``, NMS within each class (Sec. 3.1: threshold 0.5), keep the best
    ``detections_per_img`` (100 in the paper).  Returns per image (boxes (N, 4), scores (N,),
    labels (N,) int64), sorted by falling score.
    """
    xp = get_array_module(class_probs)
    num_classes = class_probs.shape[1]
    results, start = [], 0
    for size, count in zip(image_sizes, rois_per_image):
        probs = class_probs[start:start + count]
        boxes = boxes_per_class[start:start + count]
        start += count
        boxes = clip_boxes(boxes.reshape(-1, 4), size).reshape(count, num_classes, 4)
        labels = xp.broadcast_to(xp.arange(num_classes, dtype=xp.int64), (count, num_classes))
        # Column 0 is background: never a detection.
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = probs[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)

        keep = xp.nonzero(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        results.append((boxes[keep], scores[keep], labels[keep]))
    return results
