"""The mask branch: a small FCN predicting an m x m mask per RoI (paper Sec. 3, Fig. 4 right).

    RoIAlign 14x14 -> 4 x (3x3 conv 256, ReLU)   mask_fcn1..mask_fcn4
                   -> 2x2 stride-2 deconv, ReLU  conv5_mask        (14x14 -> 28x28)
                   -> 1x1 conv to K channels     mask_fcn_logits   (one 28x28 mask per class)

Sec. 3: "the mask branch has a K m^2-dimensional output for each RoI, which encodes K binary
masks of resolution m x m, one for each of the K classes.  To this we apply a per-pixel
sigmoid, and define L_mask as the average binary cross-entropy loss.  For an RoI associated
with ground-truth class k, L_mask is only defined on the k-th mask (other mask outputs do not
contribute to the loss)."  That decouples mask and class prediction: the classes do not
compete for a pixel, which Table 2b finds worth +5.5 mask AP over a per-pixel softmax.

The mask target of an RoI is "the intersection between an RoI and its associated ground-truth
mask" (Sec. 3.1): the ground-truth mask cropped to the RoI's box and resized to m x m.

Ablation switches of Table 2 (read from the config):
- ``mask_loss="softmax"`` (Table 2b): a multinomial cross-entropy over the channels at each
  pixel, the target being the ground-truth class inside the mask and background outside.
- ``class_agnostic_masks`` (Sec. 4.2, "Class-Agnostic Masks"): one mask channel for all classes
  (two, background and foreground, with the softmax loss).
- ``mask_head_type="mlp"`` (Table 2e): fully connected layers instead of convolutions; we use
  the paper's first MLP row, fc 1024 -> fc 1024 -> fc m^2 per channel (width ``box_head_dim``,
  1024 in the paper), on the flattened 14x14 pooled features.
"""

import math

from .. import functional as F
from .. import nn
from ..backend import get_array_module
from ..functional.activation import stable_sigmoid
from ..tensor import Tensor


def mask_channels(cfg):
    """Number of mask logits per pixel: K+1 per class (channel 0, background, is never trained
    with the sigmoid loss; it keeps torchvision's layout), 1 class-agnostic, 2 for an agnostic
    softmax (background / foreground)."""
    if cfg.class_agnostic_masks:
        return 2 if cfg.mask_loss == "softmax" else 1
    return cfg.num_classes


def _kaiming(module):
    # torchvision's MaskRCNNHeads / MaskRCNNPredictor: He init for ReLU layers (fan_out keeps the
    # backward gradients at a steady scale, He et al. 2015 Eq. 14) and zero biases.
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    nn.init.constant_(module.bias, 0.0)


class MaskHead(nn.Module):
    """The FCN part: ``num_convs`` 3x3 convolutions with ReLU, 14x14 in and out."""

    def __init__(self, in_channels, dim=256, num_convs=4):
        super().__init__()
        self.num_convs = num_convs
        for i in range(1, num_convs + 1):
            conv = nn.Conv2d(in_channels if i == 1 else dim, dim, 3, padding=1)
            _kaiming(conv)
            setattr(self, f"mask_fcn{i}", conv)  # torchvision's names: mask_fcn1 .. mask_fcn4

    def forward(self, x):
        for i in range(1, self.num_convs + 1):
            x = nn.conv_relu(getattr(self, f"mask_fcn{i}"), x)  # relu(conv(x))
        return x


MASK_PREDICTOR_INITS = ("kaiming", "normal_0.001")


def init_mask_logits(layer, init):
    """Start the layer that gives the mask logits (1x1 conv of the FCN, last fc of the MLP) as
    ``init`` says (``cfg.mask_predictor_init``; see ``MaskPredictor``), zero bias either way."""
    if init not in MASK_PREDICTOR_INITS:
        raise ValueError(f"mask predictor init {init!r} is not one of {list(MASK_PREDICTOR_INITS)}")
    if init == "kaiming":
        _kaiming(layer)
    else:
        nn.init.normal_(layer.weight, std=0.001)
        nn.init.constant_(layer.bias, 0.0)


class MaskPredictor(nn.Module):
    """Upsample 2x with a transposed convolution, then one 1x1 conv of logits per channel.

    ``init`` (``cfg.mask_predictor_init``) is how the 1x1 logits layer starts; the two reference
    implementations differ here (the deconvolution is He-initialised in both):

    - ``"kaiming"``: He normal, fan_out, ReLU gain, zero bias, as torchvision's
      ``MaskRCNNPredictor`` (torchvision/models/detection/mask_rcnn.py initialises every weight
      of the predictor with ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``).  The
      logits start spread out, so the mask loss starts well above ln 2;
    - ``"normal_0.001"``: normal with std 0.001, zero bias, as Detectron2's
      ``MaskRCNNConvUpsampleHead`` (detectron2/modeling/roi_heads/mask_head.py: "use normal
      distribution initialization for mask prediction layer").  Every pixel then starts near
      p = 0.5 and the loss at ln 2, as the box classifier starts (``box_head.py``).

    The MLP head of Table 2e (``MaskMLPPredictor``) starts its logits layer by the same switch,
    so that an FCN-against-MLP comparison does not also compare two initialisations.
    """

    def __init__(self, in_channels, dim, num_channels, init="kaiming"):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim, 2, stride=2)
        self.mask_fcn_logits = nn.Conv2d(dim, num_channels, 1)
        _kaiming(self.conv5_mask)
        init_mask_logits(self.mask_fcn_logits, init)

    def forward(self, x):
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


class MaskMLPHead(nn.Module):
    """Table 2e's MLP: the pooled features flattened, then two fc layers with ReLU."""

    def __init__(self, in_features, dim):
        super().__init__()
        self.mask_fc1 = nn.Linear(in_features, dim)
        self.mask_fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: NumPy cannot infer it for 0 RoIs
        x = F.relu(self.mask_fc1(x))
        return F.relu(self.mask_fc2(x))


class MaskMLPPredictor(nn.Module):
    """One fc layer giving all m x m logits of every channel, reshaped to (P, C, m, m)."""

    def __init__(self, dim, num_channels, resolution, init="kaiming"):
        super().__init__()
        self.num_channels, self.resolution = num_channels, resolution
        self.mask_fc_logits = nn.Linear(dim, num_channels * resolution * resolution)
        init_mask_logits(self.mask_fc_logits, init)  # as the FCN's logits (cfg.mask_predictor_init)

    def forward(self, x):
        m = self.resolution
        return self.mask_fc_logits(x).reshape(x.shape[0], self.num_channels, m, m)


def project_masks_on_boxes(gt_masks, boxes, matched_idxs, resolution, aligned=False, dtype=None,
                           binarize=True):
    """Mask targets: each box's ground-truth mask cropped to the box and resized to m x m.

    gt_masks (N, H, W) 0/1 masks of one image; boxes (P, 4) the RoIs (proposals, not the gt
    boxes: the target is what the RoI sees); matched_idxs (P,) the gt of each RoI.  Returns
    (P, m, m): bool with ``binarize``, else the soft values in [0, 1] in ``dtype`` (default the
    boxes').

    The crop-and-resize is RoIAlign on the mask as a one-channel float image, as in torchvision
    (``roi_align(gt_masks[:, None], rois, (M, M), 1.0)``: spatial scale 1, adaptive sampling,
    i.e. about one sample per mask pixel) and Detectron2 (``BitMasks.crop_and_resize``).  By
    default we follow Detectron2 in binarizing the result at 0.5, so a target pixel is "inside"
    when at least half of what the RoI sees there is mask; ``binarize=False`` keeps the soft
    values, as torchvision trains on them (``cfg.mask_target_binarize``).  Aligned follows the
    features' pooler: torchvision's False by default, Detectron2's True with it.
    """
    xp = get_array_module(boxes)
    dtype = dtype or boxes.dtype
    if len(boxes) == 0:
        return xp.zeros((0, resolution, resolution), dtype=bool if binarize else dtype)
    # Only the masks some RoI is matched to are converted to float (an image may hold many).
    used, inverse = xp.unique(matched_idxs, return_inverse=True)
    masks = gt_masks[used].astype(dtype)[:, None]  # (U, 1, H, W)
    rois = xp.concatenate([inverse.reshape(-1, 1).astype(dtype), boxes.astype(dtype)], axis=1)
    crops = F.roi_align(Tensor(masks), rois, resolution, spatial_scale=1.0, sampling_ratio=0,
                        aligned=aligned).data[:, 0]
    return crops >= 0.5 if binarize else crops


def mask_loss(mask_logits, mask_targets, labels, loss_type="sigmoid", class_agnostic=False):
    """L_mask over the positive RoIs (Sec. 3): mask_logits (P, C, m, m) Tensor; mask_targets
    (P, m, m) bool, or soft values in [0, 1] for the sigmoid loss; labels (P,) the gt classes (1..K).

    sigmoid: binary cross-entropy on the channel of the gt class only (channel 0 if agnostic),
             averaged over the P m^2 pixels.  The other channels get no gradient at all.
    softmax: cross-entropy over all C channels per pixel; the target is the gt class (1 if
             agnostic) inside the mask and 0 (background) outside; averaged over pixels.
    """
    xp = get_array_module(labels)
    num, channels, m = mask_logits.shape[0], mask_logits.shape[1], mask_logits.shape[-1]
    if mask_targets.shape != (num, m, m):
        raise ValueError(f"mask targets of shape {tuple(mask_targets.shape)} "
                         f"for mask logits of shape {tuple(mask_logits.shape)}")
    fg = xp.ones_like(labels) if class_agnostic else labels
    if loss_type == "softmax":
        if mask_targets.dtype != bool:
            raise ValueError("the softmax mask loss needs binary mask targets (mask_target_binarize=True)")
        target = xp.where(mask_targets, fg[:, None, None], 0).astype(xp.int64).reshape(-1)
        per_pixel = mask_logits.transpose(0, 2, 3, 1).reshape(-1, channels)  # (P m m, C)
        return F.cross_entropy(per_pixel, target)
    if loss_type != "sigmoid":
        raise ValueError(f"unknown mask loss {loss_type!r}: expected 'sigmoid' or 'softmax'")
    channel = xp.zeros_like(labels) if class_agnostic else labels
    chosen = mask_logits[xp.arange(num), channel]  # (P, m, m): "only defined on the k-th mask"
    return F.binary_cross_entropy_with_logits(chosen, mask_targets.astype(chosen.dtype))


def mask_probabilities(mask_logits, labels, loss_type="sigmoid", class_agnostic=False):
    """Inference: (N, m, m) probabilities of each detection's predicted class (plain arrays).

    Sec. 3.1: "The m x m floating-number mask output is then resized to the RoI size, and
    binarized at a threshold of 0.5"; the resizing is done later, when pasting into the image.
    """
    xp = get_array_module(mask_logits)
    num = mask_logits.shape[0]
    rows = xp.arange(num)
    if loss_type == "softmax":
        e = xp.exp(mask_logits - mask_logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        channel = xp.ones_like(labels) if class_agnostic else labels
        return probs[rows, channel]
    channel = xp.zeros_like(labels) if class_agnostic else labels
    return stable_sigmoid(mask_logits[rows, channel])
