"""Mask R-CNN: the whole network, from images to losses or to detections (paper Sec. 3).

Sec. 3: "Mask R-CNN adopts the same two-stage procedure [as Faster R-CNN], with an identical
first stage (which is RPN).  In the second stage, in parallel to predicting the class and box
offset, Mask R-CNN also outputs a binary mask for each RoI."  Here the stages are four parts:

    transform   uint8 images -> normalized, resized, zero-padded float batch (Sec. 3.1)
                                                                  (``transform.RCNNTransform``)
    backbone    ResNet + FPN -> feature pyramid P2..P6          (``fpn.BackboneWithFPN``)
    rpn         first stage: proposals (and its losses)           (``rpn.RegionProposalNetwork``)
    roi_heads   second stage: class, box, mask (and keypoints) per RoI (``roi_heads.RoIHeads``)

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
from ..tensor import Tensor, no_grad
from .fpn import BackboneWithFPN
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .transform import RCNNTransform

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")
KEYPOINT_LOSS = "loss_keypoint"  # Sec. 5, with cfg.keypoint_on (loss_mask only with cfg.mask_on)


class MaskRCNN(nn.Module):
    """The model of ``cfg`` (a ``MaskRCNNConfig``).

    Training mode: ``model(images, targets)`` -> dict of the five losses (Tensors).
    ``model.predict(images)`` -> one dict per image: ``boxes`` (N, 4) xyxy in the image's own
    pixels, ``scores`` (N,), ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W) bool.
    ``model.reseed(seed, iteration)`` makes the next forward's random draws depend on nothing
    but its arguments (the trainer calls it before every iteration).

    ``images``: a list of RGB uint8 arrays (H, W, 3), sizes may differ.  ``targets``: one dict
    per image with ``boxes`` (G, 4) xyxy and ``masks`` (G, H, W) in that image's pixels,
    ``labels`` (G,) in 1..K, optionally ``crowd_boxes`` (M, 4); on either device (they are
    checked and moved once, by ``transform.prepare_targets``).  Results stay on the model's
    device (NumPy on the CPU, CuPy after ``model.to("gpu")``).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # Same config, same initial weights: the initialisers draw from a generator seeded here.
        nn.init.manual_seed(cfg.seed)
        self.transform = RCNNTransform(cfg)
        self.backbone = BackboneWithFPN(cfg)
        self.rpn = RegionProposalNetwork(cfg)
        self.roi_heads = RoIHeads(cfg, in_channels=self.backbone.out_channels,
                                  strides=self.backbone.strides[:4])  # P2..P5: the heads pool from these

    # ---- where the weights live, and the random draws ------------------------------------
    def to(self, device):
        """Weights to ``"cpu"`` or ``"gpu"``; images and targets will follow them there."""
        super().to(device)
        self.transform.device = device
        return self

    def reseed(self, seed, iteration):
        """New generators for every random draw of a training forward, each seeded by
        (seed, iteration, k): the training scale (k = 0), the RPN's anchor sampler (1) and the
        RoI heads' sampler (2).  An iteration's draws then depend on nothing but its number,
        so a resumed run need not save the generators' running state."""
        def fresh(k):
            return np.random.default_rng([seed, 2, iteration, k])

        self.transform.scale_rng = fresh(0)
        self.rpn.sampler.rng = fresh(1)
        self.roi_heads.sampler.rng = fresh(2)

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
                return self.transform.postprocess(detections, sizes, [tuple(im.shape[:2]) for im in images])
        finally:
            self.train(was_training)


def build_model(cfg):
    """The model a config describes (the trainer, predictor, converter and lessons build it here)."""
    return MaskRCNN(cfg)


__all__ = ["MaskRCNN", "build_model", "LOSS_NAMES", "KEYPOINT_LOSS"]
