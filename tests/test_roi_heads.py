"""RoI heads (issue 4 items 4-5): target assignment, mask targets, losses, every Table 2 ablation,
and inference post-processing, on small feature maps (16 channels, 64 x 64 images).

Targets are built as the model's transform prepares them (float32 boxes, int64 labels, uint8
masks, float32 crowd boxes, possibly (0, 4)): the heads take them as they are."""

import dataclasses
import math

import numpy as np
import pytest

from minimask import Tensor, gradcheck, nn
from minimask import functional as F
from minimask.backend import to_device
from minimask.models.box_head import fastrcnn_loss
from minimask.models.config import preset
from minimask.models.fpn import BackboneWithFPN
from minimask.models.mask_head import mask_loss, project_masks_on_boxes
from minimask.models.roi_heads import RoIHeads
from minimask.ops import crowd_ignore_mask

SIZE = 64  # image side (already resized and padded)


def small_cfg(**changes):
    base = dict(num_classes=4, fpn_out_channels=16, box_head_dim=32, mask_head_dim=16,
                box_batch_size_per_image=16, box_positive_fraction=0.25, seed=0)
    base.update(changes)
    return dataclasses.replace(preset("shapes"), **base)


def make_heads(**changes):
    nn.init.manual_seed(0)
    return RoIHeads(small_cfg(**changes))


def features(rng, n=2, channels=16, dtype=np.float32):
    shapes = [(n, channels, SIZE // s, SIZE // s) for s in (4, 8, 16, 32)]  # P2..P5
    return [Tensor(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


def make_target(boxes, labels, masks=None, crowd=None):
    """One target in the form models/transform.py's prepare_targets gives the heads."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = np.zeros((len(boxes), SIZE, SIZE), np.uint8) if masks is None else masks.astype(np.uint8)
    crowd = np.zeros((0, 4), np.float32) if crowd is None else np.asarray(crowd, np.float32).reshape(-1, 4)
    return dict(boxes=boxes, labels=np.asarray(labels, np.int64), masks=masks, crowd_boxes=crowd)


def box_mask(box, size=SIZE):
    m = np.zeros((size, size), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = 1
    return m


def training_batch(rng):
    """Two images: two objects in the first, one in the second, and jittered proposals."""
    gt = [np.array([[4, 6, 30, 28], [34, 30, 60, 58]], np.float32), np.array([[10, 12, 44, 40]], np.float32)]
    labels = [np.array([2, 3]), np.array([1])]
    proposals = []
    for boxes in gt:
        jitter = boxes[rng.integers(0, len(boxes), 12)] + rng.uniform(-4, 4, (12, 4)).astype(np.float32)
        corner = rng.uniform(0, SIZE - 12, (10, 2))
        anywhere = np.concatenate([corner, corner + rng.uniform(4, 12, (10, 2))], axis=1).astype(np.float32)
        proposals.append(np.concatenate([jitter, anywhere]))
    targets = [make_target(b, lab, np.stack([box_mask(x) for x in b])) for b, lab in zip(gt, labels)]
    return proposals, targets


# ---- target assignment ---------------------------------------------------------------------------

GT = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
GT_LABELS = np.array([1, 3])
# Proposal, and its IoU with the gt by hand: 80/100, 50/100 (exactly 0.5 is positive: "at least
# 0.5"), 40/100, 200/400 with the second gt, 0, 50/150.
PROPOSALS = np.array([[0, 0, 10, 8], [0, 0, 10, 5], [0, 0, 10, 4], [20, 20, 40, 30],
                      [50, 50, 60, 60], [5, 0, 15, 10]], np.float32)


def test_labels_by_hand_and_gt_appended():
    heads = make_heads()
    target = make_target(GT, GT_LABELS)
    boxes, matched, labels = heads.label_proposals(PROPOSALS, target)
    np.testing.assert_array_equal(boxes[:6], PROPOSALS)
    np.testing.assert_array_equal(boxes[6:], GT)  # the gt boxes are RoIs too ...
    np.testing.assert_array_equal(labels, [1, 1, 0, 3, 0, 0, 1, 3])  # ... and positives of their class
    np.testing.assert_array_equal(matched[[0, 1, 3, 6, 7]], [0, 0, 1, 0, 1])


def test_regression_targets_by_hand():
    heads = make_heads(box_batch_size_per_image=100, box_positive_fraction=1.0)
    target = make_target(GT, GT_LABELS)
    (s,) = heads.select_training_samples([PROPOSALS], [target])
    assert len(s["boxes"]) == 8  # nothing ignored, the batch is large: every RoI is sampled
    by_box = {tuple(b): (lab, d)
              for b, lab, d in zip(s["boxes"].tolist(), s["labels"], s["regression_targets"])}
    # Weights (10, 10, 5, 5): dx = 10 (gx - px) / pw, dy = 10 (gy - py) / ph, dw = 5 log(gw / pw), ...
    expected = {
        (0, 0, 10, 8): (1, [0.0, 10 * (5 - 4) / 8, 0.0, 5 * math.log(10 / 8)]),
        (0, 0, 10, 5): (1, [0.0, 10 * (5 - 2.5) / 5, 0.0, 5 * math.log(10 / 5)]),
        (20, 20, 40, 30): (3, [0.0, 10 * (30 - 25) / 10, 0.0, 5 * math.log(20 / 10)]),
        (0, 0, 10, 10): (1, [0, 0, 0, 0]),
        (20, 20, 40, 40): (3, [0, 0, 0, 0]),
        (0, 0, 10, 4): (0, [0, 0, 0, 0]),  # background: no box target
    }
    for box, (label, deltas) in expected.items():
        got_label, got = by_box[box]
        assert got_label == label
        np.testing.assert_allclose(got, deltas, rtol=1e-5, atol=1e-6)


def test_sampling_counts():
    rng = np.random.default_rng(1)
    gt = np.array([[20, 20, 40, 40]], np.float32)
    near = gt + rng.uniform(-1.5, 1.5, (30, 4)).astype(np.float32)  # IoU > 0.7: positive
    far = (np.array([[60, 60, 63, 63]]) - rng.uniform(0, 2, (100, 1))).astype(np.float32)  # IoU 0
    target = make_target(gt, [2])
    heads = make_heads(box_batch_size_per_image=64, box_positive_fraction=0.25)

    (s,) = heads.select_training_samples([np.concatenate([near, far])], [target])
    assert (s["labels"] > 0).sum() == 16 and (s["labels"] == 0).sum() == 48  # 64 at 1:3
    assert set(s["labels"][s["labels"] > 0].tolist()) == {2}

    (s,) = heads.select_training_samples([np.concatenate([near[:2], far])], [target])
    # 2 proposals + the gt box: 3 positives; negatives fill the rest of the 64.
    assert (s["labels"] > 0).sum() == 3 and (s["labels"] == 0).sum() == 61


def test_image_without_objects_is_all_background():
    heads = make_heads(box_batch_size_per_image=100)
    target = make_target(np.zeros((0, 4)), [])
    (s,) = heads.select_training_samples([PROPOSALS], [target])
    assert len(s["labels"]) == 6 and (s["labels"] == 0).all()
    assert (s["regression_targets"] == 0).all()


def test_crowd_regions_are_ignored():
    crowd = np.array([[0, 0, 30, 30]], np.float32)
    boxes = np.array([[2, 2, 12, 12],     # inside: covered 100%
                      [20, 0, 40, 10],    # half inside: 50%
                      [25, 25, 35, 35],   # a quarter
                      [50, 50, 60, 60]], np.float32)
    np.testing.assert_array_equal(crowd_ignore_mask(boxes, crowd), [True, False, False, False])

    heads = make_heads()
    gt = np.array([[3, 3, 12, 12]], np.float32)  # an object inside the crowd region
    _, _, labels = heads.label_proposals(boxes, make_target(gt, [1], crowd=crowd))
    # The first proposal would be positive (IoU 0.81 with the gt) but lies in the crowd region;
    # the gt box itself is always kept.
    np.testing.assert_array_equal(labels, [-1, 0, 0, 0, 1])
    _, _, labels = heads.label_proposals(boxes, make_target(gt, [1]))  # crowd_boxes (0, 4): none
    np.testing.assert_array_equal(labels, [1, 0, 0, 0, 1])


# ---- mask targets and losses -----------------------------------------------------------------------

@pytest.mark.parametrize("aligned", [False, True])
def test_mask_targets_equal_a_plain_crop_and_resize(aligned):
    """A mask made of 2x3-pixel blocks, and boxes on the block grid: the 28x28 target is then the
    crop's block pattern (each target pixel takes the value of its own block)."""
    rng = np.random.default_rng(3)
    blocks = [(rng.random((40, 30)) < 0.5).astype(np.uint8) for _ in range(2)]
    masks = np.stack([np.kron(b, np.ones((3, 2), np.uint8)) for b in blocks])  # (2, 120, 60)
    boxes = np.array([[2, 3, 58, 87], [0, 6, 56, 90], [4, 30, 60, 114]], np.float32)  # 56 wide, 84 tall
    matched = np.array([1, 0, 1])
    targets = project_masks_on_boxes(masks, boxes, matched, 28, aligned=aligned)
    assert targets.shape == (3, 28, 28) and targets.dtype == bool
    for box, gt, target in zip(boxes.astype(int), matched, targets):
        x1, y1, x2, y2 = box
        crop = masks[gt, y1:y2, x1:x2]
        expected = crop.reshape(28, 3, 28, 2).mean(axis=(1, 3)) >= 0.5
        np.testing.assert_array_equal(target, expected)


def test_mask_targets_of_no_boxes():
    out = project_masks_on_boxes(np.ones((1, 8, 8), np.uint8), np.zeros((0, 4), np.float32),
                                 np.zeros(0, np.int64), 28)
    assert out.shape == (0, 28, 28)


def _bce(x, t):
    return np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def test_sigmoid_mask_loss_uses_only_the_gt_class_channel(rng):
    logits = rng.standard_normal((3, 4, 28, 28))
    targets = rng.random((3, 28, 28)) < 0.5
    labels = np.array([2, 1, 2])
    x = Tensor(logits.copy(), requires_grad=True)
    loss = mask_loss(x, targets, labels)
    chosen = logits[np.arange(3), labels]
    np.testing.assert_allclose(float(loss.data), _bce(chosen, targets), rtol=1e-12)

    loss.backward()
    other = np.ones((3, 4), bool)
    other[np.arange(3), labels] = False
    assert (x.grad[other] == 0).all() and (x.grad[~other] != 0).any()

    changed = logits.copy()
    changed[other] += rng.standard_normal(changed[other].shape) * 5  # any other channel
    assert float(mask_loss(Tensor(changed), targets, labels).data) == float(loss.data)
    changed[0, labels[0]] += 1.0  # the gt channel does change it
    assert float(mask_loss(Tensor(changed), targets, labels).data) != float(loss.data)

    agnostic = mask_loss(Tensor(logits[:, :1]), targets, labels, class_agnostic=True)
    np.testing.assert_allclose(float(agnostic.data), _bce(logits[:, 0], targets), rtol=1e-12)


def _softmax_ce(logits, target):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(np.take_along_axis(log_p, target[:, None], axis=1))


@pytest.mark.parametrize("agnostic", [False, True])
def test_softmax_mask_loss_by_hand(rng, agnostic):
    channels = 2 if agnostic else 4
    logits = rng.standard_normal((3, channels, 28, 28))
    targets = rng.random((3, 28, 28)) < 0.5
    labels = np.array([3, 1, 2])
    loss = mask_loss(Tensor(logits), targets, labels, "softmax", agnostic)
    fg = np.ones(3, int) if agnostic else labels
    pixel_class = np.where(targets, fg[:, None, None], 0).reshape(-1)  # gt class in the mask, else 0
    per_pixel = logits.transpose(0, 2, 3, 1).reshape(-1, channels)
    np.testing.assert_allclose(float(loss.data), _softmax_ce(per_pixel, pixel_class), rtol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_mask_loss_gradcheck(rng, loss_type):
    x = Tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    targets = rng.random((2, 4, 4)) < 0.5
    labels = np.array([2, 1])
    assert gradcheck(lambda t: mask_loss(t, targets, labels, loss_type), [x])


def test_fastrcnn_loss_by_hand_and_gradcheck(rng):
    labels = np.array([0, 2, 1, 0, 2])
    logits = rng.standard_normal((5, 3))
    regression = rng.standard_normal((5, 12)) * 0.3
    targets = rng.standard_normal((5, 4)) * 0.3
    loss_cls, loss_box = fastrcnn_loss(Tensor(logits), Tensor(regression), labels, targets)
    np.testing.assert_allclose(float(loss_cls.data), _softmax_ce(logits, labels), rtol=1e-12)
    pos = labels > 0
    d = regression.reshape(5, 3, 4)[np.arange(5), labels][pos] - targets[pos]
    beta = 1 / 9
    smooth = np.where(np.abs(d) < beta, 0.5 * d * d / beta, np.abs(d) - 0.5 * beta)
    # Divided by the 5 sampled RoIs, not by the 3 positives.
    np.testing.assert_allclose(float(loss_box.data), smooth.sum() / 5, rtol=1e-12)

    a = Tensor(logits, requires_grad=True)
    b = Tensor(regression, requires_grad=True)
    assert gradcheck(lambda u, v: sum(fastrcnn_loss(u, v, labels, targets), Tensor(0.0)), [a, b])


def test_box_losses_use_the_configs_beta(rng):
    """RoIHeads.box_losses passes ``cfg.box_smooth_l1_beta`` to fastrcnn_loss: Detectron2's 0 (plain
    L1) gives the loss of fastrcnn_loss with beta 0 on the same outputs, not the 1/9 one."""
    heads = make_heads(box_smooth_l1_beta=0.0)
    proposals, targets = training_batch(rng)
    feats = features(rng)
    samples = heads.select_training_samples(proposals, targets)
    got = heads.box_losses(feats, samples)["loss_box"].item()
    pooled = heads.box_roi_pool(feats, [s["boxes"] for s in samples])
    logits, regression = heads.box_predictor(heads.box_head(pooled))
    labels = np.concatenate([s["labels"] for s in samples])
    deltas = np.concatenate([s["regression_targets"] for s in samples])
    l1 = fastrcnn_loss(logits, regression, labels, deltas, beta=0.0)[1].item()
    default = fastrcnn_loss(logits, regression, labels, deltas)[1].item()
    assert got == l1 and abs(l1 - default) > 1e-4 * l1


# ---- training forward and backward: the default and every ablation ----------------------------------

ABLATIONS = {
    "default": {},
    "roipool": dict(pooler_type="roipool"),
    "roiwarp": dict(pooler_type="roiwarp"),
    "aligned": dict(aligned=True, sampling_ratio=0),
    "softmax": dict(mask_loss="softmax"),
    "class_agnostic": dict(class_agnostic_masks=True),
    "agnostic_softmax": dict(class_agnostic_masks=True, mask_loss="softmax"),
    "mlp": dict(mask_head_type="mlp"),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_training_losses_and_gradients(rng, name):
    heads = make_heads(**ABLATIONS[name])
    proposals, targets = training_batch(rng)
    detections, losses = heads(features(rng), proposals, [(SIZE, SIZE)] * 2, targets)
    assert detections == [] and set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    for k, v in losses.items():
        assert v.shape == () and np.isfinite(v.data) and v.data > 0, k
    (losses["loss_cls"] + losses["loss_box"] + losses["loss_mask"]).backward()
    for n, p in heads.named_parameters():
        assert p.grad is not None and np.isfinite(p.grad).all() and np.abs(p.grad).sum() > 0, n

    heads.eval()
    dets, no_losses = heads(features(rng), proposals, [(SIZE, SIZE)] * 2)
    assert no_losses == {}
    for d in dets:
        n = len(d["boxes"])
        assert d["mask_probs"].shape == (n, 28, 28) and d["scores"].shape == (n,)
        assert d["labels"].dtype == np.int64
        assert ((d["mask_probs"] >= 0) & (d["mask_probs"] <= 1)).all()


def test_training_in_float64(rng):
    heads = make_heads().astype(np.float64)
    proposals, targets = training_batch(rng)
    proposals = [p.astype(np.float64) for p in proposals]  # as a float64 RPN gives them
    _, losses = heads(features(rng, dtype=np.float64), proposals, [(SIZE, SIZE)] * 2, targets)
    assert all(v.dtype == np.float64 for v in losses.values())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_training_without_any_object_or_proposal(rng, name):
    heads = make_heads(**ABLATIONS[name])
    empty = make_target(np.zeros((0, 4)), [])
    _, losses = heads(features(rng, n=1), [np.zeros((0, 4), np.float32)], [(SIZE, SIZE)], [empty])
    assert all(float(v.data) == 0.0 for v in losses.values())


def test_mask_head_has_torchvision_names_and_shapes():
    heads = make_heads()
    shapes = {k: v.shape for k, v in heads.state_dict().items()}
    assert shapes["box_head.fc6.weight"] == (32, 16 * 7 * 7)
    assert shapes["box_predictor.cls_score.weight"] == (4, 32)
    assert shapes["box_predictor.bbox_pred.weight"] == (16, 32)
    for i in range(1, 5):
        assert shapes[f"mask_head.mask_fcn{i}.weight"] == (16, 16, 3, 3)
    assert shapes["mask_predictor.conv5_mask.weight"] == (16, 16, 2, 2)  # ConvTranspose2d: (in, out, kh, kw)
    assert shapes["mask_predictor.mask_fcn_logits.weight"] == (4, 16, 1, 1)
    assert (heads.box_predictor.bbox_pred.bias.data == 0).all()


def test_training_needs_targets(rng):
    with pytest.raises(ValueError, match="needs targets"):
        make_heads()(features(rng, n=1), [PROPOSALS], [(SIZE, SIZE)])


def test_losses_are_the_branch_helpers_on_one_sample(rng):
    """``losses`` is box_losses then mask_losses on one shared sample of RoIs (no second draw)."""
    heads = make_heads()
    proposals, targets = training_batch(rng)
    feats = features(rng)
    heads.sampler.rng = np.random.default_rng(7)
    _, losses = heads(feats, proposals, [(SIZE, SIZE)] * 2, targets)
    heads.sampler.rng = np.random.default_rng(7)
    samples = heads.select_training_samples(proposals, targets)
    by_branch = {**heads.box_losses(feats, samples), "loss_mask": heads.mask_losses(feats, samples, targets)}
    assert list(losses) == ["loss_cls", "loss_box", "loss_mask"]
    for name, value in by_branch.items():
        assert float(losses[name].data) == float(value.data), name


def test_strides_come_from_the_backbone(rng):
    """The poolers use the backbone's strides (given, or BackboneWithFPN's P2..P5 by default):
    with strides (8, 16, 32, 64) a small box is pooled from the first map at scale 1/8."""
    assert make_heads().strides == tuple(BackboneWithFPN.strides[:4]) == (4, 8, 16, 32)
    nn.init.manual_seed(0)
    heads = RoIHeads(small_cfg(), strides=(8, 16, 32, 64))
    assert heads.box_roi_pool.strides == [8, 16, 32, 64]
    feats = [Tensor(rng.standard_normal((1, 16, SIZE // s, SIZE // s)).astype(np.float32))
             for s in (8, 16, 32, 64)]
    box = np.array([[3.0, 5.0, 21.0, 17.0]], np.float32)  # FPN Eq. 1 clamps it to the finest level
    cfg = heads.cfg
    expected = F.roi_align(feats[0], np.concatenate([[[0.0]], box], axis=1).astype(np.float32),
                           cfg.box_pool_size, spatial_scale=1 / 8, sampling_ratio=cfg.sampling_ratio,
                           aligned=cfg.aligned).data
    np.testing.assert_array_equal(heads.box_roi_pool(feats, [box]).data, expected)
    with pytest.raises(ValueError, match=r"expected 4 maps \(strides \(8, 16, 32, 64\)\), got 3"):
        heads.eval()(feats[:3], [box], [(SIZE, SIZE)])


# ---- inference -----------------------------------------------------------------------------------------

def test_inference_thresholds_nms_sorts_and_clips(rng):
    """With zero weights in the predictor every RoI gets the scores softmax(bias) and its own
    proposal box, so the detections can be worked out by hand."""
    heads = make_heads(box_detections_per_img=10).eval()
    bias = np.array([0.0, 2.0, 1.0, -5.0], np.float32)
    heads.box_predictor.cls_score.weight.data[...] = 0
    heads.box_predictor.cls_score.bias.data[...] = bias
    heads.box_predictor.bbox_pred.weight.data[...] = 0
    heads.box_predictor.bbox_pred.bias.data[...] = 0
    p = np.exp(bias) / np.exp(bias).sum()  # class 3: 0.0006 < 0.05, never detected
    proposals = np.array([[0, 0, 20, 20],
                          [1, 1, 21, 21],        # IoU 0.82 with the first, equal score: suppressed
                          [30, 30, 50, 50],
                          [50, 40, 80, 70],      # leaves the 64 x 64 image: clipped
                          [10, 40, 10.005, 50]], np.float32)  # thinner than 0.01: removed
    feats = features(rng, n=1)
    (det,), _ = heads(feats, [proposals], [(SIZE, SIZE)])
    kept = np.array([[0, 0, 20, 20], [30, 30, 50, 50], [50, 40, 64, 64]], np.float32)
    np.testing.assert_array_equal(det["labels"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(det["scores"], [p[1]] * 3 + [p[2]] * 3, rtol=1e-5)
    np.testing.assert_allclose(det["boxes"], np.concatenate([kept, kept]), atol=1e-4)

    # mask_probs: the sigmoid of each detection's own class channel of the mask logits.
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(feats, [det["boxes"]]))).data
    expected = 1 / (1 + np.exp(-logits[np.arange(6), det["labels"]]))
    np.testing.assert_allclose(det["mask_probs"], expected, rtol=1e-5, atol=1e-7)

    heads.cfg = dataclasses.replace(heads.cfg, box_detections_per_img=4)  # the top 4 by score
    (top,), _ = heads(feats, [proposals], [(SIZE, SIZE)])
    np.testing.assert_array_equal(top["labels"], [1, 1, 1, 2])
    assert top["mask_probs"].shape == (4, 28, 28)

    heads.cfg = dataclasses.replace(heads.cfg, box_score_thresh=0.5)  # only class 1 passes
    (high,), _ = heads(feats, [proposals], [(SIZE, SIZE)])
    np.testing.assert_array_equal(high["labels"], [1, 1, 1])


def test_inference_sorted_by_score(rng):
    heads = make_heads().eval()
    proposals, _ = training_batch(rng)
    dets, _ = heads(features(rng), proposals, [(SIZE, SIZE)] * 2)
    for d in dets:
        assert (np.diff(d["scores"]) <= 0).all() and (d["scores"] > 0.05).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all()


def test_inference_with_no_proposals(rng):
    heads = make_heads().eval()
    empty = np.zeros((0, 4), np.float32)
    dets, _ = heads(features(rng), [empty, PROPOSALS], [(SIZE, SIZE)] * 2)
    assert dets[0]["boxes"].shape == (0, 4) and dets[0]["mask_probs"].shape == (0, 28, 28)
    assert dets[0]["labels"].shape == (0,) and dets[0]["scores"].shape == (0,)
    dets, _ = heads(features(rng), [empty, empty], [(SIZE, SIZE)] * 2)
    for d in dets:
        assert d["boxes"].shape == (0, 4) and d["mask_probs"].shape == (0, 28, 28)


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    proposals, targets = training_batch(rng)
    feats = features(rng)
    # The heads move nothing: proposals (from the RPN) and targets (from the transform) arrive
    # on the features' device.
    gpu_proposals = [to_device(p, "gpu") for p in proposals]
    gpu_targets = [{k: to_device(v, "gpu") for k, v in t.items()} for t in targets]
    cpu, gpu = make_heads(), make_heads().to("gpu")
    _, lc = cpu(feats, proposals, [(SIZE, SIZE)] * 2, targets)
    _, lg = gpu([f.to("gpu") for f in feats], gpu_proposals, [(SIZE, SIZE)] * 2, gpu_targets)
    for k in lc:
        np.testing.assert_allclose(to_device(lg[k].data, "cpu"), lc[k].data, rtol=1e-4, atol=1e-6)
    cpu.eval()
    gpu.eval()
    dc, _ = cpu(feats, proposals, [(SIZE, SIZE)] * 2)
    dg, _ = gpu([f.to("gpu") for f in feats], gpu_proposals, [(SIZE, SIZE)] * 2)
    for a, b in zip(dc, dg):
        for k in a:
            np.testing.assert_allclose(to_device(b[k], "cpu"), a[k], rtol=1e-4, atol=1e-5)
