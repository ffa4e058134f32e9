"""Region Proposal Network (models/rpn.py): anchor labels and regression targets by hand, the
flattening order against hand-made anchors, the proposal pipeline against a plain-loop
reference, the losses against their definitions, gradients, eval mode and bad input."""

import dataclasses
import math

import numpy as np
import pytest

from minimask import Tensor, gradcheck, nn, no_grad
from minimask.backend import to_device
from minimask.models.config import preset
from minimask.models.rpn import RegionProposalNetwork, RPNHead
from minimask.ops import BalancedPositiveNegativeSampler

BATCH = (64, 64)  # padded batch: P2..P6 are 16, 8, 4, 2, 1 pixels with strides 4..64
LEVEL_HW = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
STRIDES = [4, 8, 16, 32, 64]
A = 3  # aspect ratios (0.5, 1, 2), one size per level


def shapes_cfg(**kw):
    return dataclasses.replace(preset("shapes"), **kw)


def make_target(boxes, crowd=None):
    """One target as models/transform.py prepares it: float32 boxes, int64 labels, float32
    crowd boxes, possibly (0, 4) (the RPN reads boxes and crowd_boxes, and moves nothing)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    crowd = np.zeros((0, 4), np.float32) if crowd is None else np.asarray(crowd, np.float32).reshape(-1, 4)
    return dict(boxes=boxes, labels=np.ones(len(boxes), np.int64), crowd_boxes=crowd)


def feature_stubs(n, dtype=np.float64, channels=1):
    """Tensors of the pyramid's shapes: the RPN reads shape, dtype and device from them."""
    return [Tensor(np.zeros((n, channels, h, w), dtype=dtype)) for h, w in LEVEL_HW]


class FixedHead(nn.Module):
    """Stands in for RPNHead: returns the given per-level (objectness, deltas)."""

    def __init__(self, objectness, deltas):
        super().__init__()
        self.out = ([Tensor(o) for o in objectness], [Tensor(d) for d in deltas])

    def forward(self, features):
        return self.out


def hand_anchor(level, y, x, a, cfg):
    """The anchor at (level, y, x, a), written out from Faster R-CNN's definition (size s,
    ratio r = h / w: w = s / sqrt(r), h = s * sqrt(r), rounded half-size box shifted by the
    stride), independently of AnchorGenerator."""
    s = cfg.anchor_sizes[level][0]
    r = cfg.aspect_ratios[a]
    w, h = s / math.sqrt(r), s * math.sqrt(r)
    base = np.round(np.array([-w, -h, w, h]) / 2)
    shift = np.array([x, y, x, y], dtype=np.float64) * STRIDES[level]
    return base + shift


def hand_decode(d, anchor):
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx, cy = anchor[0] + w / 2, anchor[1] + h / 2
    dw, dh = min(d[2], math.log(1000 / 16)), min(d[3], math.log(1000 / 16))
    cx, cy, w, h = cx + d[0] * w, cy + d[1] * h, w * math.exp(dw), h * math.exp(dh)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def hand_encode(g, a):
    aw, ah, gw, gh = a[2] - a[0], a[3] - a[1], g[2] - g[0], g[3] - g[1]
    return np.array([(g[0] + gw / 2 - a[0] - aw / 2) / aw, (g[1] + gh / 2 - a[1] - ah / 2) / ah,
                     math.log(gw / aw), math.log(gh / ah)])


def iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---- the head ----------------------------------------------------------------------------
def test_head_shapes_names_and_init(rng):
    head = RPNHead(32, 3)
    assert list(head.state_dict()) == ["conv.weight", "conv.bias", "cls_logits.weight",
                                       "cls_logits.bias", "bbox_pred.weight", "bbox_pred.bias"]
    assert head.conv.weight.shape == (32, 32, 3, 3)
    assert head.cls_logits.weight.shape == (3, 32, 1, 1)
    assert head.bbox_pred.weight.shape == (12, 32, 1, 1)
    w = head.conv.weight.data
    assert 0.008 < w.std() < 0.012 and abs(w.mean()) < 0.002  # N(0, 0.01^2), 9216 samples
    for layer in (head.conv, head.cls_logits, head.bbox_pred):
        assert np.all(layer.bias.data == 0)
    feats = [Tensor(rng.standard_normal((2, 32, h, w)).astype(np.float32)) for h, w in [(8, 6), (4, 3)]]
    obj, deltas = head(feats)
    assert [o.shape for o in obj] == [(2, 3, 8, 6), (2, 3, 4, 3)]
    assert [d.shape for d in deltas] == [(2, 12, 8, 6), (2, 12, 4, 3)]


def test_rpn_state_dict_names_follow_torchvision():
    rpn = RegionProposalNetwork(preset("shapes"))
    assert set(rpn.state_dict()) == {"head.conv.weight", "head.conv.bias", "head.cls_logits.weight",
                                     "head.cls_logits.bias", "head.bbox_pred.weight", "head.bbox_pred.bias"}
    assert rpn.head.cls_logits.weight.shape[0] == A


# ---- flattening order ----------------------------------------------------------------------
def test_flattening_order_lines_up_with_anchors():
    """A logit high at exactly one (level, y, x, a) per image must give, as top proposal, that
    anchor decoded with the deltas stored at channels 4a..4a+3 of that location."""
    cfg = shapes_cfg()
    rpn = RegionProposalNetwork(cfg).eval()
    peaks = {0: (0, 1, 6, 0, [0.05, 0.1, -0.2, 0.1]),  # image: (level, y, x, a, deltas)
             1: (1, 5, 3, 2, [0.1, -0.2, 0.3, 0.1])}
    obj = [np.full((2, A, h, w), -5.0) for h, w in LEVEL_HW]
    deltas = [np.zeros((2, 4 * A, h, w)) for h, w in LEVEL_HW]
    rng = np.random.default_rng(1)
    for o in obj:  # small noise so that no two scores tie
        o += rng.uniform(0, 0.1, o.shape)
    for n, (level, y, x, a, d) in peaks.items():
        obj[level][n, a, y, x] = 4.0
        deltas[level][n, 4 * a:4 * a + 4, y, x] = d
    rpn.head = FixedHead(obj, deltas)
    proposals, losses = rpn(feature_stubs(2), [BATCH, BATCH], BATCH)
    assert losses == {}
    for n, (level, y, x, a, d) in peaks.items():
        expected = hand_decode(d, hand_anchor(level, y, x, a, cfg))
        assert np.all(expected >= 0) and np.all(expected <= 64)  # not clipped: an exact check
        np.testing.assert_allclose(proposals[n][0], expected, rtol=1e-6, atol=1e-4)


# ---- proposals against a plain-loop reference --------------------------------------------------
def reference_proposals(obj, deltas, image_size, cfg, pre_n, post_n):
    """One image, written as loops straight from the description: per level the pre_n best
    anchors, decode, clip, drop small and low-scoring, greedy NMS within the level; then the
    post_n best over all levels."""
    h_img, w_img = image_size
    kept = []  # (score, box)
    for level, (o, d) in enumerate(zip(obj, deltas)):
        cands = []
        _, h, w = o.shape
        for y in range(h):
            for x in range(w):
                for a in range(A):
                    cands.append((o[a, y, x], d[4 * a:4 * a + 4, y, x], hand_anchor(level, y, x, a, cfg)))
        cands.sort(key=lambda c: -c[0])
        boxes = []
        for logit, dd, anchor in cands[:pre_n]:
            b = hand_decode(dd, anchor)
            b[0::2] = np.clip(b[0::2], 0, w_img)
            b[1::2] = np.clip(b[1::2], 0, h_img)
            score = sigmoid(logit)
            if b[2] - b[0] >= cfg.rpn_min_size and b[3] - b[1] >= cfg.rpn_min_size \
                    and score >= cfg.rpn_score_thresh:
                boxes.append((score, b))
        level_kept = []
        for score, b in sorted(boxes, key=lambda sb: -sb[0]):
            if all(iou(b, k) <= cfg.rpn_nms_thresh for _, k in level_kept):
                level_kept.append((score, b))
        kept += level_kept
    kept.sort(key=lambda sb: -sb[0])
    return np.array([b for _, b in kept[:post_n]]).reshape(-1, 4), np.array([s for s, _ in kept[:post_n]])


@pytest.mark.parametrize("training,pre_n,post_n,score_thresh", [
    (True, 25, 18, 0.2),   # post_n caps the count
    (False, 12, 9, 0.2),   # eval mode reads the *_test numbers
    (False, 30, 500, 0.6),  # no cap: the score threshold and NMS decide what is left
])
def test_proposals_match_plain_loop_reference(training, pre_n, post_n, score_thresh):
    other = dict(pre=7, post=5)  # the numbers of the other mode, which must not be used
    if training:
        cfg = shapes_cfg(rpn_pre_nms_top_n_train=pre_n, rpn_post_nms_top_n_train=post_n,
                         rpn_pre_nms_top_n_test=other["pre"], rpn_post_nms_top_n_test=other["post"],
                         rpn_min_size=3.0, rpn_score_thresh=score_thresh)
    else:
        cfg = shapes_cfg(rpn_pre_nms_top_n_test=pre_n, rpn_post_nms_top_n_test=post_n,
                         rpn_pre_nms_top_n_train=other["pre"], rpn_post_nms_top_n_train=other["post"],
                         rpn_min_size=3.0, rpn_score_thresh=score_thresh)
    rpn = RegionProposalNetwork(cfg).train(training)
    rng = np.random.default_rng(2)
    obj = [rng.normal(0, 2, (2, A, h, w)) for h, w in LEVEL_HW]
    deltas = [rng.normal(0, 0.5, (2, 4 * A, h, w)) for h, w in LEVEL_HW]
    rpn.head = FixedHead(obj, deltas)
    sizes = [(50, 60), (64, 37)]  # smaller than the padded batch: clipping matters
    targets = [make_target(np.zeros((0, 4)))] * 2 if training else None
    proposals, losses = rpn(feature_stubs(2), sizes, BATCH, targets)
    assert set(losses) == ({"loss_rpn_cls", "loss_rpn_box"} if training else set())
    for n in range(2):
        ref_boxes, ref_scores = reference_proposals([o[n] for o in obj], [d[n] for d in deltas],
                                                    sizes[n], cfg, pre_n, post_n)
        if post_n < 100:
            assert len(ref_boxes) == post_n  # the inputs give more candidates than post_n
        else:
            assert 10 < len(ref_boxes) < 5 * pre_n and ref_scores.min() >= score_thresh
        assert proposals[n].dtype == np.float64  # the features' dtype, as the RoI heads take it
        np.testing.assert_allclose(proposals[n], ref_boxes, rtol=1e-5, atol=1e-4)


def test_proposals_clipped_deduplicated_and_capped():
    """Two anchors of one level whose deltas decode to the same box: NMS keeps one; every box
    lies in its image; no more than post_nms_top_n; scores fall."""
    cfg = shapes_cfg(rpn_post_nms_top_n_test=30)
    rpn = RegionProposalNetwork(cfg).eval()
    rng = np.random.default_rng(3)
    obj = [rng.uniform(-4, -3, (1, A, h, w)) for h, w in LEVEL_HW]
    deltas = [rng.normal(0, 1.0, (1, 4 * A, h, w)) for h, w in LEVEL_HW]  # wide: boxes leave the image
    # P2 anchors a=1 (8x8, square) at (y=4, x=5) and (y=4, x=6), 4 px apart: shift the second
    # one back by one stride (dx = -4 / 8) so both decode to the same box.
    deltas[0][0, 4:8, 4, 5] = [0, 0, 0, 0]
    deltas[0][0, 4:8, 4, 6] = [-0.5, 0, 0, 0]
    obj[0][0, 1, 4, 5], obj[0][0, 1, 4, 6] = 3.0, 2.5
    # P3 anchor a=1 (16x16) at (y=2, x=3), centred at (24, 16): halved and moved 4 px left it
    # is the same box again, on another level, where NMS must not reach (NMS is per level).
    deltas[1][0, 4:8, 2, 3] = [-0.25, 0, math.log(0.5), math.log(0.5)]
    obj[1][0, 1, 2, 3] = 2.8
    rpn.head = FixedHead(obj, deltas)
    sizes = [(40, 52)]
    with no_grad():
        (boxes,), _ = rpn(feature_stubs(1), sizes, BATCH)
        _, (scores,), (levels,) = rpn.filter_proposals(
            *[np.concatenate(x, axis=1) for x in _flat(obj, deltas)],
            rpn.anchors(BATCH, feature_stubs(1)), sizes)

    same = hand_decode([0, 0, 0, 0], hand_anchor(0, 4, 5, 1, cfg))
    np.testing.assert_allclose(hand_decode([-0.5, 0, 0, 0], hand_anchor(0, 4, 6, 1, cfg)), same)
    np.testing.assert_allclose(boxes[0], same, atol=1e-5)
    np.testing.assert_allclose(hand_decode(deltas[1][0, 4:8, 2, 3], hand_anchor(1, 2, 3, 1, cfg)), same)
    copies = np.nonzero(np.all(np.abs(boxes - same) < 1e-4, axis=1))[0]
    assert len(copies) == 2  # the same-level duplicate is gone, the other level's copy stays
    np.testing.assert_array_equal(levels[copies], [0, 1])
    np.testing.assert_allclose(scores[copies], [sigmoid(3.0), sigmoid(2.8)], rtol=1e-6)
    assert np.isclose(scores[0], sigmoid(3.0))
    assert len(boxes) == 30
    assert np.all(np.diff(scores) <= 0)
    assert np.all(boxes[:, 0::2] >= 0) and np.all(boxes[:, 0::2] <= 52)
    assert np.all(boxes[:, 1::2] >= 0) and np.all(boxes[:, 1::2] <= 40)
    assert np.any(boxes[:, 2] == 52) or np.any(boxes[:, 3] == 40)  # some box was clipped
    for i in range(len(boxes)):  # NMS works within each level
        for j in range(i):
            if levels[i] == levels[j]:
                assert iou(boxes[i], boxes[j]) <= cfg.rpn_nms_thresh + 1e-6


def _flat(obj, deltas):
    """Flatten per-level head outputs by explicit loops in the (y, x, anchor) order."""
    flat_o, flat_d = [], []
    for o, d in zip(obj, deltas):
        n, a, h, w = o.shape
        fo = np.empty((n, h * w * a))
        fd = np.empty((n, h * w * a, 4))
        for y in range(h):
            for x in range(w):
                for k in range(a):
                    fo[:, (y * w + x) * a + k] = o[:, k, y, x]
                    fd[:, (y * w + x) * a + k] = d[:, 4 * k:4 * k + 4, y, x]
        flat_o.append(fo)
        flat_d.append(fd)
    return flat_o, flat_d


# ---- training targets ------------------------------------------------------------------------
GT = np.array([[0, 0, 10, 10], [100, 100, 120, 120]], dtype=np.float32)  # the float64 anchors match it
ANCHORS = np.array([
    [0, 0, 10, 10],        # 0: IoU 1 with gt 0            -> positive
    [0, 0, 10, 8],         # 1: IoU 0.8                    -> positive
    [0, 0, 10, 7],         # 2: IoU 0.7 exactly            -> positive (>= 0.7)
    [0, 0, 10, 5],         # 3: IoU 0.5                    -> ignored
    [0, 0, 10, 3],         # 4: IoU 0.3 exactly            -> ignored (not < 0.3)
    [0, 0, 10, 2],         # 5: IoU 0.2                    -> negative
    [50, 50, 60, 60],      # 6: no overlap                 -> negative
    [100, 100, 120, 110],  # 7: IoU 0.5, gt 1's best       -> positive (low-quality match)
    [100, 100, 120, 104],  # 8: IoU 0.2 with gt 1          -> negative
    [210, 210, 230, 230],  # 9: inside the crowd box       -> negative, or ignored with crowds
    [290, 290, 310, 310],  # 10: 25% inside the crowd box  -> negative
    [280, 200, 305, 220],  # 11: 80% inside the crowd box  -> negative, or ignored with crowds
], dtype=np.float64)
CROWD = np.array([[200, 200, 300, 300]], dtype=np.float32)


def test_anchor_labels_and_regression_targets():
    rpn = RegionProposalNetwork(preset("shapes"))
    (labels,), (reg,) = rpn.assign_targets(ANCHORS, [make_target(GT)])
    np.testing.assert_array_equal(labels, [1, 1, 1, -1, -1, 0, 0, 1, 0, 0, 0, 0])
    assert labels.dtype == np.int64
    matched_gt = {0: 0, 1: 0, 2: 0, 7: 1}
    for i in range(len(ANCHORS)):
        expected = hand_encode(GT[matched_gt[i]], ANCHORS[i]) if i in matched_gt else np.zeros(4)
        np.testing.assert_allclose(reg[i], expected, atol=1e-12)
    np.testing.assert_allclose(reg[1], [0, 0.125, 0, math.log(10 / 8)])  # one written out


def test_crowd_regions_and_images_without_objects():
    rpn = RegionProposalNetwork(preset("shapes"))
    crowd_over_gt = np.array([[0, 0, 12, 12]])  # covers anchors 0..5: only negatives change
    labels, reg = rpn.assign_targets(ANCHORS, [
        make_target(GT, CROWD),
        make_target(GT, crowd_over_gt),
        make_target(np.zeros((0, 4)), CROWD),
        make_target(np.zeros((0, 4))),
        {"boxes": GT},  # no crowd_boxes at all: none
    ])
    np.testing.assert_array_equal(labels[0], [1, 1, 1, -1, -1, 0, 0, 1, 0, -1, 0, -1])
    np.testing.assert_array_equal(labels[1], [1, 1, 1, -1, -1, -1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(labels[2], [0] * 9 + [-1, 0, -1])
    np.testing.assert_array_equal(labels[3], [0] * 12)
    np.testing.assert_array_equal(labels[4], [1, 1, 1, -1, -1, 0, 0, 1, 0, 0, 0, 0])
    assert np.all(reg[2] == 0) and np.all(reg[3] == 0)


# ---- losses ------------------------------------------------------------------------------------
def bce(x, t):
    return max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))


def smooth_l1(d, beta=1 / 9):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


@pytest.mark.parametrize("beta", [1 / 9, 0.0, 1.0])
def test_losses_match_their_definitions(beta):
    """Mean BCE over the sampled anchors; smooth L1 (``cfg.rpn_smooth_l1_beta``: torchvision's 1/9,
    Detectron2's 0, Fast R-CNN's 1) summed over the positives and divided by the number sampled;
    no gradient reaches an anchor that was not sampled."""
    cfg = shapes_cfg(rpn_batch_size_per_image=40, rpn_smooth_l1_beta=beta)
    rpn = RegionProposalNetwork(cfg)
    rng = np.random.default_rng(4)
    obj = [Tensor(rng.normal(0, 1, (2, A, h, w)), requires_grad=True) for h, w in LEVEL_HW]
    deltas = [Tensor(rng.normal(0, 0.3, (2, 4 * A, h, w)), requires_grad=True) for h, w in LEVEL_HW]
    head = FixedHead([], [])
    head.out = (obj, deltas)
    rpn.head = head
    targets = [make_target([[10, 12, 26, 30], [30, 8, 62, 40]]), make_target(np.zeros((0, 4)))]
    _, losses = rpn(feature_stubs(2), [BATCH, BATCH], BATCH, targets)

    # The same draws from a sampler seeded alike, on labels from assign_targets (tested above).
    anchors = np.concatenate([hand_anchor(lv, y, x, a, cfg)[None] for lv, (h, w) in enumerate(LEVEL_HW)
                              for y in range(h) for x in range(w) for a in range(A)])
    labels, reg = rpn.assign_targets(anchors, targets)
    sample = BalancedPositiveNegativeSampler(40, cfg.rpn_positive_fraction, seed=cfg.seed)(labels)
    flat = _flat([o.data for o in obj], [d.data for d in deltas])
    flat_o, flat_d = (np.concatenate(x, axis=1) for x in flat)
    cls_terms, box_sum, count = [], 0.0, 0
    for n, (pos, neg) in enumerate(sample):
        for i in np.nonzero(pos | neg)[0]:
            cls_terms.append(bce(flat_o[n, i], float(pos[i])))
            count += 1
        for i in np.nonzero(pos)[0]:
            box_sum += sum(smooth_l1(flat_d[n, i, k] - reg[n][i, k], beta) for k in range(4))
    assert sample[0][0].sum() > 0 and count == 80  # positives exist; both images fill 40
    np.testing.assert_allclose(losses["loss_rpn_cls"].item(), np.mean(cls_terms), rtol=1e-10)
    np.testing.assert_allclose(losses["loss_rpn_box"].item(), box_sum / count, rtol=1e-10)

    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    grad_o = np.concatenate(_flat([o.grad for o in obj], [d.grad for d in deltas])[0], axis=1)
    sampled = np.stack([p | q for p, q in sample])
    assert np.all(grad_o[~sampled] == 0) and np.all(grad_o[sampled] != 0)


def test_forward_backward_with_random_features(rng):
    """The real head on random features (shapes preset): finite losses near their values at
    initialisation (logits ~ 0 give BCE ~ log 2), and gradients on every head parameter."""
    cfg = preset("shapes")
    rpn = RegionProposalNetwork(cfg)
    feats = [Tensor(rng.standard_normal((2, cfg.fpn_out_channels, h, w)).astype(np.float32),
                    requires_grad=True) for h, w in LEVEL_HW]
    targets = [make_target([[5, 6, 30, 28], [20, 30, 60, 62]]), make_target(np.zeros((0, 4)))]
    proposals, losses = rpn(feats, [(64, 64), (60, 48)], BATCH, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    cls, box = losses["loss_rpn_cls"], losses["loss_rpn_box"]
    assert cls.dtype == np.float32 and box.dtype == np.float32
    assert abs(cls.item() - math.log(2)) < 0.05
    assert np.isfinite(box.item()) and box.item() > 0
    assert all(len(p) <= cfg.rpn_post_nms_top_n_train for p in proposals)
    (cls + box).backward()
    for name, p in rpn.named_parameters():
        assert p.grad is not None and np.all(np.isfinite(p.grad)), name
        assert np.abs(p.grad).max() > 0, name
    assert all(np.abs(f.grad).max() > 0 for f in feats)


def test_loss_gradcheck_through_head_and_flattening():
    """float64 finite differences of both losses with respect to the features and the head's
    weights: checks the permute/reshape/concat/indexing wiring end to end."""
    cfg = shapes_cfg(fpn_out_channels=3, rpn_batch_size_per_image=32)
    rpn = RegionProposalNetwork(cfg).astype(np.float64)
    rng = np.random.default_rng(5)
    for p in rpn.parameters():  # larger weights than the init, so every term matters
        p.data = rng.normal(0, 0.3, p.shape)
    feats = [Tensor(rng.standard_normal((1, 3, h // 2, w // 2)), requires_grad=True)
             for h, w in [(16, 16), (8, 8), (4, 4), (2, 2), (2, 2)]]
    targets = [make_target([[4, 6, 20, 22], [10, 3, 30, 15]])]

    def losses(*inputs):
        rpn.sampler.rng = np.random.default_rng(0)  # the same sample on every call
        _, out = rpn(list(inputs[:5]), [(32, 32)], (32, 32), targets)
        return out["loss_rpn_cls"], out["loss_rpn_box"]

    weights = [rpn.head.conv.weight, rpn.head.cls_logits.weight, rpn.head.bbox_pred.weight]
    assert gradcheck(losses, feats + weights, directions=3)


# ---- modes and errors --------------------------------------------------------------------------
def test_eval_mode_returns_no_losses_and_uses_test_numbers(rng):
    cfg = shapes_cfg(rpn_post_nms_top_n_test=7, rpn_nms_thresh=0.9)
    rpn = RegionProposalNetwork(cfg)
    feats = [Tensor(rng.standard_normal((2, cfg.fpn_out_channels, h, w)).astype(np.float32))
             for h, w in LEVEL_HW]
    rpn.eval()
    with no_grad():
        proposals, losses = rpn(feats, [BATCH, BATCH], BATCH)
    assert losses == {}
    assert [len(p) for p in proposals] == [7, 7]
    assert all(p.dtype == np.float32 for p in proposals)


def test_clear_errors():
    rpn = RegionProposalNetwork(preset("shapes"))
    with pytest.raises(ValueError, match="needs targets"):
        rpn(feature_stubs(1), [BATCH], BATCH)
    with pytest.raises(ValueError, match="expected 5 feature maps"):
        rpn(feature_stubs(1)[:4], [BATCH], BATCH, [make_target(np.zeros((0, 4)))])
    with pytest.raises(ValueError, match="target box 1 of image 0 .* positive width and height"):
        rpn.assign_targets(ANCHORS, [make_target([[0, 0, 5, 5], [3, 3, 3, 9]])])
    with pytest.raises(ValueError, match="2 image sizes for a batch of 1"):
        rpn(feature_stubs(1), [BATCH, BATCH], BATCH, [make_target(np.zeros((0, 4)))])


# ---- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    cfg = preset("shapes")
    feats = [rng.standard_normal((2, cfg.fpn_out_channels, h, w)) for h, w in LEVEL_HW]
    targets = [make_target([[5, 6, 30, 28]], [[40, 40, 64, 64]]), make_target([[20, 30, 60, 62]])]
    results = {}
    for device in ("cpu", "gpu"):
        rpn = RegionProposalNetwork(cfg).astype(np.float64)
        nn.init.manual_seed(0)
        rpn.head = RPNHead(cfg.fpn_out_channels, A).astype(np.float64)
        rpn.to(device)
        f = [Tensor(to_device(x, device)) for x in feats]
        on_device = [{k: to_device(v, device) for k, v in t.items()} for t in targets]  # as prepared
        proposals, losses = rpn(f, [(64, 64), (60, 48)], BATCH, on_device)
        results[device] = ([to_device(p, "cpu") for p in proposals],
                           {k: float(v.item()) for k, v in losses.items()})
    for p_cpu, p_gpu in zip(results["cpu"][0], results["gpu"][0]):
        np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-5, atol=1e-4)
    for k, v in results["cpu"][1].items():
        assert np.isclose(results["gpu"][1][k], v, rtol=1e-6), k
