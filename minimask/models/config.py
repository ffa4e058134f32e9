"""Configuration: one flat dataclass, named presets, and ``key=value`` overrides.

Every number of the paper's Sec. 3.1 ("Implementation Details") lives here, under the names
torchvision's ``MaskRCNN`` arguments use where one exists, so a reader can look each up there.
Where torchvision and Detectron2 differ the default is torchvision's (so its weights can be
imported) and the comment names Detectron2's value.

    cfg = preset("shapes")
    cfg = dataclasses.replace(cfg, lr=0.01)        # in code
    cfg = override(cfg, ["lr=0.01", "iters=500"])  # from the command line (--set key=value)
"""

import ast
import dataclasses
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class MaskRCNNConfig:
    # ---- classes and input transform (torchvision's GeneralizedRCNNTransform) -----------
    num_classes: int = 91                # including background (class 0), as torchvision
    class_names: tuple = ()              # names of classes 1..K, for drawings
    min_size: tuple = (800,)             # shorter side; several values = multi-scale training
    max_size: int = 1333                 # cap on the longer side
    image_mean: tuple = (0.485, 0.456, 0.406)  # on RGB in [0, 1] (Detectron2: BGR pixel means)
    image_std: tuple = (0.229, 0.224, 0.225)
    size_divisible: int = 32             # pad the batch so every FPN level divides evenly

    # ---- backbone: ResNet (Sec. 3, "Network Architecture") + FPN ------------------------
    depth: int = 50                      # 18, 34, 50, 101
    width: int = 64                      # channels of the stem; stages have width*(1,2,4,8)*expansion
    norm: str = "frozen_bn"              # "frozen_bn" (pretrained backbone) or "bn" (from scratch)
    freeze_at: int = 2                   # 0: train all; 1: freeze stem; 2: stem + res2 (as the paper)
    fpn_out_channels: int = 256

    # ---- anchors and RPN (Faster R-CNN Sec. 3.1; FPN Sec. 4.1) --------------------------
    anchor_sizes: tuple = ((32,), (64,), (128,), (256,), (512,))  # one size per level P2..P6
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000  # per level, before NMS
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # per image, after NMS
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_min_size: float = 1e-3           # proposals narrower than this are dropped
    rpn_score_thresh: float = 0.0
    rpn_smooth_l1_beta: float = 1.0 / 9  # the anchor-box loss's beta: torchvision's 1/9; Detectron2's
    #                                      MODEL.RPN.SMOOTH_L1_BETA is 0 (plain L1); Fast R-CNN's Eq. 3 has 1

    # ---- RoI heads (Sec. 3.1: 512 RoIs per image, 1:3 positive to negative) ------------
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_smooth_l1_beta: float = 1.0 / 9  # L_box's beta: torchvision's 1/9; Detectron2's
    #                                      MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA is 0
    box_pool_size: int = 7
    box_head_dim: int = 1024             # the two fc layers of the box head
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    mask_pool_size: int = 14
    mask_head_dim: int = 256
    mask_head_convs: int = 4             # four 3x3 convs (Fig. 4, right)
    mask_threshold: float = 0.5          # Sec. 3.1: "binarized at a threshold of 0.5"
    mask_target_binarize: bool = True    # mask targets >= 0.5 (Detectron2); False: soft (torchvision)
    sampling_ratio: int = 2              # RoIAlign samples per bin side (Detectron2: 0 = adaptive)
    aligned: bool = False                # torchvision: False; Detectron2 ROIAlignV2: True
    canonical_box_size: int = 224        # FPN Eq. 1: a box of this side sqrt(w h) is pooled from
    canonical_level: int = 4             # this level (P4); half as wide one level finer (poolers.py)
    mask_predictor_init: str = "kaiming"  # mask logits: "kaiming" (torchvision), "normal_0.001" (Detectron2)
    backbone_init: str = "kaiming_fan_out"  # ResNet convs from scratch: torchvision's and Detectron2's
                                            # He normal (fan_out), or "pytorch_default" (nn.Conv2d's own)
    # Three more places where torchvision's released model and Detectron2 differ (interop.py):
    frozen_bn_eps: float = 1e-5          # FrozenBatchNorm2d eps (both 1e-5; torchvision <= 0.5: 0)
    resize_rounding: str = "round"       # resized side: "round" (Detectron2) or "floor" (torchvision)
    paste_mode: str = "detectron2"       # mask pasting, ops/masks.py: "detectron2" | "torchvision"
    labels_are_coco_ids: bool = False    # torchvision's COCO models: label = COCO category id (eval)

    # ---- the paper's ablations (Table 2) as switches -----------------------------------
    pooler_type: str = "roialign"        # "roialign" | "roipool" | "roiwarp"   (Table 2c)
    mask_loss: str = "sigmoid"           # "sigmoid" | "softmax"                 (Table 2b)
    class_agnostic_masks: bool = False   # Table 2b/Sec. 4.2: class-specific vs agnostic
    mask_head_type: str = "fcn"          # "fcn" | "mlp"                         (Table 2e)

    # ---- which heads, and the keypoint head of Sec. 5 ("Human Pose Estimation") -----------
    # torchvision's keypointrcnn_resnet50_fpn is box + keypoints (mask_on=False).
    mask_on: bool = True
    keypoint_on: bool = False
    num_keypoints: int = 17              # K one-hot masks per RoI, one per keypoint
    keypoint_pool_size: int = 14         # RoIAlign 14x14 -> ... -> 56x56 heatmaps (m = 56)
    keypoint_head_dim: int = 512         # eight 3x3 convs of 512 (Sec. 5)
    keypoint_head_convs: int = 8
    keypoint_label: int = 1              # the class whose RoIs learn keypoints (the person)
    keypoint_names: tuple = ()           # names of the keypoints, for drawings and checks
    keypoint_skeleton: tuple = ()        # pairs of 1-based keypoint indices, as COCO's "skeleton"
    keypoint_box_scale: float = 1.0      # the keypoint head reads boxes enlarged this much (1: paper)

    # ---- training (Sec. 3.1: SGD, momentum 0.9, weight decay 1e-4) ---------------------
    batch_size: int = 2
    iters: int = 90000
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple = (60000, 80000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    hflip_prob: float = 0.5
    seed: int = 0
    checkpoint_period: int = 5000
    eval_period: int = 0                 # 0: only at the end
    keep_checkpoints: int = 3
    data_parallel: int = 1               # CPU processes sharing each batch (engine/parallel.py, as DDP)
    skip_bad_images: bool = False        # leave out unreadable image files (counted) instead of stopping
    backbone_weights: str = ""           # ImageNet ResNet .npz (convert-weights --backbone), fresh runs

    def __post_init__(self):
        check(self)


CHOICES = {
    "depth": (18, 34, 50, 101),
    "norm": ("frozen_bn", "bn"),
    "pooler_type": ("roialign", "roipool", "roiwarp"),
    "mask_predictor_init": ("kaiming", "normal_0.001"),  # mask_head.MaskPredictor cites both
    "backbone_init": ("kaiming_fan_out", "pytorch_default"),  # resnet.ResNet._init_weights
    "mask_loss": ("sigmoid", "softmax"),
    "mask_head_type": ("fcn", "mlp"),
    "resize_rounding": ("round", "floor"),
    "paste_mode": ("detectron2", "torchvision"),
}


# Valid ranges, checked by ``check``: (lowest, highest, lowest included, highest included).
_INF = float("inf")
AT_LEAST_1 = (1, _INF, True, False)
AT_LEAST_0 = (0, _INF, True, False)
POSITIVE = (0, _INF, False, False)
UNIT = (0.0, 1.0, True, True)             # IoU and score thresholds, probabilities
FRACTION = (0.0, 1.0, False, True)        # a share of something: (0, 1]
_COUNTS = ("max_size", "size_divisible", "width", "fpn_out_channels", "rpn_pre_nms_top_n_train",
           "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
           "rpn_batch_size_per_image", "box_batch_size_per_image", "box_pool_size", "box_head_dim",
           "box_detections_per_img", "mask_pool_size", "mask_head_dim", "mask_head_convs",
           "keypoint_pool_size", "keypoint_head_dim", "keypoint_head_convs", "batch_size", "iters",
           "data_parallel")  # >= 1
_PERIODS = ("sampling_ratio", "warmup_iters", "seed", "checkpoint_period", "eval_period",
            "keep_checkpoints")                                                        # whole, >= 0 (0: off)
RANGES = {
    **{name: AT_LEAST_1 for name in _COUNTS},
    **{name: AT_LEAST_0 for name in _PERIODS + ("weight_decay", "rpn_min_size", "frozen_bn_eps",
                                               "rpn_smooth_l1_beta", "box_smooth_l1_beta")},
    **{name: UNIT for name in (
        "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_score_thresh", "box_fg_iou_thresh",
        "box_bg_iou_thresh", "box_score_thresh", "box_nms_thresh", "mask_threshold", "hflip_prob")},
    **{name: FRACTION for name in ("rpn_positive_fraction", "box_positive_fraction", "warmup_factor",
                                   "gamma")},
    "lr": POSITIVE,
    "momentum": (0.0, 1.0, True, False),
}
INTEGERS = set(_COUNTS + _PERIODS) | {"num_classes", "depth", "freeze_at", "num_keypoints", "keypoint_label"}
BOOLEANS = {"aligned", "labels_are_coco_ids", "class_agnostic_masks", "mask_on", "keypoint_on",
            "skip_bad_images"}


def _range_text(lo, hi, lo_in, hi_in):
    if hi == _INF:
        return f">= {lo}" if lo_in else f"> {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(cfg, name, count=None, positive=False, integer=False):
    """Check the tuple field ``name``: ``count`` entries (any if None, but at least one), each a
    finite number (positive, whole, as asked)."""
    value = getattr(cfg, name)
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and (count is None or len(value) == count) and \
        all((_is_int(v) if integer else _is_real(v)) and (v > 0 or not positive) for v in value)
    if not ok:
        what = (f"{count} " if count else "one or more ") + ("positive " if positive else "") + \
            ("whole numbers" if integer else "finite numbers")
        raise ValueError(f"config: {name}={value!r} must be {what}")


def check(cfg):
    """Raise ValueError naming the field, its value and the valid range for a bad setting.

    Runs when a config is made (``__post_init__``), so a bad ``--set`` is refused when the
    command line is parsed, before any data is read."""
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"config: {name}={getattr(cfg, name)!r} is not one of {list(valid)}")
    for name in BOOLEANS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"config: {name}={getattr(cfg, name)!r} must be True or False")
    for name in INTEGERS:
        if not _is_int(getattr(cfg, name)):
            raise ValueError(f"config: {name}={getattr(cfg, name)!r} must be a whole number")
    for name, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = getattr(cfg, name)
        inside = _is_real(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not inside:
            raise ValueError(f"config: {name}={v!r} must be {_range_text(lo, hi, lo_in, hi_in)}")
    if cfg.num_classes < 2:
        raise ValueError(f"config: num_classes={cfg.num_classes} must count background and at least "
                         f"one class (>= 2)")
    if not 0 <= cfg.freeze_at <= 5:
        raise ValueError(f"config: freeze_at={cfg.freeze_at} must be in 0..5")
    if not cfg.canonical_box_size > 0:
        raise ValueError(f"config: canonical_box_size={cfg.canonical_box_size!r} must be positive (pixels)")
    if not isinstance(cfg.anchor_sizes, (tuple, list)) or len(cfg.anchor_sizes) != 5:
        raise ValueError(f"config: anchor_sizes needs one entry per level P2..P6, "
                         f"got {len(cfg.anchor_sizes)}")
    for level, sizes in enumerate(cfg.anchor_sizes):
        if not isinstance(sizes, (tuple, list)) or not sizes or not all(_is_real(v) and v > 0 for v in sizes):
            raise ValueError(f"config: anchor_sizes={cfg.anchor_sizes!r}: level P{level + 2} must be a tuple "
                             f"of positive sizes, got {sizes!r}")
    _numbers(cfg, "min_size", positive=True, integer=True)
    _numbers(cfg, "aspect_ratios", positive=True)
    _numbers(cfg, "image_mean", count=3)
    _numbers(cfg, "image_std", count=3, positive=True)
    _numbers(cfg, "bbox_reg_weights", count=4, positive=True)
    for kind in ("rpn", "box"):
        fg, bg = getattr(cfg, f"{kind}_fg_iou_thresh"), getattr(cfg, f"{kind}_bg_iou_thresh")
        if bg > fg:
            raise ValueError(f"config: {kind}_bg_iou_thresh={bg} must not exceed {kind}_fg_iou_thresh={fg}")
    if cfg.batch_size % cfg.data_parallel:
        raise ValueError(f"config: batch_size={cfg.batch_size} must be a multiple of data_parallel="
                         f"{cfg.data_parallel} (each process takes an equal share of the batch; "
                         f"data_parallel=1 trains in one process)")
    m = cfg.milestones
    if not isinstance(m, (tuple, list)) or not all(_is_int(v) and v > 0 for v in m) or \
            any(b <= a for a, b in zip(m, m[1:])):
        raise ValueError(f"config: milestones={m!r} must be whole numbers > 0, each larger than the one "
                         f"before (the iterations where the lr drops by gamma)")
    if cfg.keypoint_on:
        if cfg.num_keypoints < 1:
            raise ValueError(f"config: num_keypoints={cfg.num_keypoints} must be at least 1")
        if not 1 <= cfg.keypoint_label < cfg.num_classes:
            raise ValueError(f"config: keypoint_label={cfg.keypoint_label} must be a class in "
                             f"1..{cfg.num_classes - 1}")
        if not 1.0 <= cfg.keypoint_box_scale <= 2.0:
            raise ValueError(f"config: keypoint_box_scale={cfg.keypoint_box_scale} must be in 1..2 "
                             f"(1: the boxes as detected)")
        if cfg.keypoint_names and len(cfg.keypoint_names) != cfg.num_keypoints:
            raise ValueError(f"config: {len(cfg.keypoint_names)} keypoint_names for "
                             f"num_keypoints={cfg.num_keypoints}")


def _shapes():
    """Small and CPU-friendly: 128 px synthetic shapes, a narrow ResNet-18-FPN from scratch.

    Tuned so that ``minimask train --config shapes`` reaches COCO AP >= 0.70 (bbox) and >= 0.75
    (segm) on its own val split in minutes on a 2-core CPU (README.md has the measured time and
    AP, with the CPU).  The choices that matter most:
    - ``aligned=True`` (Detectron2's ROIAlignV2): the objects are ~23 px across, a few cells of
      P2, so torchvision's half-pixel offset costs localization at high IoU; with it the mask
      loss at the same iteration roughly halved and bbox AP rose from 0.68 to 0.71.
    - ``mask_head_dim=32``: late in training most of a step is the mask head's four 3x3 convs on
      the positive RoIs (cost grows with the square of the width); 32 channels freed the time
      for 2000 iterations instead of 1500 at the same wall time.
    - ``backbone_init="pytorch_default"``: the from-scratch ResNet's convs start as ``nn.Conv2d``
      does, not He-normal fan_out (``resnet.ResNet._init_weights`` says why it matters behind
      batch norm).  Found comparing with torchvision (``scripts/ap_parity.py``, 700 iterations,
      three seeds each; the numbers are in the issue notes): on both sides it was the largest
      single difference in AP, larger than the seed spread.
    - ``mask_predictor_init="normal_0.001"`` (Detectron2's): the mask loss starts at ln 2
      instead of torchvision's confidently wrong Kaiming logits; the better mean mask AP over
      the same three seeds, though within their spread on one of them.
    - 1200 iterations (drops at 900 and 1110, the old schedule's fractions): with the two starts
      above, three seeds at 1200 iterations all pass 0.70 / 0.75, where 1000 did not (the old
      preset needed 2000 iterations).
    - ``data_parallel=2``: two one-thread processes, each on half the batch
      (``engine/parallel.py``), get through a step on two cores sooner than one process with two
      BLAS threads.  It changes the numbers (batch norm and the loss means per half), so the
      schedule's AP was measured with it.  ``--set data_parallel=1`` for one process.
    """
    return MaskRCNNConfig(
        num_classes=4,  # background + 3 (the trainer takes the names from the data set)
        min_size=(128,), max_size=128,
        depth=18, width=16, norm="bn", freeze_at=0, fpn_out_channels=64,
        anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
        rpn_pre_nms_top_n_train=600, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=64, box_head_dim=256, mask_head_dim=32,
        box_detections_per_img=20, aligned=True, backbone_init="pytorch_default",
        mask_predictor_init="normal_0.001",
        batch_size=8, iters=1200, lr=0.02, milestones=(900, 1110), warmup_iters=100,
        checkpoint_period=400, eval_period=0, data_parallel=2,
    )


def _r50_fpn():
    """The paper's ResNet-50-FPN with the torchvision/Detectron2 defaults (COCO, 91 classes)."""
    return MaskRCNNConfig()


def _torchvision_r50_fpn():
    """torchvision's maskrcnn_resnet50_fpn, setting for setting, to run its COCO weights
    (``minimask convert-weights``): labels are COCO category ids (91 outputs), sides resized by
    flooring, masks pasted as torchvision pastes them, trained on soft mask targets (the RoIAlign
    crop of the gt mask as it is, not binarized); the rest are already the defaults.  The
    names of the 91 outputs are not the preset's business: the converter writes them into the
    checkpoint it makes (``interop.convert_weights``)."""
    return MaskRCNNConfig(frozen_bn_eps=1e-5, resize_rounding="floor", paste_mode="torchvision",
                          labels_are_coco_ids=True, mask_target_binarize=False)


def _figures():
    """Keypoints on CPU: the shapes model (same backbone, RPN and box head; the 2000-iteration
    schedule in one process that shapes had when this was measured) with no mask head and a
    narrow keypoint head, on the synthetic stick figures (``minimask data figures``:
    11 joints, 3 distractor classes).  The keypoint head's four 3x3 convs of 32 channels cost what
    the shapes mask head does (four of 32), so a step costs about what a shapes step costs.

    Tuned so that ``minimask train --config figures`` reaches keypoint AP (OKS 0.50:0.95) >= 0.5
    on its own val split in under 15 minutes on a 2-core CPU (measured from an empty folder:
    12 min 19 s, keypoint AP 0.533, bbox AP 0.513; with ``seed=1`` and ``seed=2``: keypoint AP
    0.551 and 0.531).  What mattered, measured one change at a time (2000 iterations, seed 0):

    - no flip augmentation: the figures tell left from right by position *and* by shade (left
      limbs darker), and a flip keeps the first cue but inverts the second.  Keypoint AP 0.474
      with flips (names swapped), 0.458 with flips keeping the names, 0.498 without;
    - 4000 training images instead of 1500 (``minimask data figures``' default; they take ~20 s
      to draw): the train-val gap was 0.59 vs 0.50 keypoint AP; 0.503 with 4000;
    - ``keypoint_box_scale=1.1``: the head reads each box 10% larger.  A figure's box is the box
      of its visible pixels, so a hand or foot sits on its edge and a detected box a pixel short
      cut it off (a quarter of the hands were more than 5 px off, most of them outside the box);
      0.533 with it, training and testing on the enlarged boxes.
    A wider keypoint head (48 channels) did not help.

    The sizes (5 classes with background, 11 joints, the figure as label 1) are the model's; the
    names and the skeleton come from the data set when training starts."""
    return dataclasses.replace(
        _shapes(), num_classes=5, mask_on=False, keypoint_on=True, num_keypoints=11, keypoint_label=1,
        keypoint_head_dim=32, keypoint_head_convs=4, hflip_prob=0.0, keypoint_box_scale=1.1,
        backbone_init="kaiming_fan_out",  # as measured above; shapes' later default is untried here
        iters=2000, milestones=(1500, 1850), checkpoint_period=500, data_parallel=1,  # likewise
    )


def _r50_fpn_keypoints():
    """The paper's ResNet-50-FPN keypoint model as torchvision's keypointrcnn_resnet50_fpn: person
    and background, 17 COCO keypoints, box + keypoint heads, multi-scale training 640..800
    (names and skeleton from the data set, or from the converter for torchvision's weights)."""
    return MaskRCNNConfig(
        num_classes=2, min_size=(640, 672, 704, 736, 768, 800),
        mask_on=False, keypoint_on=True, num_keypoints=17,
    )


PRESETS = {"shapes": _shapes, "r50_fpn": _r50_fpn, "torchvision_r50_fpn": _torchvision_r50_fpn,
           "figures": _figures, "r50_fpn_keypoints": _r50_fpn_keypoints}


def preset(name):
    """The named preset's config; a clear error lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def override(cfg, assignments):
    """Apply ``["key=value", ...]`` (values parsed as Python literals, else kept as strings)."""
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"--set {key}: no such config field; valid fields: {sorted(fields)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = getattr(cfg, key)
        if isinstance(old, tuple) and not isinstance(value, tuple):
            value = tuple(value) if isinstance(value, list) else (value,)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(old) is not type(value):
            raise ValueError(f"--set {key}={text!r}: expected a {type(old).__name__} like {old!r}")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(d):
    """Config from a dict (as saved in a checkpoint); lists become tuples again."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    known = {f.name for f in dataclasses.fields(MaskRCNNConfig)}
    return MaskRCNNConfig(**{k: tup(v) for k, v in d.items() if k in known})


__all__ = ["MaskRCNNConfig", "preset", "override", "PRESETS", "to_dict", "from_dict"]
