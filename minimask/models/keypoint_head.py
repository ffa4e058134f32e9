"""The keypoint branch: each keypoint a one-hot mask on an m x m grid (paper Sec. 5).

Sec. 5, "Mask R-CNN for Human Pose Estimation": "We model a keypoint's location as a one-hot
mask, and adopt Mask R-CNN to predict K masks, one for each of K keypoint types (e.g., left
shoulder, right elbow).  [...] For each of the K keypoints of an instance, the training target
is a one-hot m x m binary mask where only a single pixel is labeled as foreground.  During
training, for each visible ground-truth keypoint, we minimize the cross-entropy loss over an
m^2-way softmax output (which encourages a single point to be detected)."

"Implementation Details": "The keypoint head consists of a stack of eight 3x3 512-d conv
layers, followed by a deconv layer and 2x bilinear upscaling, producing an output resolution
of 56x56.  We found that a relatively high resolution output (compared to masks) is required
for keypoint-level localization accuracy."

    RoIAlign 14x14 -> 8 x (3x3 conv 512, ReLU)           keypoint_head.0, .2, ... .14
                   -> 4x4 stride-2 deconv to K channels   keypoint_predictor.kps_score_lowres (28x28)
                   -> bilinear 2x upsampling              (56x56 logits per keypoint)

Targets (``keypoints_to_heatmap``), loss (``keypoint_loss``) and the decoding of heatmaps back
to image points (``heatmaps_to_keypoints``) follow torchvision's ``roi_heads.py`` rule for rule
(Detectron's ``keypoint_utils``): a keypoint at x in an RoI [x1, x2) falls in cell
floor((x - x1) * m / (x2 - x1)), and cell c decodes back to x1 + (c + 0.5) * (x2 - x1) / m_roi.
Module names are torchvision's ``KeypointRCNNHeads`` / ``KeypointRCNNPredictor`` (a Sequential
of conv, ReLU, conv, ...; ``kps_score_lowres``), so its weights load unchanged.
"""

import math

import numpy as np

from .. import functional as F
from .. import nn
from ..backend import get_array_module


def _kaiming(conv):
    # As torchvision's keypoint head: He init (fan_out) for the ReLU layers, zero biases.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.constant_(conv.bias, 0.0)


class KeypointHead(nn.Sequential):
    """``num_convs`` 3x3 convolutions with ReLU at the pooled 14x14 resolution.  Children are
    numbered as torchvision's Sequential: convs at 0, 2, 4, ..., ReLUs in between."""

    def __init__(self, in_channels, dim=512, num_convs=8):
        layers = []
        for i in range(num_convs):
            conv = nn.Conv2d(in_channels if i == 0 else dim, dim, 3, padding=1)
            _kaiming(conv)
            layers += [conv, nn.ReLU()]
        super().__init__(*layers)


class KeypointPredictor(nn.Module):
    """14x14 features -> K logit maps of 56x56: a 4x4 stride-2 deconvolution (padding 1 makes it
    exactly 2x: (14 - 1) * 2 - 2 + 4 = 28), then bilinear 2x upsampling (no weights)."""

    def __init__(self, in_channels, num_keypoints):
        super().__init__()
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2, padding=1)
        _kaiming(self.kps_score_lowres)
        self.up_scale = 2

    def forward(self, x):
        x = self.kps_score_lowres(x)
        return F.interpolate(x, scale_factor=self.up_scale, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- training targets and loss

def enlarge_boxes(boxes, factor):
    """Boxes (N, 4) xyxy scaled by ``factor`` about their centres (1.0: unchanged).

    Why the keypoint head may want it: a person's box is the box of what is visible of them, so
    a hand or a foot lies on its very edge, and a detected box one pixel short of the truth
    leaves that keypoint outside the RoI, where the head cannot put it (at training time it is
    not even trained: ``keypoints_to_heatmap`` drops keypoints outside the RoI).  Top-down pose
    estimators (SimpleBaseline, HRNet) enlarge each person box 1.25x before cropping for the same
    reason.  Keypoint R-CNN as published (and torchvision, Detectron2) uses the boxes as they
    are: ``cfg.keypoint_box_scale = 1.0``.
    """
    if factor == 1.0:
        return boxes
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return get_array_module(boxes).concatenate([centre - half, centre + half], axis=1).astype(boxes.dtype)


def keypoints_to_heatmap(keypoints, rois, heatmap_size):
    """The one-hot targets of each RoI's keypoints, as flat cell indices on the m x m grid.

    keypoints (P, K, 3) x, y, v of the ground truth matched to each RoI; rois (P, 4) xyxy.
    Returns ``(targets (P, K) int64 = row * m + col, valid (P, K) bool)``.  A keypoint is valid
    when it is labelled (v > 0: visible or occluded, as COCO and torchvision train on both) and
    falls inside the RoI.  The cell is floor((x - x1) * m / w): the RoI's right and bottom edges
    are part of it (a keypoint exactly at x2 goes to the last cell, not outside), everything
    else beyond them, or left of x1 or above y1, is outside and not trained.
    """
    xp = get_array_module(keypoints)
    m = heatmap_size
    x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))
    x, y = keypoints[..., 0], keypoints[..., 1]
    col = xp.floor((x - x1) * (m / (x2 - x1))).astype(xp.int64)
    row = xp.floor((y - y1) * (m / (y2 - y1))).astype(xp.int64)
    col = xp.where(x == x2, m - 1, col)  # on the right edge: the last cell
    row = xp.where(y == y2, m - 1, row)
    inside = (col >= 0) & (row >= 0) & (col < m) & (row < m)
    valid = inside & (keypoints[..., 2] > 0)
    return xp.where(valid, row * m + col, 0), valid


def keypoint_loss(keypoint_logits, targets, valid):
    """Sec. 5's loss: an m^2-way softmax cross-entropy per valid keypoint, averaged over the
    valid keypoints of all RoIs (torchvision's normalization: the mean over
    ``logits[valid]``).  keypoint_logits (P, K, m, m) Tensor; targets, valid (P, K)."""
    xp = get_array_module(targets)
    p, k, h, w = keypoint_logits.shape
    if targets.shape != (p, k):
        raise ValueError(f"keypoint targets of shape {tuple(targets.shape)} for logits "
                         f"{tuple(keypoint_logits.shape)}")
    # Invalid keypoints get the ignore index: they add nothing and are not counted in the mean.
    flat = xp.where(valid, targets, -1).astype(xp.int64).reshape(-1)
    return F.cross_entropy(keypoint_logits.reshape(p * k, h * w), flat, ignore_index=-1)


# ---------------------------------------------------------------- inference: heatmaps -> points

def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the four taps at offsets -1, 0, 1, 2 for a fractional
    position t in [0, 1) (a = -0.75, PyTorch's bicubic)."""
    def near(d):   # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):    # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n_in, n_out):
    """The (n_out, n_in) matrix of a 1-D bicubic resize as PyTorch's ``interpolate(mode="bicubic",
    align_corners=False)``: source position (i + 0.5) * n_in / n_out - 0.5 (not clamped), four
    taps around it, indices clamped to the edge (the border pixel repeats)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)
    a = np.zeros((n_out, n_in))
    for offset, w in zip((-1, 0, 1, 2), weights):
        np.add.at(a, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1)), w)
    return a


def heatmaps_to_keypoints(maps, boxes):
    """Keypoints in image pixels from the heatmap logits of each detection (plain arrays).

    maps (D, K, m, m) logits; boxes (D, 4) the detections' boxes.  Returns
    ``(keypoints (D, K, 3) = x, y, 1, scores (D, K))``.

    As torchvision: each RoI's maps are upsampled (bicubic) to the box's own size in pixels,
    ceil(w) x ceil(h), so the arg-max picks a pixel, not a 1/56 of the box; the pixel (i, j)
    maps back to x1 + (j + 0.5) * w / ceil(w), its centre; the score is the upsampled logit at
    the arg-max.  The resize is separable, so it is two small matrix products per RoI.
    """
    xp = get_array_module(maps)
    d, k = maps.shape[:2]
    keypoints = xp.zeros((d, k, 3), dtype=xp.float32)
    scores = xp.zeros((d, k), dtype=xp.float32)
    boxes_cpu = np.asarray(boxes.get() if hasattr(boxes, "get") else boxes, dtype=np.float64)
    for i in range(d):
        x1, y1 = boxes_cpu[i, 0], boxes_cpu[i, 1]
        w = max(boxes_cpu[i, 2] - x1, 1.0)
        h = max(boxes_cpu[i, 3] - y1, 1.0)
        out_w, out_h = int(math.ceil(w)), int(math.ceil(h))
        rows = xp.asarray(bicubic_matrix(maps.shape[2], out_h), dtype=xp.float32)
        cols = xp.asarray(bicubic_matrix(maps.shape[3], out_w), dtype=xp.float32)
        roi_map = rows @ maps[i].astype(xp.float32) @ cols.T  # (K, out_h, out_w)
        pos = roi_map.reshape(k, -1).argmax(axis=1)
        r, c = pos // out_w, pos % out_w
        keypoints[i, :, 0] = (c + 0.5) * (w / out_w) + x1
        keypoints[i, :, 1] = (r + 0.5) * (h / out_h) + y1
        keypoints[i, :, 2] = 1
        scores[i] = roi_map[xp.arange(k), r, c]
    return keypoints, scores


__all__ = ["KeypointHead", "KeypointPredictor", "keypoints_to_heatmap", "keypoint_loss",
           "heatmaps_to_keypoints", "bicubic_matrix"]
