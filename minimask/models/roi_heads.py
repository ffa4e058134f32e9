"""RoI heads: Mask R-CNN's second stage, box, mask (and keypoint) branches per RoI (Sec. 3, 3.1, 5).

    features P2..P5, proposals ->  [training] add gt boxes, match (IoU >= 0.5), sample 512 at 1:3
                               ->  RoIAlign 7x7   -> box head      -> class scores, class-specific boxes
                               ->  RoIAlign 14x14 -> mask head     -> K masks of 28x28 per RoI
                               ->  RoIAlign 14x14 -> keypoint head -> J heatmaps of 56x56 (Sec. 5)

Each branch has one training helper and one inference helper, so that ``losses`` and ``detect``
read box -> mask -> keypoint: ``box_losses`` / ``detect_boxes``, ``mask_losses`` /
``detect_masks``, ``keypoint_losses`` / ``detect_keypoints``.

Training (Sec. 3.1, "Training"): "An RoI is considered positive if it has IoU with a
ground-truth box of at least 0.5 and negative otherwise.  The mask loss L_mask is defined only
on positive RoIs."  Each image samples ``box_batch_size_per_image`` RoIs (512) with up to
``box_positive_fraction`` (1/4) positives.  As torchvision and Detectron2, the ground-truth
boxes are added to the proposals first, so that every object has at least one perfect
positive RoI even when the RPN is still untrained.

Inference (Sec. 3.1, "Inference"): the box branch runs on all proposals, then NMS keeps the
top 100 detections, and "the mask branch is then applied to the highest scoring 100 detection
boxes" (not to the proposals): faster, and the masks are predicted on the refined boxes.

Everything that is not differentiated (matching, sampling, targets, decoding, NMS) stays on
plain NumPy / CuPy arrays; the losses are Tensors.  Module names follow torchvision's
``RoIHeads`` (``box_head.fc6``, ``box_predictor.cls_score``, ``mask_head.mask_fcn1``,
``mask_predictor.conv5_mask``...), so that its weights import unchanged.
"""

from .. import nn
from ..backend import get_array_module
from ..functional import softmax
from ..ops import BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_iou, crowd_ignore_mask
from ..tensor import no_grad
from .box_head import BoxHead, BoxPredictor, fastrcnn_loss, postprocess_detections
from .fpn import BackboneWithFPN
from .keypoint_head import (
    KeypointHead,
    KeypointPredictor,
    enlarge_boxes,
    heatmaps_to_keypoints,
    keypoint_loss,
    keypoints_to_heatmap,
)
from .mask_head import (
    MaskHead,
    MaskMLPHead,
    MaskMLPPredictor,
    MaskPredictor,
    mask_channels,
    mask_loss,
    mask_probabilities,
    project_masks_on_boxes,
)
from .poolers import MultiScaleRoIAlign, pooler_settings


class RoIHeads(nn.Module):
    """Box, mask and keypoint heads over FPN features (P2..P5).

    ``detections, losses = roi_heads(features, proposals, image_sizes, targets=None)``

    - features: list of Tensors (N, C, Hl, Wl), one per stride in ``strides`` (more maps, such
      as P6, are ignored: as in torchvision the heads pool only from P2..P5).
    - proposals: list of N arrays (Ki, 4), x1 y1 x2 y2 in resized-image pixels, in the features'
      dtype and on their device (as the RPN gives them).
    - image_sizes: list of N (h, w) after resizing, before padding (detections are clipped to it).
    - targets (training): list of N dicts as the model's transform prepares them, on the
      features' device: ``boxes`` (G, 4) float32, ``labels`` (G,) int64 in 1..K, ``masks``
      (G, H, W) uint8 in the same pixels (with ``cfg.mask_on``), ``keypoints`` (G, J, 3) float32
      (with ``cfg.keypoint_on``) and ``crowd_boxes`` (M, 4) float32 (a missing one means none).
      They are not checked or moved here (``models/transform.py`` does that once).

    ``strides`` are those of the pooled maps, the backbone's (``BackboneWithFPN.strides[:4]``
    by default), so the poolers need not guess them from image sizes.

    Training mode returns ``([], {"loss_cls", "loss_box", "loss_mask", "loss_keypoint"})`` (the
    last two with their branch on); eval mode returns one dict per image with ``boxes`` (D, 4),
    ``scores`` (D,), ``labels`` (D,) int64, ``mask_probs`` (D, 28, 28) and ``keypoints`` (D, J, 3),
    ``keypoints_scores`` (D, J) with their branch, sorted by falling score, and an empty loss dict.
    """

    def __init__(self, cfg, in_channels=None, strides=None):
        super().__init__()
        self.cfg = cfg
        in_channels = cfg.fpn_out_channels if in_channels is None else in_channels
        self.strides = tuple(BackboneWithFPN.strides[:4] if strides is None else strides)
        num_classes = cfg.num_classes

        # Poolers (no weights): RoIAlign on the level that suits each box (FPN Eq. 1).
        pool = dict(pooler_settings(cfg), strides=self.strides)
        self.box_roi_pool = MultiScaleRoIAlign(cfg.box_pool_size, **pool)
        if cfg.mask_on:
            self.mask_roi_pool = MultiScaleRoIAlign(cfg.mask_pool_size, **pool)

        self.box_head = BoxHead(in_channels * cfg.box_pool_size ** 2, cfg.box_head_dim)
        self.box_predictor = BoxPredictor(cfg.box_head_dim, num_classes)

        # The deconvolution doubles the pooled size: 14x14 features give 28x28 masks (m = 28).
        self.mask_resolution = 2 * cfg.mask_pool_size
        channels = mask_channels(cfg)
        if not cfg.mask_on:
            pass  # a box (+ keypoint) model, as torchvision's keypointrcnn
        elif cfg.mask_head_type == "mlp":
            self.mask_head = MaskMLPHead(in_channels * cfg.mask_pool_size ** 2, cfg.box_head_dim)
            self.mask_predictor = MaskMLPPredictor(cfg.box_head_dim, channels, self.mask_resolution,
                                                   init=cfg.mask_predictor_init)
        else:
            self.mask_head = MaskHead(in_channels, cfg.mask_head_dim, cfg.mask_head_convs)
            self.mask_predictor = MaskPredictor(cfg.mask_head_dim, cfg.mask_head_dim, channels,
                                                init=cfg.mask_predictor_init)

        # Sec. 5: the keypoint branch, K one-hot 56x56 masks per RoI (keypoint_head.py).
        if cfg.keypoint_on:
            self.keypoint_roi_pool = MultiScaleRoIAlign(cfg.keypoint_pool_size, **pool)
            self.keypoint_head = KeypointHead(in_channels, cfg.keypoint_head_dim, cfg.keypoint_head_convs)
            self.keypoint_predictor = KeypointPredictor(cfg.keypoint_head_dim, cfg.num_keypoints)

        self.box_coder = BoxCoder(cfg.bbox_reg_weights)
        self.matcher = Matcher(cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(cfg.box_batch_size_per_image,
                                                       cfg.box_positive_fraction, seed=cfg.seed)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, features, proposals, image_sizes, targets=None):
        features = list(features)[:len(self.strides)]
        if len(features) != len(self.strides):
            raise ValueError(f"roi_heads: expected {len(self.strides)} maps (strides {self.strides}), "
                             f"got {len(features)}")
        if len(proposals) != features[0].shape[0] or len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"roi_heads: {len(proposals)} proposal arrays and {len(image_sizes)} image "
                             f"sizes for a batch of {features[0].shape[0]} images")
        proposals = [p.reshape(-1, 4) for p in proposals]
        if self.training:
            if targets is None:
                raise ValueError("roi_heads: training mode needs targets (call .eval() for inference)")
            return [], self.losses(features, proposals, targets)
        with no_grad():
            return self.detect(features, proposals, image_sizes), {}

    def losses(self, features, proposals, targets):
        """L_cls + L_box + L_mask of Eq. 1 (+ L_keypoint, Sec. 5) for a batch, by name (Tensors).

        One sample of RoIs per image feeds every branch: the box branch reads them all, the mask
        and keypoint branches their positives."""
        samples = self.select_training_samples(proposals, targets)
        losses = self.box_losses(features, samples)
        if self.cfg.mask_on:
            losses["loss_mask"] = self.mask_losses(features, samples, targets)
        if self.cfg.keypoint_on:
            losses["loss_keypoint"] = self.keypoint_losses(features, samples, targets)
        return losses

    def detect(self, features, proposals, image_sizes):
        """Detections per image (plain arrays): the box branch on the proposals, then the mask
        and keypoint branches on the detected boxes (Sec. 3.1, "Inference")."""
        results = self.detect_boxes(features, proposals, image_sizes)
        if self.cfg.mask_on:
            self.detect_masks(features, results)
        if self.cfg.keypoint_on:
            self.detect_keypoints(features, results)
        return results

    # ---- training: which RoIs, and what they should predict ----------------------------------
    def label_proposals(self, proposals, target):
        """Match one image's proposals (with its gt boxes appended) to the ground truth.

        Returns (boxes (R + G, 4), matched_idxs (R + G,) int64 index of the matched gt box, 0
        where there is none, labels (R + G,) int64: gt class for positives, 0 background, -1
        ignored).
        """
        xp = get_array_module(proposals)
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        boxes = xp.concatenate([proposals, gt_boxes.astype(proposals.dtype)], axis=0)
        if len(gt_boxes) == 0:  # no objects: every RoI is background
            matched = xp.full((len(boxes),), Matcher.BELOW_LOW_THRESHOLD, dtype=xp.int64)
            labels = xp.zeros((len(boxes),), dtype=xp.int64)
        else:
            matched = self.matcher(box_iou(gt_boxes.astype(boxes.dtype), boxes))
            labels = gt_labels[xp.maximum(matched, 0)].astype(xp.int64)
        labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
        labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
        # Crowd regions (ops.crowd_ignore_mask, the RPN's rule too): only the proposals are
        # tested, never the appended gt boxes (as Detectron).
        ignore = crowd_ignore_mask(proposals, target.get("crowd_boxes"))
        labels[:len(proposals)][ignore] = -1
        return boxes, xp.maximum(matched, 0), labels

    def select_training_samples(self, proposals, targets):
        """Label and sample every image's RoIs.  Returns one dict per image with the sampled
        ``boxes`` (S, 4), ``labels`` (S,), ``matched_idxs`` (S,) and ``regression_targets``
        (S, 4) (BoxCoder deltas of the matched gt box against the RoI, weights (10, 10, 5, 5))."""
        labelled = [self.label_proposals(p, t) for p, t in zip(proposals, targets)]
        chosen = self.sampler([labels for _, _, labels in labelled])
        samples = []
        for (boxes, matched, labels), (pos, neg), target in zip(labelled, chosen, targets):
            xp = get_array_module(boxes)
            keep = xp.nonzero(pos | neg)[0]
            boxes, matched, labels = boxes[keep], matched[keep], labels[keep]
            # Only positives regress a box; the others keep zeros (never used by the loss).
            deltas = xp.zeros_like(boxes)
            pos = xp.nonzero(labels > 0)[0]
            if len(pos):
                gt_boxes = target["boxes"].astype(boxes.dtype)
                deltas[pos] = self.box_coder.encode(gt_boxes[matched[pos]], boxes[pos])
            samples.append(dict(boxes=boxes, labels=labels, matched_idxs=matched, regression_targets=deltas))
        return samples

    # ---- training: one loss per branch ---------------------------------------------------------
    def box_losses(self, features, samples):
        """L_cls and L_box (Eq. 1, Fast R-CNN's multi-task loss) over every sampled RoI."""
        xp = get_array_module(features[0].data)
        box_features = self.box_roi_pool(features, [s["boxes"] for s in samples])
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        labels = xp.concatenate([s["labels"] for s in samples])
        deltas = xp.concatenate([s["regression_targets"] for s in samples])
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, deltas,
                                           beta=self.cfg.box_smooth_l1_beta)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def mask_losses(self, features, samples, targets):
        """L_mask (Sec. 3, "defined only on positive RoIs"): each positive RoI with its matched
        gt mask cropped to the RoI and resized to m x m, against its class's mask."""
        cfg = self.cfg
        xp = get_array_module(features[0].data)
        boxes, labels, mask_targets = [], [], []
        for s, t in zip(samples, targets):
            pos = xp.nonzero(s["labels"] > 0)[0]
            boxes.append(s["boxes"][pos])
            labels.append(s["labels"][pos])
            mask_targets.append(project_masks_on_boxes(t["masks"], s["boxes"][pos], s["matched_idxs"][pos],
                                                       self.mask_resolution, aligned=cfg.aligned,
                                                       binarize=cfg.mask_target_binarize))
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes)))
        return mask_loss(logits, xp.concatenate(mask_targets), xp.concatenate(labels),
                         cfg.mask_loss, cfg.class_agnostic_masks)

    def keypoint_losses(self, features, samples, targets):
        """L_keypoint (Sec. 5): the positive RoIs of the keypoint class ("trained on RoIs of the
        person class only"), each with the keypoints of its matched gt, one-hot on 56x56."""
        cfg = self.cfg
        xp = get_array_module(features[0].data)
        boxes, heatmaps, valid = [], [], []
        for s, t in zip(samples, targets):
            pos = xp.nonzero(s["labels"] == cfg.keypoint_label)[0]
            rois = enlarge_boxes(s["boxes"][pos], cfg.keypoint_box_scale)  # same RoIs as at test
            boxes.append(rois)
            gt = t["keypoints"][s["matched_idxs"][pos]]
            h, v = keypoints_to_heatmap(gt, rois, 4 * cfg.keypoint_pool_size)
            heatmaps.append(h)
            valid.append(v)
        logits = self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes)))
        return keypoint_loss(logits, xp.concatenate(heatmaps), xp.concatenate(valid))

    # ---- inference: one helper per branch --------------------------------------------------------
    def detect_boxes(self, features, proposals, image_sizes):
        """One dict per image with ``boxes``, ``scores``, ``labels``: class probabilities and
        class-specific boxes for every proposal, then score threshold, per-class NMS and the
        top ``box_detections_per_img``."""
        cfg = self.cfg
        xp = get_array_module(features[0].data)
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:
            dtype = features[0].dtype
            nothing = (xp.zeros((0, 4), dtype), xp.zeros((0,), dtype), xp.zeros((0,), xp.int64))
            found = [nothing] * len(proposals)
        else:
            box_features = self.box_head(self.box_roi_pool(features, proposals))
            class_logits, box_regression = self.box_predictor(box_features)
            class_probs = softmax(class_logits, axis=-1).data
            boxes = self.box_coder.decode(box_regression.data, xp.concatenate(proposals))
            found = postprocess_detections(class_probs, boxes, image_sizes, counts, cfg.box_score_thresh,
                                           cfg.box_nms_thresh, cfg.box_detections_per_img)
        return [dict(boxes=b, scores=s, labels=lab) for b, s, lab in found]

    def detect_masks(self, features, results):
        """Adds ``mask_probs`` (D, m, m) to each image's results: the mask branch on the detected
        boxes, each read at its predicted class (mask_head.mask_probabilities)."""
        cfg = self.cfg
        xp = get_array_module(features[0].data)
        m = self.mask_resolution
        labels = xp.concatenate([r["labels"] for r in results])
        if len(labels) == 0:
            probs = xp.zeros((0, m, m), features[0].dtype)
        else:
            boxes = [r["boxes"] for r in results]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes)))
            probs = mask_probabilities(logits.data, labels, cfg.mask_loss, cfg.class_agnostic_masks)
        start = 0
        for r in results:
            r["mask_probs"] = probs[start:start + len(r["boxes"])]
            start += len(r["boxes"])

    def detect_keypoints(self, features, results):
        """Adds ``keypoints`` (D, K, 3) and ``keypoints_scores`` (D, K) to each image's results:
        the head runs on the detections of the keypoint class; other detections get zeros
        (v = 0, "no keypoint")."""
        xp = get_array_module(features[0].data)
        k = self.cfg.num_keypoints
        chosen = [xp.nonzero(r["labels"] == self.cfg.keypoint_label)[0] for r in results]
        for r in results:
            r["keypoints"] = xp.zeros((len(r["boxes"]), k, 3), dtype=xp.float32)
            r["keypoints_scores"] = xp.zeros((len(r["boxes"]), k), dtype=xp.float32)
        if sum(len(c) for c in chosen) == 0:
            return
        # The head reads each detected box enlarged by cfg.keypoint_box_scale (keypoint_head.py's
        # enlarge_boxes: a hand on the box's edge stays inside); the keypoints come back in pixels.
        boxes = [enlarge_boxes(r["boxes"][c], self.cfg.keypoint_box_scale) for r, c in zip(results, chosen)]
        maps = self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes))).data
        start = 0
        for r, c, b in zip(results, chosen, boxes):
            points, scores = heatmaps_to_keypoints(maps[start:start + len(b)], b)
            r["keypoints"][c], r["keypoints_scores"][c] = points, scores
            start += len(b)


__all__ = ["RoIHeads"]
