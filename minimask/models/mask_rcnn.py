"""Mask R-CNN: the whole network, from images to losses or to detections (paper Sec. 3).

Sec. 3: "Mask R-CNN adopts the same two-stage procedure [as Faster R-CNN], with an identical
first stage (which is RPN).  In the second stage, in parallel to predicting the class and box
offset, Mask R-CNN also outputs a binary mask for each RoI."  Here the stages are four parts:

    transform   uint8 images -> normalized, resized, zero-padded float batch (Sec. 3.1)
    backbone    ResNet + FPN -> feature pyramid P2..P6          (``fpn.BackboneWithFPN``)
    rpn         first stage: proposals (and its losses)           (``rpn.RegionProposalNetwork``)
    roi_heads   second stage: class, box and mask per RoI         (``roi_heads.RoIHeads``)

Training minimises, on each sampled RoI, the multi-task loss of Eq. 1

    L = L_cls + L_box + L_mask

plus the RPN's own two losses (objectness and anchor-box regression), all with weight 1 as in
the paper's code; ``model(images, targets)`` returns the five terms by name and the caller sums
them.  At test time ``model.predict(images)`` runs the box branch on the proposals, keeps the
top detections after NMS, runs the mask branch on *those* boxes (Sec. 3.1, "Inference") and
pastes each 28x28 mask, binarized at 0.5, into the caller's image.

The names of the parts (``backbone.body``, ``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``
...) are torchvision's ``maskrcnn_resnet50_fpn``, so its state dict maps onto ours key by key.
"""

import numpy as np

from .. import nn
from ..backend import device_of, get_array_module, to_device
from ..data.transforms import batch_images, normalize, resize, resize_boxes
from ..ops.masks import paste_masks_in_image
from ..tensor import Tensor, no_grad
from .fpn import BackboneWithFPN
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")
KEYPOINT_LOSS = "loss_keypoint"  # Sec. 5, with cfg.keypoint_on (loss_mask only with cfg.mask_on)


class MaskRCNN(nn.Module):
    """The model of ``cfg`` (a ``MaskRCNNConfig``).

    Training mode: ``model(images, targets)`` -> dict of the five losses (Tensors).
    ``model.predict(images)`` -> one dict per image: ``boxes`` (N, 4) xyxy in the image's own
    pixels, ``scores`` (N,), ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W) bool.

    ``images``: a list of RGB uint8 arrays (H, W, 3), sizes may differ.  ``targets``: one dict
    per image with ``boxes`` (G, 4) xyxy and ``masks`` (G, H, W) in that image's pixels,
    ``labels`` (G,) in 1..K, optionally ``crowd_boxes`` (M, 4).  Results stay on the model's
    device (NumPy on the CPU, CuPy after ``model.to("gpu")``).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # Same config, same initial weights: the initialisers draw from a generator seeded here.
        nn.init.manual_seed(cfg.seed)
        self.backbone = BackboneWithFPN(cfg)
        self.rpn = RegionProposalNetwork(cfg)
        self.roi_heads = RoIHeads(cfg, in_channels=self.backbone.out_channels)
        # Multi-scale training draws the shorter side per batch; a generator of our own (not
        # NumPy's global one) makes a run reproducible from cfg.seed.
        self.scale_rng = np.random.default_rng(cfg.seed)

    # ---- where the weights live ------------------------------------------------------
    def device(self):
        """"cpu" or "gpu": where the parameters are (and so where images are sent)."""
        return device_of(next(iter(self.parameters())).data)

    # ---- input transform (torchvision's GeneralizedRCNNTransform) ---------------------
    def transform(self, images, targets=None):
        """Images (and targets) -> (batch (N, 3, Hp, Wp) float32, sizes [(h, w)], targets).

        Each image goes to [0, 1], is resized so its shorter side is the chosen min_size (the
        longer one capped at max_size, aspect kept; bilinear), normalized with image_mean/std,
        and zero-padded at the bottom and right to a multiple of ``size_divisible``.  Its
        target's boxes are scaled by the same ratios and its masks resized by nearest
        neighbour, so they stay 0/1 and line up with the resized image.  ``sizes`` are the
        resized sizes before padding: proposals and detections are clipped to them.
        """
        cfg = self.cfg
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError("model: pass a list of images, not one (H, W, 3) array")
        images = list(images)
        if not images:
            raise ValueError("model: no images given")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"model: {len(images)} images but {len(targets)} targets (one each)")
        if self.training:
            min_size = int(cfg.min_size[int(self.scale_rng.integers(len(cfg.min_size)))])
        else:
            min_size = int(cfg.min_size[-1])  # as torchvision: the last scale at test time

        device = self.device()
        out_images, out_targets = [], []
        for i, image in enumerate(images):
            image = getattr(image, "data", image)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"model: image {i} should be (H, W, 3) RGB, got shape {tuple(image.shape)}")
            # Move the uint8 pixels (4x smaller than float) before anything else.
            image = to_device(image, device)
            xp = get_array_module(image)
            if image.dtype == xp.uint8:
                image = image.astype(xp.float32) / 255.0
            else:
                image = image.astype(xp.float32)  # floats are taken to be in [0, 1] already
            target = (None if targets is None
                      else self._target_on_device(targets[i], image.shape[:2], i, device))
            # Bilinear resizing is linear with weights summing to one, so it commutes with the
            # per-channel affine normalization: resize first, then normalize into CHW.
            image, target = resize(image, target, min_size, cfg.max_size, cfg.resize_rounding)
            out_images.append(normalize(image, cfg.image_mean, cfg.image_std))
            out_targets.append(target)
        batch, sizes = batch_images(out_images, cfg.size_divisible)
        return batch, sizes, (None if targets is None else out_targets)

    def _target_on_device(self, target, image_size, i, device):
        """Check one target against its image and move its arrays to ``device``."""
        cfg = self.cfg
        needed = ("boxes", "labels") + ("masks",) * cfg.mask_on + ("keypoints",) * cfg.keypoint_on
        for key in needed:
            if key not in target:
                raise ValueError(f"model: target {i} needs {key!r}, got keys {sorted(target)}")
        t = {k: to_device(getattr(v, "data", v), device) for k, v in target.items()
             if k in needed + ("crowd_boxes",) and v is not None}
        xp = get_array_module(t["boxes"])
        t["boxes"] = t["boxes"].astype(xp.float32).reshape(-1, 4)
        t["labels"] = t["labels"].astype(xp.int64).reshape(-1)
        if "crowd_boxes" in t:
            t["crowd_boxes"] = t["crowd_boxes"].astype(xp.float32).reshape(-1, 4)
        g = t["boxes"].shape[0]
        if cfg.keypoint_on:
            t["keypoints"] = t["keypoints"].astype(xp.float32)
            if t["keypoints"].shape != (g, cfg.num_keypoints, 3):
                raise ValueError(f"model: target {i} keypoints should be ({g}, {cfg.num_keypoints}, 3) "
                                 f"(x, y, visibility per keypoint), got {tuple(t['keypoints'].shape)}")
        if not cfg.mask_on:
            if t["labels"].shape[0] != g:
                raise ValueError(f"model: target {i} has {g} boxes and {t['labels'].shape[0]} labels")
        elif t["labels"].shape[0] != g or t["masks"].shape[0] != g:
            raise ValueError(f"model: target {i} has {g} boxes, {t['labels'].shape[0]} labels and "
                             f"{t['masks'].shape[0]} masks (one each)")
        elif t["masks"].ndim != 3 or tuple(t["masks"].shape[1:]) != tuple(image_size):
            raise ValueError(f"model: target {i} masks should be (G, {image_size[0]}, {image_size[1]}) "
                             f"like its image, got {tuple(t['masks'].shape)}")
        if g and (int(t["labels"].min()) < 1 or int(t["labels"].max()) >= self.cfg.num_classes):
            raise ValueError(f"model: target {i} labels must be in 1..{self.cfg.num_classes - 1} "
                             f"(0 is background), got {t['labels'].min()}..{t['labels'].max()}")
        return t

    # ---- training ------------------------------------------------------------------------
    def forward(self, images, targets=None):
        """Training mode: the loss dict of Eq. 1 (plus the RPN's).  Eval mode: ``predict``."""
        if not self.training:
            return self.predict(images)
        if targets is None:
            raise ValueError("model: training mode needs targets (call .eval() or use predict())")
        batch, sizes, targets = self.transform(images, targets)
        features = self.backbone(Tensor(batch))
        proposals, rpn_losses = self.rpn(features, sizes, batch.shape[-2:], targets)
        _, head_losses = self.roi_heads(features, proposals, sizes, targets)
        losses = {**rpn_losses, **head_losses}
        return {name: losses[name] for name in LOSS_NAMES + (KEYPOINT_LOSS,) if name in losses}

    # ---- inference ----------------------------------------------------------------------
    def predict(self, images):
        """Detections per image, in the image's own pixels (see the class docstring).

        Runs in eval mode (batch norm on its running statistics, the test-time RPN settings)
        and records no graph; a model in training mode is put back in it afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                images = list(images)
                batch, sizes, _ = self.transform(images)
                features = self.backbone(Tensor(batch))
                proposals, _ = self.rpn(features, sizes, batch.shape[-2:])
                detections, _ = self.roi_heads(features, proposals, sizes)
                return [self.postprocess(d, size, tuple(im.shape[:2]))
                        for d, size, im in zip(detections, sizes, images)]
        finally:
            self.train(was_training)

    def postprocess(self, detection, resized_size, original_size):
        """Boxes back to the caller's pixels; 28x28 mask probabilities pasted into its image
        and binarized at ``cfg.mask_threshold`` (Sec. 3.1: 0.5)."""
        boxes = resize_boxes(detection["boxes"], resized_size, original_size)
        out = dict(boxes=boxes, scores=detection["scores"], labels=detection["labels"])
        if self.cfg.mask_on:
            out["masks"] = paste_masks_in_image(detection["mask_probs"], boxes, original_size,
                                                threshold=self.cfg.mask_threshold, mode=self.cfg.paste_mode)
        if self.cfg.keypoint_on:  # x, y scaled back like the boxes; the visibility column kept
            keypoints = detection["keypoints"].copy()
            keypoints[..., 0] *= original_size[1] / resized_size[1]
            keypoints[..., 1] *= original_size[0] / resized_size[0]
            out["keypoints"], out["keypoints_scores"] = keypoints, detection["keypoints_scores"]
        return out


__all__ = ["MaskRCNN", "LOSS_NAMES", "KEYPOINT_LOSS"]
