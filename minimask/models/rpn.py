"""Region Proposal Network: where the detector first looks (Faster R-CNN Sec. 3.1, FPN Sec. 4.1).

Mask R-CNN (Sec. 3.1) keeps Faster R-CNN's first stage unchanged.  A small fully convolutional
*head* slides over every pyramid level P2..P6 and, at each location, scores the A anchors centred
there as object / not object and regresses a box correction for each (Faster R-CNN Fig. 3).
The head's weights are shared by all levels (FPN Sec. 4.1): the anchors, one size per level,
carry the scale.

Two things happen with its outputs:

1. **Proposals** (Faster R-CNN Sec. 3.3; torchvision's ``RegionProposalNetwork.filter_proposals``):
   decode every anchor's deltas into a box, keep the ``pre_nms_top_n`` best-scored anchors of
   each level, clip the boxes to the image (its size *before* padding), drop tiny and
   low-scoring ones, run NMS at 0.7 within each level, and keep the ``post_nms_top_n`` best per
   image.  Nothing here is differentiated: the proposals are plain arrays that the RoI heads
   treat as constants (the "approximate joint training" of Faster R-CNN Sec. 3.2).
2. **Losses** in training (Faster R-CNN Sec. 3.1.2, Eq. 1): each anchor is labelled by IoU with
   the ground truth (positive >= 0.7 or the best anchor of some object; negative < 0.3; in
   between ignored), 256 anchors per image are sampled at up to 1:1 positive to negative, and

       loss_rpn_cls = mean over sampled anchors of BCE(objectness logit, label)
       loss_rpn_box = sum over positive anchors of smooth_l1(deltas - targets, beta)
                      / number of sampled anchors

   with ``beta = cfg.rpn_smooth_l1_beta`` (1/9 as torchvision; Detectron2 uses 0, plain L1)

   (torchvision's normalisation; the regression targets are ``BoxCoder((1, 1, 1, 1)).encode``
   of the matched ground-truth box against the anchor, Faster R-CNN Eq. 2).

**Crowd regions.**  COCO marks crowds ("iscrowd") with one box around many unlabelled objects.
Training the anchors on those objects as background would teach the RPN to miss people in
crowds, so an anchor that would be *negative* and whose area lies more than 70% inside a crowd
box (intersection over the anchor's own area > 0.7, tensorpack's rule; ``ops.crowd_ignore_mask``,
the same rule as the RoI heads') is ignored instead.
Positive anchors, matched to real boxes, keep their label.

**Layout.**  The head gives objectness ``(N, A, H, W)`` and deltas ``(N, 4A, H, W)`` per level;
``AnchorGenerator`` orders each level's anchors as (y, x, anchor).  ``flatten_predictions``
permutes the outputs to that order, exactly as torchvision's ``permute_and_flatten``, so that
row i of the scores and deltas belongs to anchor i.
"""

import numpy as np

from .. import functional as F
from .. import nn
from ..backend import device_of, get_array_module
from ..functional.activation import stable_sigmoid
from ..ops import (
    AnchorGenerator,
    BalancedPositiveNegativeSampler,
    BoxCoder,
    Matcher,
    batched_nms,
    box_iou,
    clip_boxes,
    crowd_ignore_mask,
    remove_small_boxes,
)


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs: A objectness logits and 4A deltas.

    ``forward([P2, ..., P6]) -> (objectness list of (N, A, H, W), deltas list of (N, 4A, H, W))``.
    All three convs start from N(0, 0.01^2) weights and zero biases (Faster R-CNN Sec. 3.1.3).
    """

    def __init__(self, in_channels, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features):
        objectness, deltas = [], []
        for x in features:
            t = nn.conv_relu(self.conv, x)  # relu(conv(x)), one pass after the GEMM at inference
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas


def flatten_predictions(objectness, deltas):
    """Per-level head outputs -> ``(N, total)`` logits and ``(N, total, 4)`` deltas (Tensors).

    Level by level, in the anchors' (y, x, anchor) order:
    objectness (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A);
    deltas (N, 4A, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4).
    (The 4A channels are anchor-major: channel 4a + k is coordinate k of anchor a.)
    """
    flat_obj, flat_deltas = [], []
    for o, d in zip(objectness, deltas):
        n, a, h, w = o.shape
        if tuple(d.shape) != (n, 4 * a, h, w):
            raise ValueError(f"rpn: deltas of shape {tuple(d.shape)} do not match objectness "
                             f"{tuple(o.shape)} (expected {(n, 4 * a, h, w)})")
        flat_obj.append(o.permute(0, 2, 3, 1).reshape(n, h * w * a))
        d = d.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2)
        flat_deltas.append(d.reshape(n, h * w * a, 4))
    return F.concat(flat_obj, axis=1), F.concat(flat_deltas, axis=1)


class RegionProposalNetwork(nn.Module):
    """``rpn(features, image_sizes, batch_shape, targets=None) -> (proposals, losses)``.

    ``features`` are the pyramid levels [P2, ..., P6] (Tensors, one anchor size each);
    ``image_sizes`` the (h, w) of each image after resizing, before padding (proposals are
    clipped to these); ``batch_shape`` the padded (Hp, Wp) (anchor strides come from it).
    ``proposals`` is a list of (Ki, 4) arrays in the features' dtype and on their device (the
    RoI heads take them as they are), best first; ``losses`` holds ``loss_rpn_cls`` and
    ``loss_rpn_box`` in training mode and is empty in eval mode.
    ``targets`` (training): one dict per image, prepared by the model's transform (on the
    features' device, ``boxes`` (G, 4) float32 in resized-image pixels, ``crowd_boxes`` (M, 4)
    float32, possibly (0, 4); a missing ``crowd_boxes`` means none).  Nothing here moves them.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.anchor_sizes)
        # No fixed strides: as torchvision, each level's stride is padded size // feature size.
        # That is not always the backbone's nominal stride (P6 of an 800-row batch has 13 rows,
        # stride 61, not 64), and converted torchvision weights expect exactly those anchors.
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, (tuple(cfg.aspect_ratios),) * levels)
        num_anchors = self.anchor_generator.num_anchors_per_location()
        if len(set(num_anchors)) != 1:
            raise ValueError(f"rpn: the shared head needs the same number of anchors on every "
                             f"level, got {num_anchors}")
        self.head = RPNHead(cfg.fpn_out_channels, num_anchors[0])
        self.matcher = Matcher(cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(cfg.rpn_batch_size_per_image,
                                                       cfg.rpn_positive_fraction, seed=cfg.seed)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self._anchor_cache = {}

    # ---- settings that differ between training and testing --------------------------------
    def pre_nms_top_n(self):
        return self.cfg.rpn_pre_nms_top_n_train if self.training else self.cfg.rpn_pre_nms_top_n_test

    def post_nms_top_n(self):
        return self.cfg.rpn_post_nms_top_n_train if self.training else self.cfg.rpn_post_nms_top_n_test

    # ---- the whole stage ---------------------------------------------------------------
    def forward(self, features, image_sizes, batch_shape, targets=None):
        if len(features) != len(self.cfg.anchor_sizes):
            raise ValueError(f"rpn: expected {len(self.cfg.anchor_sizes)} feature maps (one per "
                             f"anchor size), got {len(features)}")
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"rpn: {len(image_sizes)} image sizes for a batch of {features[0].shape[0]}")
        if self.training and targets is None:
            raise ValueError("rpn: training mode needs targets (call .eval() for inference)")

        objectness, deltas = self.head(features)
        anchors = self.anchors(batch_shape, features)  # list of (H*W*A, 4) per level
        obj_flat, deltas_flat = flatten_predictions(objectness, deltas)

        # Proposals are constants for everything after this point: work on the arrays.
        boxes, _, _ = self.filter_proposals(obj_flat.data, deltas_flat.data, anchors, image_sizes)

        losses = {}
        if self.training:
            xp = get_array_module(anchors[0])
            all_anchors = xp.concatenate(anchors, axis=0)
            labels, regression_targets = self.assign_targets(all_anchors, targets)
            losses = self.compute_loss(obj_flat, deltas_flat, labels, regression_targets)
        return boxes, losses

    def anchors(self, batch_shape, features):
        """The anchors of every level for this batch shape (cached: they depend on shapes only)."""
        shapes = tuple(tuple(f.shape[2:]) for f in features)
        dtype, device = features[0].dtype, device_of(features[0].data)
        key = (tuple(batch_shape), shapes, np.dtype(dtype).str, device)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 8:  # multi-scale training sees a few shapes; stay small
                self._anchor_cache.clear()
            self._anchor_cache[key] = self.anchor_generator(tuple(batch_shape), list(shapes),
                                                            dtype=dtype, device=device)
        return self._anchor_cache[key]

    # ---- proposals (no gradient) ---------------------------------------------------------
    def filter_proposals(self, objectness, deltas, anchors, image_sizes):
        """Arrays in, arrays out: per image lists of boxes (K, 4) in the deltas' dtype, scores, levels.

        ``objectness`` (N, total) logits, ``deltas`` (N, total, 4), ``anchors`` one array per
        level.  Boxes come best first (the order NMS keeps them in).
        """
        xp = get_array_module(objectness)
        n = objectness.shape[0]
        pre_n, post_n = self.pre_nms_top_n(), self.post_nms_top_n()

        # 1. Per level, the pre_n highest logits (sigmoid is monotonic: no need to apply it yet).
        #    argpartition finds them without sorting the whole level; NMS sorts them later.
        picked, level_ids, start = [], [], 0
        for level, a in enumerate(anchors):
            count = a.shape[0]
            scores = objectness[:, start:start + count]
            k = min(pre_n, count)
            if k < count:
                top = xp.argpartition(-scores, k - 1, axis=1)[:, :k]
            else:
                top = xp.broadcast_to(xp.arange(count), (n, count))
            picked.append(top + start)
            level_ids.append(xp.full((k,), level, dtype=xp.int64))
            start += count
        if start != objectness.shape[1]:
            raise ValueError(f"rpn: {objectness.shape[1]} predictions per image for {start} anchors")
        idx = xp.concatenate(picked, axis=1)  # (N, K) indices into the concatenated anchors
        levels = xp.concatenate(level_ids)  # (K,)
        all_anchors = xp.concatenate(anchors, axis=0)

        # 2. Decode only the chosen anchors (the others can never become proposals).
        rows = xp.arange(n)[:, None]
        top_deltas = deltas[rows, idx].reshape(-1, 4)
        decoded = self.box_coder.decode(top_deltas, all_anchors[idx.reshape(-1)]).reshape(n, -1, 4)
        probs = stable_sigmoid(objectness[rows, idx])  # (N, K)

        # 3. Per image: clip, drop small and low-scoring boxes, NMS per level, keep the best.
        out_boxes, out_scores, out_levels = [], [], []
        for i in range(n):
            b = clip_boxes(decoded[i], image_sizes[i])
            keep = remove_small_boxes(b, self.cfg.rpn_min_size)
            keep = keep[probs[i][keep] >= self.cfg.rpn_score_thresh]
            b, s, lv = b[keep], probs[i][keep], levels[keep]
            keep = batched_nms(b, s, lv, self.cfg.rpn_nms_thresh)[:post_n]
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
            out_levels.append(lv[keep])
        return out_boxes, out_scores, out_levels

    # ---- training targets (no gradient) ------------------------------------------------
    def assign_targets(self, anchors, targets):
        """Label every anchor of every image and make its regression target.

        Returns two lists (one entry per image): labels (total,) int64 with 1 positive, 0
        negative, -1 ignored; and regression targets (total, 4), zero except at positives.
        """
        xp = get_array_module(anchors)
        labels_list, reg_list = [], []
        for i, t in enumerate(targets):
            # Targets arrive prepared (on the device, float32 boxes; models/transform.py); a
            # float64 model (the gradient checks) still matches them in its own precision.
            gt = t["boxes"].astype(anchors.dtype, copy=False)
            # A box of zero area has best IoU 0, which the low-quality rule would turn into
            # "every anchor is positive", with log(0) regression targets: refuse it.
            flat = (gt[:, 2] <= gt[:, 0]) | (gt[:, 3] <= gt[:, 1])
            if bool(flat.any()):
                j = int(xp.nonzero(flat)[0][0])
                raise ValueError(f"rpn: target box {j} of image {i} is {gt[j].tolist()}: boxes must be "
                                 "x1, y1, x2, y2 with positive width and height (drop empty boxes first)")
            labels = xp.zeros((anchors.shape[0],), dtype=xp.int64)  # no objects: all background
            reg = xp.zeros(anchors.shape, dtype=anchors.dtype)
            if gt.shape[0] > 0:
                matched = self.matcher(box_iou(gt, anchors))  # gt index, -1 below, -2 between
                labels[matched >= 0] = 1
                labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
                pos = xp.nonzero(matched >= 0)[0]
                reg[pos] = self.box_coder.encode(gt[matched[pos]], anchors[pos])
            labels[(labels == 0) & crowd_ignore_mask(anchors, t.get("crowd_boxes"))] = -1
            labels_list.append(labels)
            reg_list.append(reg)
        return labels_list, reg_list

    def compute_loss(self, objectness, deltas, labels, regression_targets):
        """BCE over the sampled anchors and smooth L1 over the positive ones (Tensors)."""
        xp = get_array_module(objectness.data)
        n, total = objectness.shape
        pos_idx, neg_idx = [], []
        for i, (pos_mask, neg_mask) in enumerate(self.sampler(labels)):
            pos_idx.append(xp.nonzero(pos_mask)[0] + i * total)  # into the (N * total) rows
            neg_idx.append(xp.nonzero(neg_mask)[0] + i * total)
        pos = xp.concatenate(pos_idx)
        sampled = xp.concatenate([pos] + neg_idx)
        all_labels = xp.concatenate(labels)
        all_targets = xp.concatenate(regression_targets, axis=0)

        logits = objectness.reshape(n * total)[sampled]
        loss_cls = F.binary_cross_entropy_with_logits(
            logits, all_labels[sampled].astype(objectness.dtype))
        box_sum = F.smooth_l1_loss(deltas.reshape(n * total, 4)[pos], all_targets[pos],
                                   beta=self.cfg.rpn_smooth_l1_beta, reduction="sum")
        loss_box = box_sum / float(max(int(sampled.shape[0]), 1))
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}


__all__ = ["RPNHead", "RegionProposalNetwork", "flatten_predictions"]
