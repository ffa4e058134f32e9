"""The PyTorch side of ``minimask bench gpu``: torch and torchvision doing the same work.

This is the one place in minimask that builds torchvision's Mask R-CNN, to time it beside
ours and, in the tests, to check that training computes the same losses and gradients
(``build_mirror``: torchvision's model built to any minimask config; ``copy_weights``).  The
torch and torchvision modules are passed in (``load`` imports them) and nothing else in the
package imports this file, so ``import minimask`` never pulls torch in, and a machine without
torch just gets minimask's numbers.  (The model code never uses torch; see DESIGN.md.)

Like with like:
- torchvision's ``maskrcnn_resnet50_fpn`` as it is built with pretrained weights (frozen batch
  norm, the last 3 ResNet stages trainable), which is what the ``r50_fpn`` preset is; built
  here without weights (no download), then its random weights are copied into minimask's model
  (the parameter names are the same), so both run the same network on the same numbers;
- FP32 on both sides: ``torch.backends.cudnn.allow_tf32`` and
  ``torch.backends.cuda.matmul.allow_tf32`` are set False (cuDNN convolutions otherwise use
  TF32 by default), or True on both with ``--tf32`` (CuPy then runs with ``CUPY_TF32=1``).
"""


def load(device, tf32=False):
    """(torch, torchvision, problem): the modules ready for ``device``, or Nones and a reason."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return None, None, f"torch is not importable ({type(e).__name__}: {e})"
    try:
        import torchvision
        import torchvision.ops  # noqa: F401  (fails here when torchvision does not match torch)
    except Exception as e:
        return torch, None, f"torchvision is not importable ({type(e).__name__}: {e})"
    if device == "gpu" and not torch.cuda.is_available():
        return None, None, "torch sees no CUDA device"
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = False  # the same algorithm choice on every call
    return torch, torchvision, None


def torch_device(device):
    return "cuda" if device == "gpu" else "cpu"


def sync(torch, device):
    if device == "gpu":
        torch.cuda.synchronize()


def build_maskrcnn(torch, torchvision, num_classes=91, min_size=800, max_size=1333):
    """torchvision's maskrcnn_resnet50_fpn as built for fine-tuning from ImageNet weights, but
    with random weights: FrozenBatchNorm2d, stem and layer1 frozen (3 trainable stages)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.ops import misc

    try:
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    except ImportError:  # older torchvision
        _resnet_fpn_extractor = None
    body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    if _resnet_fpn_extractor is not None:
        backbone = _resnet_fpn_extractor(body, 3)
    else:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        backbone = resnet_fpn_backbone("resnet50", pretrained=False, norm_layer=misc.FrozenBatchNorm2d,
                                       trainable_layers=3)
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size)


def state_dict_numpy(model):
    """torch state dict -> name: NumPy array (to load into minimask's model)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def images_and_targets(torch, images, targets, device):
    """minimask's inputs (uint8 HWC NumPy, target dicts) as torchvision takes them."""
    dev = torch_device(device)
    timages = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(dev) for im in images]
    ttargets = None
    if targets is not None:
        ttargets = [dict(boxes=torch.from_numpy(t["boxes"]).float().to(dev),
                         labels=torch.from_numpy(t["labels"]).long().to(dev),
                         masks=torch.from_numpy(t["masks"]).to(dev)) for t in targets]
    return timages, ttargets


def train_step(torch, model, optimizer, images, targets):
    losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return total


def peak_memory(torch, device):
    """(allocated, reserved) peak bytes of torch's caching allocator since the last reset."""
    if device != "gpu":
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def reset_memory(torch, device):
    if device == "gpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- torchvision built as a minimask config


def _mirror_refusals(cfg):
    """Settings of ``cfg`` that torchvision's MaskRCNN has no counterpart for."""
    wrong = []
    if cfg.pooler_type != "roialign":
        wrong.append(f"pooler_type={cfg.pooler_type!r}")
    if cfg.mask_loss != "sigmoid" or cfg.class_agnostic_masks or cfg.mask_head_type != "fcn":
        wrong.append("mask ablations (mask_loss, class_agnostic_masks, mask_head_type)")
    if not cfg.mask_on or cfg.keypoint_on:
        wrong.append("mask_on=False or keypoint_on=True (a Mask R-CNN without keypoints only)")
    if len(set(map(len, cfg.anchor_sizes))) != 1:
        wrong.append("anchor_sizes with different counts per level")
    for name in ("rpn_smooth_l1_beta", "box_smooth_l1_beta"):  # torchvision's rpn.py, roi_heads.py
        if getattr(cfg, name) != 1.0 / 9:
            wrong.append(f"{name}={getattr(cfg, name)!r} (torchvision's is fixed at 1/9)")
    return wrong


def _mirror_body(torch, torchvision, cfg):
    """torchvision's ResNet of ``cfg.depth`` at base width ``cfg.width`` (torchvision's own
    constructor is fixed at 64), norms and frozen stages as minimask's ``models/resnet.py``: a
    frozen stage always has FrozenBatchNorm2d, the others ``cfg.norm``'s class; its convs start
    as ``cfg.backbone_init`` says (torchvision's own He-normal fan_out, or nn.Conv2d's default)."""
    import functools

    from torchvision.models import resnet
    from torchvision.ops import misc

    frozen_norm = functools.partial(misc.FrozenBatchNorm2d, eps=cfg.frozen_bn_eps)
    trained_norm = frozen_norm if cfg.norm == "frozen_bn" else torch.nn.BatchNorm2d

    def norm_of(stage):  # stage 1 is the stem, 2..5 are layer1..layer4
        return frozen_norm if stage <= cfg.freeze_at else trained_norm

    blocks = {18: (resnet.BasicBlock, [2, 2, 2, 2]), 34: (resnet.BasicBlock, [3, 4, 6, 3]),
              50: (resnet.Bottleneck, [3, 4, 6, 3]), 101: (resnet.Bottleneck, [3, 4, 23, 3])}
    block, layers = blocks[cfg.depth]
    w = cfg.width
    body = resnet.ResNet(block, layers, norm_layer=norm_of(1))
    # Rebuilt at width w with ResNet's own _make_layer (it reads inplanes and _norm_layer).
    body.conv1 = torch.nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
    body.bn1 = norm_of(1)(w)
    body.inplanes = w
    for i, n in enumerate(layers):
        body._norm_layer = norm_of(i + 2)
        setattr(body, f"layer{i + 1}", body._make_layer(block, w * 2 ** i, n, stride=1 if i == 0 else 2))
    if cfg.backbone_init == "kaiming_fan_out":
        # The layers rebuilt above start as nn.Conv2d does; torchvision's ResNet.__init__ then
        # re-draws every conv He-normal (fan_out), as done here (its norms start at 1 and 0,
        # which the rebuilt ones already do).
        for m in body.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    frozen = [] if cfg.freeze_at == 0 else ["conv1", "bn1"] + [f"layer{s}" for s in range(1, cfg.freeze_at)]
    for name, p in body.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
    return body, [w * 2 ** i * block.expansion for i in range(4)]


def _aligned_pooler(torch, torchvision, output_size, sampling_ratio, **canonical):
    """MultiScaleRoIAlign with ``aligned=True`` (Detectron2's ROIAlignV2): torchvision's pooler
    always calls roi_align with aligned=False; this one is the same code with the flag set."""
    from torchvision.ops import MultiScaleRoIAlign, poolers, roi_align

    class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
        def forward(self, x, boxes, image_shapes):
            feats = poolers._filter_input(x, self.featmap_names)
            if self.scales is None or self.map_levels is None:
                self.scales, self.map_levels = poolers._setup_scales(
                    feats, image_shapes, self.canonical_scale, self.canonical_level)
            rois = poolers._convert_to_roi_format(boxes)
            levels = self.map_levels(boxes)
            out = feats[0].new_zeros((len(rois), feats[0].shape[1]) + self.output_size)
            for level, (f, scale) in enumerate(zip(feats, self.scales)):
                idx = torch.where(levels == level)[0]
                out[idx] = roi_align(f, rois[idx], self.output_size, scale, self.sampling_ratio,
                                     aligned=True).to(out.dtype)
            return out

    return AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio, **canonical)


def _mirror_roi_heads(torch, roi_heads, aligned, binarize):
    """Give torchvision's RoIHeads minimask's mask targets when they differ from its own.

    torchvision hard-codes them in ``roi_heads.project_masks_on_boxes``: RoIAlign of the gt mask
    with aligned=False, soft values.  minimask's follow ``cfg.aligned`` and, with
    ``cfg.mask_target_binarize``, are thresholded at 0.5 (Detectron2).  The module function is
    swapped for the duration of this heads' forward only, so other models are untouched."""
    import functools

    from torchvision.models.detection import roi_heads as module
    from torchvision.ops import roi_align

    if not aligned and not binarize:
        return roi_heads  # torchvision's own targets

    def project(gt_masks, boxes, matched_idxs, M):
        rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
        crops = roi_align(gt_masks[:, None].to(rois), rois, (M, M), 1.0, aligned=aligned)[:, 0]
        return (crops >= 0.5).to(crops.dtype) if binarize else crops

    class MirrorRoIHeads(type(roi_heads)):
        def forward(self, *args, **kwargs):
            original = module.project_masks_on_boxes
            module.project_masks_on_boxes = project
            try:
                return super().forward(*args, **kwargs)
            finally:
                module.project_masks_on_boxes = original

    functools.update_wrapper(MirrorRoIHeads.forward, type(roi_heads).forward, updated=())
    roi_heads.__class__ = MirrorRoIHeads
    return roi_heads


def build_mirror(torch, torchvision, cfg):
    """torchvision's ``MaskRCNN`` built to minimask's config ``cfg``, layer for layer.

    Same ResNet depth and width (any width, not only torchvision's 64), norms (BatchNorm2d or
    FrozenBatchNorm2d with ``cfg.frozen_bn_eps``, frozen stages as ``cfg.freeze_at``), FPN
    width, anchors, every RPN and RoI-head number, heads' widths, RoIAlign's sampling ratio and
    ``aligned`` (a pooler subclass where torchvision has no switch), and minimask's mask targets
    (``cfg.aligned``, ``cfg.mask_target_binarize``).  Its state dict maps onto minimask's by
    ``interop.minimask_name``; ``copy_weights`` gives it a minimask model's weights.  Random
    weights (no download).  Settings torchvision lacks (RoIPool/RoIWarp, the mask ablations,
    keypoints) raise ValueError.  Not mirrored, as they do not touch training on images that
    need no resizing: ``resize_rounding`` (torchvision floors), ``paste_mode``, the detections'
    ``labels_are_coco_ids``.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    wrong = _mirror_refusals(cfg)
    if wrong:
        raise ValueError("build_mirror: torchvision's MaskRCNN has no counterpart for " + "; ".join(wrong))
    body, in_channels = _mirror_body(torch, torchvision, cfg)
    out = cfg.fpn_out_channels
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, in_channels, out,
                               extra_blocks=LastLevelMaxPool())

    canonical = dict(canonical_scale=cfg.canonical_box_size, canonical_level=cfg.canonical_level)  # FPN Eq. 1

    def pooler(size):
        if cfg.aligned:
            return _aligned_pooler(torch, torchvision, size, cfg.sampling_ratio, **canonical)
        return MultiScaleRoIAlign(["0", "1", "2", "3"], size, cfg.sampling_ratio, **canonical)

    anchors = AnchorGenerator(tuple(tuple(s) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * 5)
    num_anchors = len(cfg.aspect_ratios) * len(cfg.anchor_sizes[0])
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=tuple(cfg.min_size), max_size=cfg.max_size, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std), size_divisible=cfg.size_divisible,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(out, num_anchors),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test, rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh, rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        rpn_score_thresh=cfg.rpn_score_thresh,
        box_roi_pool=pooler(cfg.box_pool_size),
        box_head=TwoMLPHead(out * cfg.box_pool_size ** 2, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes),
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img, box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh, box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction, bbox_reg_weights=tuple(cfg.bbox_reg_weights),
        mask_roi_pool=pooler(cfg.mask_pool_size),
        mask_head=MaskRCNNHeads(out, (cfg.mask_head_dim,) * cfg.mask_head_convs, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_dim, cfg.mask_head_dim, cfg.num_classes),
    )
    # The RPN drops proposals smaller than this (torchvision's RegionProposalNetwork.min_size).
    model.rpn.min_size = cfg.rpn_min_size
    _mirror_roi_heads(torch, model.roi_heads, cfg.aligned, cfg.mask_target_binarize)
    return model


def copy_weights(minimask_model, tv_model):
    """Copy every parameter and buffer of ``minimask_model`` into ``tv_model`` (in its dtype),
    after checking that the two have the same tensors (names by ``interop.minimask_name``, same
    shapes) and the same trainable parameters; returns ``{torchvision name: minimask name}``.
    Raises ValueError naming every tensor that has no counterpart."""
    import torch

    from ..interop import minimask_name

    ours = minimask_model.state_dict()
    trainable = {n for n, p in minimask_model.named_parameters() if p.requires_grad}
    theirs = {k: v for k, v in tv_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    names = {k: minimask_name(k) for k in theirs}
    problems = [f"torchvision {k} (as {n}) not in minimask" for k, n in names.items() if n not in ours]
    problems += [f"minimask {n} not in torchvision" for n in sorted(set(ours) - set(names.values()))
                 if not n.endswith("num_batches_tracked")]
    problems += [f"{k}: torchvision {tuple(v.shape)}, minimask {ours[names[k]].shape}"
                 for k, v in theirs.items() if names[k] in ours and tuple(v.shape) != ours[names[k]].shape]
    tv_trainable = {minimask_name(k) for k, p in tv_model.named_parameters() if p.requires_grad}
    problems += [f"{n} trained by one model only" for n in sorted(trainable ^ tv_trainable)]
    if problems:
        raise ValueError("copy_weights: the models differ:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in theirs.items():
            v.copy_(torch.from_numpy(ours[names[k]]).to(v.dtype))
    return names
