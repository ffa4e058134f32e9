"""Keypoint R-CNN (paper Sec. 5): targets, loss, head gradients, decoding, flips, OKS, model size."""

import dataclasses
import json
import os

import numpy as np
import pytest

from minimask import Tensor, gradcheck, nn
from minimask.data import CocoDataset
from minimask.data.figures import KEYPOINT_NAMES, make_split
from minimask.data.transforms import hflip
from minimask.models import MaskRCNN, preset
from minimask.models.keypoint_head import (
    KeypointHead,
    KeypointPredictor,
    bicubic_matrix,
    enlarge_boxes,
    heatmaps_to_keypoints,
    keypoint_loss,
    keypoints_to_heatmap,
)

M = 56


# ---------------------------------------------------------------- targets


def test_heatmap_targets_on_hand_made_rois():
    # RoI 0 is 56 px wide and high: one cell per pixel, cell = floor(x - x1).
    # RoI 1 is 112 x 28: two pixels per column, half a pixel per row.
    rois = np.array([[10, 20, 66, 76], [0, 0, 112, 28]], np.float64)
    kp = np.zeros((2, 7, 3))
    kp[0] = [[10, 20, 2],       # top-left corner: cell (0, 0)
             [65.9, 20.5, 2],   # just inside the right edge: column 55, row 0
             [66, 76, 1],       # exactly on the right and bottom edges (hidden, v=1): last cell
             [9.99, 30, 2],     # left of the RoI: outside
             [70, 30, 2],       # right of the RoI: outside
             [30, 40, 0],       # inside but not labelled (v=0): not trained
             [30.5, 76.5, 2]]   # below the bottom edge: outside
    kp[1, :2] = [[50, 14, 2], [111.9, 27.9, 2]]
    targets, valid = keypoints_to_heatmap(kp, rois, M)
    assert valid[0].tolist() == [True, True, True, False, False, False, False]
    assert targets[0, :3].tolist() == [0, 0 * M + 55, 55 * M + 55]
    # 50 * 56 / 112 = 25; 14 * 56 / 28 = 28
    assert targets[1, 0] == 28 * M + 25
    assert targets[1, 1] == 55 * M + 55
    assert valid[1].tolist() == [True, True] + [False] * 5


def test_heatmap_targets_match_a_loop_reference():
    rng = np.random.default_rng(0)
    rois = np.concatenate([rng.uniform(0, 50, (20, 2)), rng.uniform(60, 120, (20, 2))], 1)
    kp = np.concatenate([rng.uniform(-10, 130, (20, 5, 2)), rng.integers(0, 3, (20, 5, 1))], 2)
    targets, valid = keypoints_to_heatmap(kp, rois, M)
    for i, (x1, y1, x2, y2) in enumerate(rois):
        for j, (x, y, v) in enumerate(kp[i]):
            col = M - 1 if x == x2 else int(np.floor((x - x1) / (x2 - x1) * M))
            row = M - 1 if y == y2 else int(np.floor((y - y1) / (y2 - y1) * M))
            ok = v > 0 and 0 <= col < M and 0 <= row < M
            assert valid[i, j] == ok
            if ok:
                assert targets[i, j] == row * M + col


# ---------------------------------------------------------------- loss


def test_loss_on_a_perfect_one_hot_map_is_near_zero():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, M * M, (3, 4))
    valid = np.ones((3, 4), bool)
    logits = np.zeros((3, 4, M * M))
    np.put_along_axis(logits, targets[..., None], 40.0, axis=2)
    loss = keypoint_loss(Tensor(logits.reshape(3, 4, M, M)), targets, valid)
    assert float(loss.item()) < 1e-12
    # A flat map knows nothing: log(3136) per keypoint.
    flat = keypoint_loss(Tensor(np.zeros((3, 4, M, M))), targets, valid)
    assert abs(float(flat.item()) - np.log(M * M)) < 1e-9


def test_loss_averages_over_valid_keypoints_only():
    torch = pytest.importorskip("torch", reason="torch is the reference for cross_entropy")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 3, M, M))
    targets = rng.integers(0, M * M, (5, 3))
    valid = rng.random((5, 3)) < 0.6
    ours = float(keypoint_loss(Tensor(logits), targets, valid).item())
    rows = torch.from_numpy(logits.reshape(15, M * M))[torch.from_numpy(valid.reshape(-1))]
    ref = torch.nn.functional.cross_entropy(rows, torch.from_numpy(targets.reshape(-1)[valid.reshape(-1)]))
    assert abs(ours - float(ref)) < 1e-10
    # No valid keypoint at all: zero, not NaN (a batch whose RoIs see no keypoint).
    none = keypoint_loss(Tensor(logits), targets, np.zeros_like(valid))
    assert float(none.item()) == 0.0


def test_loss_gradient():
    rng = np.random.default_rng(3)
    m = 6  # a small grid: the rule does not depend on m
    targets = rng.integers(0, m * m, (2, 3))
    valid = np.array([[True, False, True], [True, True, False]])
    x = Tensor(rng.normal(size=(2, 3, m, m)), requires_grad=True)
    assert gradcheck(lambda z: keypoint_loss(z, targets, valid), [x])


# ---------------------------------------------------------------- head


def test_head_shapes_and_names():
    head, pred = KeypointHead(8, 16, 8), KeypointPredictor(16, 11)
    x = Tensor(np.random.default_rng(0).normal(size=(2, 8, 14, 14)).astype(np.float32))
    out = pred(head(x))
    assert out.shape == (2, 11, 56, 56)
    names = [n for n, _ in head.named_parameters()]
    assert names[:2] == ["0.weight", "0.bias"] and names[-1] == "14.bias"  # torchvision's Sequential
    assert [n for n, _ in pred.named_parameters()] == ["kps_score_lowres.weight", "kps_score_lowres.bias"]


def test_head_gradient():
    """The whole branch, convs + deconv + bilinear 2x, checked in float64 along random directions."""
    nn.init.manual_seed(0)
    head, pred = KeypointHead(3, 4, 2), KeypointPredictor(4, 2)
    for p in list(head.parameters()) + list(pred.parameters()):
        p.data = p.data.astype(np.float64)
        p.data += 0.01  # biases off zero: no ReLU input sits exactly on the kink
    rng = np.random.default_rng(4)
    x = Tensor(rng.normal(size=(2, 3, 5, 5)), requires_grad=True)
    targets = rng.integers(0, 20 * 20, (2, 2))
    valid = np.ones((2, 2), bool)

    def fn(inp, *weights):
        return keypoint_loss(pred(head(inp)), targets, valid)

    params = list(head.parameters()) + list(pred.parameters())
    assert gradcheck(fn, [x] + params, directions=4)


# ---------------------------------------------------------------- decoding


def test_bicubic_matrix_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is the reference for bicubic interpolation")
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(3, 56, 56))
    for h, w in [(73, 41), (56, 56), (20, 131), (1, 1)]:
        ours = bicubic_matrix(56, h) @ maps @ bicubic_matrix(56, w).T
        ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(h, w), mode="bicubic",
                                              align_corners=False)[:, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_decoding_inverts_the_targets():
    """A one-hot map at each keypoint's target cell decodes back to within half a cell."""
    rng = np.random.default_rng(6)
    boxes = np.array([[10, 20, 66, 76], [5, 7, 117, 35], [30.5, 40.25, 90, 150]], np.float32)
    kp = np.zeros((3, 4, 3), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        kp[i, :, 0] = rng.uniform(x1, x2, 4)
        kp[i, :, 1] = rng.uniform(y1, y2, 4)
        kp[i, :, 2] = 2
    targets, valid = keypoints_to_heatmap(kp, boxes, M)
    assert valid.all()
    maps = np.full((3, 4, M * M), -5.0, np.float32)
    np.put_along_axis(maps, targets[..., None], 5.0, axis=2)
    points, scores = heatmaps_to_keypoints(maps.reshape(3, 4, M, M), boxes)
    cell = np.stack([(boxes[:, 2] - boxes[:, 0]) / M, (boxes[:, 3] - boxes[:, 1]) / M], 1)[:, None]
    err = np.abs(points[..., :2] - kp[..., :2])
    assert (err <= 0.5 * cell + 1.01).all(), err.max()  # half a cell, plus the box pixel grid
    assert (points[..., 2] == 1).all()
    # Upsampled boxes keep the peak's logit; the 28 px high box is a downsampling, where the
    # bicubic taps may fall beside a one-cell peak (the position is still right, above).
    assert (scores[[0, 2]] > 2).all()


def test_decoding_on_a_box_of_heatmap_size_is_the_cell_centre():
    boxes = np.array([[100, 50, 156, 106]], np.float32)  # 56 x 56: one pixel per cell
    maps = np.zeros((1, 2, M, M), np.float32)
    maps[0, 0, 10, 20] = 1.0
    maps[0, 1, 55, 0] = 2.0
    points, scores = heatmaps_to_keypoints(maps, boxes)
    np.testing.assert_allclose(points[0, :, :2], [[120.5, 60.5], [100.5, 105.5]])
    np.testing.assert_allclose(scores[0], [1.0, 2.0], atol=1e-6)


# ---------------------------------------------------------------- enlarged keypoint RoIs


def test_enlarge_boxes_by_hand():
    boxes = np.array([[10, 20, 30, 60], [0, 0, 1, 1]], np.float32)
    # centre (20, 40), half sizes (10, 20) * 1.1 = (11, 22); centre (0.5, 0.5), half 0.55
    np.testing.assert_allclose(enlarge_boxes(boxes, 1.1), [[9, 18, 31, 62], [-0.05, -0.05, 1.05, 1.05]],
                               rtol=1e-6)
    assert enlarge_boxes(boxes, 1.1).dtype == np.float32
    assert enlarge_boxes(boxes, 1.0) is boxes


def _tiny_keypoint_heads(scale):
    cfg = dataclasses.replace(preset("figures"), width=8, fpn_out_channels=16, box_head_dim=32,
                              keypoint_head_dim=8, keypoint_head_convs=1, keypoint_box_scale=scale)
    return MaskRCNN(cfg).roi_heads


def _features(rng):
    return [Tensor(rng.normal(size=(1, 16, 128 // s, 128 // s)).astype(np.float32)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("scale", [1.0, 1.25])
def test_keypoint_head_trains_and_predicts_on_enlarged_boxes(scale, monkeypatch):
    """keypoint_box_scale: the head pools the enlarged box at training and test time alike, and
    a hand one pixel beyond the RoI is a training target only when the RoI is enlarged."""
    import minimask.models.roi_heads as roi_heads_module

    heads = _tiny_keypoint_heads(scale)
    pooled, counted = [], []
    pool = heads.keypoint_roi_pool
    monkeypatch.setattr(heads, "keypoint_roi_pool", lambda f, boxes: pooled.append(boxes) or pool(f, boxes))
    loss = roi_heads_module.keypoint_loss
    monkeypatch.setattr(roi_heads_module, "keypoint_loss",
                        lambda logits, t, valid: counted.append(valid) or loss(logits, t, valid))
    box = np.array([[40, 30, 80, 110]], np.float32)
    kp = np.zeros((1, len(KEYPOINT_NAMES), 3), np.float32)
    kp[0, :, :2], kp[0, :, 2] = [60, 70], 2          # every joint in the middle ...
    kp[0, 4, :2] = [81, 70]                          # ... but the left hand, 1 px right of the box
    samples = [{"labels": np.array([1]), "boxes": box, "matched_idxs": np.array([0])}]
    heads.keypoint_losses(_features(np.random.default_rng(0)), samples, [{"keypoints": kp}])
    np.testing.assert_allclose(pooled[-1][0], enlarge_boxes(box, scale))
    assert counted[-1][0, 4] == (scale > 1.0)        # the hand is inside the 1.25x RoI
    assert counted[-1][0].sum() == len(KEYPOINT_NAMES) - (scale == 1.0)

    results = [{"boxes": box, "labels": np.array([1]), "scores": np.array([0.9], np.float32)}]
    heads.detect_keypoints(_features(np.random.default_rng(1)), results)
    np.testing.assert_allclose(pooled[-1][0], enlarge_boxes(box, scale))
    np.testing.assert_array_equal(results[0]["boxes"], box)  # the detection itself is not changed
    x1, y1, x2, y2 = enlarge_boxes(box, scale)[0]
    pts = results[0]["keypoints"][0]
    assert ((pts[:, 0] >= x1) & (pts[:, 0] <= x2) & (pts[:, 1] >= y1) & (pts[:, 1] <= y2)).all()


def test_keypoint_box_scale_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="keypoint_box_scale"):
        dataclasses.replace(preset("figures"), keypoint_box_scale=0.8)


# ---------------------------------------------------------------- data: flip


def test_hflip_swaps_left_and_right_joints():
    from minimask.categories import keypoint_flip_map

    flip = keypoint_flip_map(KEYPOINT_NAMES)
    names = list(KEYPOINT_NAMES)
    w = 100
    kp = np.zeros((1, len(names), 3), np.float32)
    kp[0, :, 0] = np.arange(len(names)) * 5 + 1
    kp[0, :, 1] = np.arange(len(names))
    kp[0, :, 2] = 2
    image = np.zeros((40, w, 3), np.uint8)
    target = {"boxes": np.array([[0, 0, 60, 20]], np.float32), "keypoints": kp}
    _, out = hflip(image, target, flip)
    lh, rh = names.index("left_hand"), names.index("right_hand")
    # the new left hand is the old right hand, mirrored; the head (no twin) stays the head
    assert out["keypoints"][0, lh, 0] == w - kp[0, rh, 0] and out["keypoints"][0, lh, 1] == kp[0, rh, 1]
    assert out["keypoints"][0, rh, 0] == w - kp[0, lh, 0]
    head = names.index("head")
    assert out["keypoints"][0, head, 0] == w - kp[0, head, 0]
    with pytest.raises(ValueError, match="keypoint_flip_map"):
        hflip(image, target)


# ---------------------------------------------------------------- evaluation: OKS


@pytest.fixture(scope="module")
def figures_val(tmp_path_factory):
    from minimask.data import CocoDataset

    out = tmp_path_factory.mktemp("figures")
    path = make_split(str(out), "val", 12, seed=3)
    return CocoDataset(path, train=False)


def _ground_truth_as_predictions(ds):
    from minimask.engine.evaluator import to_coco_results

    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        pred = {"boxes": t["boxes"], "labels": t["labels"], "scores": np.ones(len(t["boxes"])),
                "keypoints": t["keypoints"]}
        results += to_coco_results(pred, t["image_id"], ds.label_to_cat_id, keypoint_labels={1})
    return results


def test_oks_is_one_on_perfect_predictions(figures_val):
    from minimask.engine.evaluator import coco_eval

    ds = figures_val
    assert ds.keypoint_sigmas is not None and len(ds.keypoint_sigmas) == len(KEYPOINT_NAMES)
    results = _ground_truth_as_predictions(ds)
    assert any("keypoints" in r for r in results) and not all("keypoints" in r for r in results)
    stats = coco_eval(ds.coco, results, "keypoints", log=lambda *a: None, sigmas=ds.keypoint_sigmas,
                      cat_ids=ds.keypoint_cat_ids)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


def test_oks_falls_when_keypoints_move(figures_val):
    from minimask.engine.evaluator import coco_eval

    ds = figures_val
    results = _ground_truth_as_predictions(ds)
    for r in results:
        if "keypoints" in r:
            kp = np.asarray(r["keypoints"]).reshape(-1, 3)
            kp[:, 0] += 6.0  # six pixels off: far beyond the falloff on figures this size
            r["keypoints"] = kp.reshape(-1).tolist()
    stats = coco_eval(ds.coco, results, "keypoints", log=lambda *a: None, sigmas=ds.keypoint_sigmas,
                      cat_ids=ds.keypoint_cat_ids)
    assert stats["AP"] < 0.5


def test_coco_loading_of_keypoints(figures_val):
    ds = figures_val
    assert ds.keypoint_names == KEYPOINT_NAMES and ds.keypoint_flip_map is not None
    assert len(ds.keypoint_skeleton) == 10
    _, t = ds[0]
    assert t["keypoints"].shape == (len(t["boxes"]), len(KEYPOINT_NAMES), 3)
    figures = t["labels"] == 1
    assert (t["keypoints"][~figures] == 0).all()  # distractors: v = 0, no keypoint targets
    assert (t["keypoints"][figures, :, 2] > 0).any()


# ---------------------------------------------------------------- the models


def test_r50_fpn_keypoints_parameter_count_is_torchvisions():
    """torchvision's keypointrcnn_resnet50_fpn(num_classes=2, num_keypoints=17): 59,137,258 weights
    outside the batch norms (counted as test_mask_rcnn counts the mask model)."""
    model = MaskRCNN(preset("r50_fpn_keypoints"))
    norm_types = (nn.BatchNorm2d, nn.FrozenBatchNorm2d)
    other = sum(int(np.prod(p.shape)) for _, m in model.named_modules() if not isinstance(m, norm_types)
                for p in m._parameters.values() if p is not None)
    assert other == 59_137_258
    sd = model.state_dict()
    assert sd["roi_heads.keypoint_head.0.weight"].shape == (512, 256, 3, 3)
    assert sd["roi_heads.keypoint_head.14.weight"].shape == (512, 512, 3, 3)
    assert sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape == (512, 17, 4, 4)
    assert not any(k.startswith("roi_heads.mask_") for k in sd)


def test_keypoint_model_trains_and_predicts():
    """A tiny figures model: the losses include loss_keypoint (not loss_mask), targets need no
    masks, a few steps on one image lower the keypoint loss, predictions carry keypoints."""
    from minimask.data.figures import make_image
    from minimask.optim import SGD

    cfg = dataclasses.replace(preset("figures"), width=8, fpn_out_channels=16, box_head_dim=32,
                              keypoint_head_dim=16, keypoint_head_convs=2, rpn_post_nms_top_n_train=50,
                              box_batch_size_per_image=16)
    image, objects = make_image(np.random.default_rng(0))
    boxes, labels, kps = [], [], []
    for o in objects:
        ys, xs = np.nonzero(o["visible"])
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(o["label"])
        k = np.zeros((len(KEYPOINT_NAMES), 3), np.float32)
        if "points" in o:
            k[:, :2], k[:, 2] = o["points"], 2
        kps.append(k)
    target = {"boxes": np.array(boxes, np.float32), "labels": np.array(labels), "keypoints": np.stack(kps)}
    model = MaskRCNN(cfg)
    model.train()
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(15):
        losses = model([image], [target])
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_keypoint"}
        total = sum(losses.values(), Tensor(np.zeros((), np.float32)))
        first = first if first is not None else float(losses["loss_keypoint"].item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(losses["loss_keypoint"].item()) < first
    out = model.predict([image])[0]
    n = len(out["boxes"])
    assert out["keypoints"].shape == (n, len(KEYPOINT_NAMES), 3)
    assert out["keypoints_scores"].shape == (n, len(KEYPOINT_NAMES))
    assert "masks" not in out
    # only detections of the keypoint class get keypoints
    assert (out["keypoints"][out["labels"] != 1] == 0).all()
    assert (out["keypoints"][out["labels"] == 1, :, 2] == 1).all()


def test_results_of_an_image_without_detections():
    from minimask.engine.evaluator import to_coco_results

    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros((0,), np.int64), "scores": np.zeros((0,)),
             "keypoints": np.zeros((0, len(KEYPOINT_NAMES), 3))}
    assert to_coco_results(empty, 1, {1: 1}, keypoint_labels={1}) == []


def test_keypoints_without_sigmas_are_a_clear_error(figures_val, tmp_path):
    """A keypoint category with other than COCO's 17 joints and no ``keypoint_sigmas`` cannot be
    scored by OKS: evaluate names the file and what is missing (not a shape error in pycocotools)."""
    from minimask.engine.evaluator import evaluate
    from minimask.nn import Module

    data = json.loads(open(figures_val.ann_file).read())
    for cat in data["categories"]:
        cat.pop("keypoint_sigmas", None)
    ann = tmp_path / "no_sigmas.json"
    ann.write_text(json.dumps(data))
    ds = CocoDataset(str(ann), os.path.dirname(figures_val.ann_file) + "/images", train=False)
    assert ds.keypoint_sigmas is None

    _, first = ds[0]

    class Fixed(Module):  # predicts image 0's objects, keypoints included, on every image
        def predict(self, images):
            return [{"boxes": first["boxes"], "labels": first["labels"],
                     "scores": np.ones(len(first["boxes"])), "keypoints": first["keypoints"]}
                    for _ in images]

    with pytest.raises(ValueError, match=r"no_sigmas\.json: the keypoint category has 11 keypoints but no "
                                         r"'keypoint_sigmas'"):
        evaluate(Fixed(), ds, log=lambda *a: None)


def test_cli_predict_draws_skeletons_from_a_keypoint_checkpoint(tmp_path, monkeypatch):
    """``minimask predict`` with a keypoint model's checkpoint: the skeleton comes from the saved
    config, every limb is drawn, and the detections JSON carries the keypoints."""
    from PIL import Image

    from minimask.cli import main
    from minimask.data.figures import CLASSES, SKELETON
    from minimask.engine.checkpoint import save_checkpoint
    from minimask.engine.predictor import save_drawing

    # The names as the trainer saves them (from the data set; the preset knows none).
    cfg = dataclasses.replace(preset("figures"), width=8, fpn_out_channels=16, box_head_dim=32,
                              keypoint_head_dim=8, keypoint_head_convs=1, class_names=CLASSES,
                              keypoint_names=KEYPOINT_NAMES, keypoint_skeleton=SKELETON)
    ckpt = str(tmp_path / "kp.npz")
    save_checkpoint(ckpt, MaskRCNN(cfg), config=cfg)
    joints = [(64, 20), (64, 30), (80, 40), (48, 40), (90, 55), (38, 55), (64, 65), (74, 85), (54, 85),
              (78, 105), (50, 105)]  # head, neck, elbows, hands, hip, knees, feet of a standing figure
    kp = np.concatenate([np.array(joints, np.float32), np.ones((11, 1), np.float32)], 1)[None]
    fake = {"boxes": np.array([[30, 10, 100, 110]], np.float32), "scores": np.array([0.9], np.float32),
            "labels": np.array([1]), "keypoints": kp, "keypoints_scores": np.ones((1, 11), np.float32)}
    # An untrained model finds nothing worth drawing: the test is about the drawing, so the
    # model's prediction is fixed.
    monkeypatch.setattr(MaskRCNN, "predict", lambda self, images: [fake for _ in images])
    image = np.full((128, 128, 3), 90, np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", ckpt, str(tmp_path / "img.png"), "--out", str(out)]) == 0

    (result,) = json.loads((out / "detections.json").read_text())
    (det,) = result["detections"]
    assert det["class"] == "figure"
    np.testing.assert_allclose(np.reshape(det["keypoints"], (11, 3)), kp[0])
    drawn = np.asarray(Image.open(out / "img.png").convert("RGB"), dtype=int)
    plain = save_drawing(image, fake, cfg.class_names, str(tmp_path / "plain.png"), skeleton=())
    plain = np.asarray(Image.open(plain).convert("RGB"), dtype=int)
    k = drawn.shape[0] // image.shape[0]  # a 128 px image is drawn enlarged, whole pixels
    assert drawn.shape[:2] == plain.shape[:2] == (128 * k, 128 * k) and k >= 4
    for a, b in SKELETON:  # the middle of every limb is coloured only in the skeleton drawing
        x, y = (np.array(joints[a - 1]) + np.array(joints[b - 1])) * k // 2
        assert np.abs(drawn[y - 2:y + 3, x - 2:x + 3] - plain[y - 2:y + 3, x - 2:x + 3]).max() > 40, (a, b)
