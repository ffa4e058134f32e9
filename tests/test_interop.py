"""torchvision's Mask R-CNN weights in minimask (issue 8), and layer-by-layer parity with torchvision.

The parity tests build torchvision's own ``MaskRCNN`` (ResNet-50-FPN, frozen batch norms) with
random weights, export its ``state_dict()`` to a ``.pth``, convert it with ``minimask
convert-weights`` and load it into the ``torchvision_r50_fpn`` preset; then both run the same
images and every stage is compared.  torchvision runs on this CPU-only torch through
``tests/tv_shim.py``; where torch or torchvision is missing those tests skip, saying which.

Random weights make a poor detector: its class scores are spread thin over 91 classes, so few
pass the usual 0.05 threshold.  Both models here use ``box_score_thresh=0.02`` and class-score
weights larger than a trained head's, so that each image has dozens of detections to compare.
Images are small (shorter side 320, not 800) and each keeps its best 20 detections (not 100),
in both models alike, to keep the ResNet-50 runs short on two cores.
"""

import dataclasses
import json
import sys

import numpy as np
import pytest

from minimask import functional as F
from minimask.cli import main
from minimask.interop import (
    check_weights,
    convert_state_dict,
    load_weights,
    load_weights_file,
    minimask_name,
    read_pth,
    torchvision_config,
)
from minimask.models import MaskRCNN, preset
from minimask.models.transform import resized_size
from minimask.ops import nms
from minimask.tensor import Tensor, no_grad

try:
    import torch
except ImportError:
    torch = None

from tv_shim import import_torchvision, nms_numpy, roi_align_numpy

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (the oracle for these tests)")

MIN_SIZE, MAX_SIZE = 320, 512
SCORE_THRESH = 0.02
DETECTIONS = 20  # per image (torchvision's 100 would make the mask head the slowest part here)


def torchvision_or_skip():
    if torch is None:
        pytest.skip("torch is not installed: no torchvision to compare with")
    try:
        return import_torchvision()
    except ImportError as e:
        pytest.skip(f"torchvision unavailable: {e}")


# ---------------------------------------------------------------- names and checks (NumPy only)


def test_current_torchvision_names_map_to_the_v1_names():
    assert minimask_name("rpn.head.conv.0.0.weight") == "rpn.head.conv.weight"
    assert minimask_name("roi_heads.mask_head.0.0.weight") == "roi_heads.mask_head.mask_fcn1.weight"
    assert minimask_name("roi_heads.mask_head.3.0.bias") == "roi_heads.mask_head.mask_fcn4.bias"
    assert minimask_name("backbone.fpn.inner_blocks.2.0.weight") == "backbone.fpn.inner_blocks.2.weight"
    assert minimask_name("backbone.fpn.layer_blocks.0.0.bias") == "backbone.fpn.layer_blocks.0.bias"
    # v1 names (and everything else) stay as they are
    for key in ("rpn.head.conv.weight", "roi_heads.mask_head.mask_fcn2.weight",
                "backbone.body.layer1.0.bn1.weight", "roi_heads.mask_predictor.conv5_mask.weight",
                "roi_heads.box_predictor.cls_score.bias"):
        assert minimask_name(key) == key


def test_conversion_drops_counters_and_refuses_v2_and_mixed_names():
    state = {"backbone.body.bn1.num_batches_tracked": np.array(3),
             "rpn.head.conv.0.0.weight": np.ones((2, 2)), "x.weight": np.ones(2, np.float64)}
    out, origin = convert_state_dict(state)
    assert list(out) == ["rpn.head.conv.weight", "x.weight"]
    assert origin["rpn.head.conv.weight"] == "rpn.head.conv.0.0.weight"
    assert out["x.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="v2"):
        convert_state_dict({"roi_heads.box_head.0.0.weight": np.ones(1)})
    with pytest.raises(ValueError, match="both"):
        convert_state_dict({"rpn.head.conv.weight": np.ones(1), "rpn.head.conv.0.0.weight": np.ones(1)})


def test_check_names_every_tensor_without_a_place_and_every_missing_one():
    model = MaskRCNN(preset("shapes"))
    state = model.state_dict()
    state.pop("roi_heads.mask_head.mask_fcn2.bias")
    state["roi_heads.mask_head.mask_fcn9.weight"] = np.ones(3, np.float32)
    state["rpn.head.cls_logits.bias"] = np.ones(7, np.float32)
    origin = {"roi_heads.mask_head.mask_fcn9.weight": "roi_heads.mask_head.8.0.weight"}
    with pytest.raises(ValueError) as e:
        check_weights(model, state, origin, source="w.npz")
    text = str(e.value)
    assert "w.npz" in text
    assert "roi_heads.mask_head.8.0.weight" in text  # named as the user's file names it
    assert "missing from the file: roi_heads.mask_head.mask_fcn2.bias" in text
    assert "rpn.head.cls_logits.bias: file (7,)" in text
    # A complete state dict passes and loads.
    load_weights(model, model.state_dict())


def test_torchvision_preset_has_torchvisions_settings():
    cfg = preset("torchvision_r50_fpn")
    assert (cfg.num_classes, cfg.sampling_ratio, cfg.aligned, cfg.norm) == (91, 2, False, "frozen_bn")
    assert (cfg.resize_rounding, cfg.paste_mode, cfg.frozen_bn_eps) == ("floor", "torchvision", 1e-5)
    assert cfg.mask_target_binarize is False and preset("r50_fpn").mask_target_binarize is True
    assert cfg.class_names == ()  # a preset knows no data set: the converter names the outputs
    names = torchvision_config().class_names
    assert len(names) == 90
    assert (names[0], names[11], names[89]) == ("person", "N/A", "toothbrush")
    assert (cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test) == (1000, 1000)
    assert (cfg.box_score_thresh, cfg.box_detections_per_img) == (0.05, 100)


def test_read_pth_without_torch_says_so(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch"):
        read_pth(path)
    assert main(["convert-weights", str(path), str(tmp_path / "out.npz")]) == 1
    assert "needs PyTorch, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_weights_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_weights_file(tmp_path / "nothere.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("no zip")
    with pytest.raises(ValueError, match="bad.npz"):
        load_weights_file(bad)
    pth = tmp_path / "m.pth"
    pth.write_text("x")
    with pytest.raises(ValueError, match="convert it first"):
        load_weights_file(pth)


# ---------------------------------------------------------------- .pth reading and resizing (torch)


@needs_torch
def test_read_pth_unwraps_training_checkpoints_and_rejects_junk(tmp_path):
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(2)}
    torch.save({"model": weights, "epoch": 3}, tmp_path / "ckpt.pth")
    state = read_pth(tmp_path / "ckpt.pth")
    assert list(state) == ["a.weight", "a.bias"]
    np.testing.assert_array_equal(state["a.weight"], np.arange(6.0).reshape(2, 3))
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="junk.pth"):
        read_pth(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_pth(tmp_path / "missing.pth")


@needs_torch
@pytest.mark.parametrize("hw", [(480, 640), (240, 320), (300, 200), (257, 263), (375, 500), (427, 640),
                                (7, 900)])
def test_floor_rounding_gives_torchvisions_resized_sizes(hw):
    """torchvision's own transform: the scale min(min/short, max/long) (a double in eager mode since
    torchvision 0.16; float32 before), then interpolate(scale_factor=scale,
    recompute_scale_factor=True), which floors: 480x640 at 800 is 800x1066."""
    torchvision_or_skip()
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    for min_size, max_size in ((800, 1333), (320, 512)):
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
        out, _ = transform.resize(torch.zeros(3, *hw), None)
        assert resized_size(*hw, min_size, max_size, rounding="floor") == tuple(out.shape[-2:])
    if hw == (480, 640):
        assert resized_size(*hw, 800, 1333, rounding="floor") == (800, 1066)


def test_floor_rounding_matches_torchvisions_transform_on_a_grid_of_sizes(monkeypatch):
    """3,500 (h, w) pairs from 17 to 2400 pixels, both orientations, at two size settings: every
    resized size is torchvision's.  Its transform computes the scale, torch's ``interpolate``
    floors side * scale into the output size before it calls the bilinear kernel; that kernel
    (which only fills pixels) is replaced by an empty tensor of the size it is given, so that
    7,000 resizes take no time.  The grid is one on which the scale's precision matters: the
    float32 rule of torchvision 0.9-0.15 differs from today's on a good part of it."""
    torchvision_or_skip()
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    def sizes_only(input, output_size, align_corners, scale_factors):
        return torch.empty(tuple(input.shape[:2]) + tuple(output_size))

    monkeypatch.setattr(torch._C._nn, "upsample_bilinear2d", sizes_only)
    heights = np.unique(np.geomspace(17, 1800, 50).astype(int))
    widths = np.unique(np.geomspace(23, 2400, 70).astype(int))
    pairs = [(int(h), int(w)) for h in heights for w in widths]
    assert len(pairs) >= 3400
    differ_f32 = 0
    for min_size, max_size in ((800, 1333), (320, 512)):
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
        for h, w in pairs:
            out, _ = transform.resize(torch.zeros(1, 1, 1).expand(1, h, w), None)  # no pixels held
            want = tuple(out.shape[-2:])
            assert resized_size(h, w, min_size, max_size, rounding="floor") == want, (h, w, min_size)
            f32 = np.float32
            scale = float(min(f32(min_size) / f32(min(h, w)), f32(max_size) / f32(max(h, w))))
            differ_f32 += (int(h * scale), int(w * scale)) != want
    print(f"float32 rule differs on {differ_f32 / (2 * len(pairs)):.0%} of {2 * len(pairs)}")
    assert differ_f32 > 0.1 * 2 * len(pairs)  # the grid can tell the two rules apart


# ---------------------------------------------------------------- the shim's kernels, checked


def test_shim_nms_agrees_with_minimask_nms():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (400, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (400, 2)).astype(np.float32)], axis=1)
    scores = rng.random(400).astype(np.float32)
    for thresh in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(nms_numpy(boxes, scores, thresh), nms(boxes, scores, thresh))
    assert nms_numpy(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, False), (2, True), (0, True)])
def test_shim_roi_align_agrees_with_minimask_roi_align(sampling_ratio, aligned):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 23, 31)).astype(np.float32)
    xy = rng.uniform(-10, 60, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 50, (40, 2))], axis=1)
    rois = np.concatenate([rng.integers(0, 2, (40, 1)), boxes], axis=1).astype(np.float32)
    ours = F.roi_align(Tensor(x), rois, (7, 6), spatial_scale=0.5, sampling_ratio=sampling_ratio,
                       aligned=aligned)
    shim = roi_align_numpy(x, rois, 0.5, 7, 6, sampling_ratio, aligned)
    np.testing.assert_allclose(shim, ours.data, rtol=1e-5, atol=1e-5)


def test_shim_roi_align_agrees_with_torchvisions_python_roi_align():
    torchvision_or_skip()
    from torchvision.ops.roi_align import _roi_align  # torchvision's own pure-PyTorch version

    # Boxes inside the map: for samples beyond its edge that version clamps where the C++ kernels
    # (and the shim, and minimask) count zero.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 4, 20, 25)).astype(np.float32)
    xy = rng.uniform(0, 20, (12, 2))
    rois = np.concatenate([np.zeros((12, 1)), xy, xy + rng.uniform(1, 20, (12, 2))], axis=1)
    rois = rois.astype(np.float32)
    for sampling_ratio, aligned in ((2, False), (0, True)):
        want = _roi_align(torch.from_numpy(x), torch.from_numpy(rois), 0.5, 7, 7, sampling_ratio, aligned)
        np.testing.assert_allclose(roi_align_numpy(x, rois, 0.5, 7, 7, sampling_ratio, aligned), want.numpy(),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- parity with torchvision's model


def _randomize(model, seed=1):
    """Random frozen-BN statistics and affines (so that they matter), and heads scaled so that a
    random model still gives spread-out objectness and class scores."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                # The last norm of each residual branch small, so that 16 blocks do not blow up.
                low, high = (0.2, 0.5) if name.endswith(("bn3", "downsample.1")) else (0.5, 1.5)
                m.weight.copy_(torch.empty(n).uniform_(low, high, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
        head, predictor = model.rpn.head, model.roi_heads.box_predictor
        head.cls_logits.weight.normal_(0, 0.05, generator=g)
        head.cls_logits.bias.normal_(0, 0.5, generator=g)
        head.bbox_pred.weight.normal_(0, 0.01, generator=g)
        predictor.cls_score.weight.normal_(0, 0.05, generator=g)
        predictor.cls_score.bias.normal_(0, 1.0, generator=g)
        predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
        # Mask logits: a random head's per-class offset (ReLU features, random 1x1 weights) fills
        # or empties whole boxes; weights of zero sum over the inputs leave the spatial pattern.
        logits = model.roi_heads.mask_predictor.mask_fcn_logits
        logits.weight.sub_(logits.weight.mean(dim=1, keepdim=True))


def _image(rng, h, w):
    """Smooth colour waves with a few flat discs and a little noise: some edges, some texture."""
    yy, xx = np.mgrid[:h, :w]
    im = np.stack([np.sin(xx / 9.0 + c) * 60 + np.cos(yy / 13.0 - c) * 50 + 128 for c in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return np.clip(im + rng.normal(0, 5, im.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """torchvision's model and ours with the same random weights (through .pth -> convert-weights
    -> .npz), three images of different sizes, and torchvision's outputs stage by stage."""
    torchvision_or_skip()
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    tv = TorchvisionMaskRCNN(backbone, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE,
                             box_score_thresh=SCORE_THRESH, box_detections_per_img=DETECTIONS)
    _randomize(tv)
    tv.eval()

    folder = tmp_path_factory.mktemp("interop")
    torch.save(tv.state_dict(), folder / "tv.pth")
    assert main(["convert-weights", str(folder / "tv.pth"), str(folder / "tv.npz")]) == 0
    cfg = dataclasses.replace(torchvision_config(), min_size=(MIN_SIZE,), max_size=MAX_SIZE,
                              box_score_thresh=SCORE_THRESH, box_detections_per_img=DETECTIONS)
    ours = load_weights_file(folder / "tv.npz", config=cfg)
    ours.eval()

    rng = np.random.default_rng(0)
    images = [_image(rng, 240, 320), _image(rng, 300, 200), _image(rng, 257, 263)]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    with torch.no_grad():
        batch, _ = tv.transform(tensors)
        features = tv.backbone(batch.tensors)
        objectness, deltas = tv.rpn.head(list(features.values()))
        proposals, _ = tv.rpn(batch, features)
        pooled = tv.roi_heads.box_roi_pool(features, proposals, batch.image_sizes)
        class_logits, box_regression = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        detections, _ = tv.roi_heads(features, proposals, batch.image_sizes)
        det_boxes = [d["boxes"] for d in detections]
        mask_pooled = tv.roi_heads.mask_roi_pool(features, det_boxes, batch.image_sizes)
        mask_logits = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(mask_pooled))
        final = tv.transform.postprocess(detections, batch.image_sizes, [im.shape[:2] for im in images])
    as_np = lambda t: t.detach().numpy()
    return dict(
        tv=tv, ours=ours, images=images, folder=folder,
        batch=as_np(batch.tensors), sizes=[tuple(s) for s in batch.image_sizes],
        features=[as_np(f) for f in features.values()],
        objectness=[as_np(o) for o in objectness], deltas=[as_np(d) for d in deltas],
        proposals=[as_np(p) for p in proposals],
        class_logits=as_np(class_logits), box_regression=as_np(box_regression),
        det_boxes=[as_np(b) for b in det_boxes], mask_logits=as_np(mask_logits),
        final=[{k: as_np(v) for k, v in d.items()} for d in final],
    )


def _features(pair):
    return [Tensor(f) for f in pair["features"]]


def _match(ours, theirs, atol):
    """Row i of ``ours`` is row ``order[i]`` of ``theirs``, all coordinates within ``atol``.

    Order alone is not compared: boxes of exactly equal score (e.g. anchors in the zero padding,
    whose features are all the same) come out of the sorts and NMS in either order.  Returns
    ``order`` and the fraction of rows at the same place.
    """
    assert ours.shape == theirs.shape
    if len(ours) == 0:
        return np.zeros(0, np.int64), 1.0
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)
    order = distance.argmin(axis=1)
    worst = distance[np.arange(len(ours)), order].max()
    assert worst <= atol, f"a box is {worst:.2g} px from the nearest of the other model's"
    assert len(set(order.tolist())) == len(ours), "two boxes matched the same box"
    return order, float((order == np.arange(len(ours))).mean())


def _relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))


def test_v1_checkpoint_names_are_torchvisions_and_convert_the_same(pair):
    """The published checkpoint's names (torchvision upgrades them itself on load) give the same
    converted weights as a current state_dict()."""
    tv = pair["tv"]
    current = {k: v.numpy() for k, v in tv.state_dict().items()}
    v1 = {}
    for key, value in current.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
            for block in ("inner_blocks", "layer_blocks"):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        v1[key] = value
    assert "rpn.head.conv.weight" in v1 and "roi_heads.mask_head.mask_fcn1.weight" in v1
    assert "backbone.fpn.inner_blocks.0.weight" in v1
    # torchvision itself accepts these names (its _load_from_state_dict renames version-1 keys).
    copy = type(tv)(tv.backbone, num_classes=91)
    copy.load_state_dict({k: torch.from_numpy(v) for k, v in v1.items()})
    a, _ = convert_state_dict(v1)
    b, _ = convert_state_dict(current)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # and every tensor found its place in ours, unchanged
    ours = pair["ours"].state_dict()
    assert set(ours) == set(a)
    for k in a:
        np.testing.assert_array_equal(ours[k], a[k])


def test_transform_gives_torchvisions_sizes_and_pixels(pair):
    batch, sizes, _ = pair["ours"].transform(pair["images"])
    assert sizes == pair["sizes"]
    assert batch.shape == pair["batch"].shape
    # torch places the bilinear samples in float32 (scale = in / out as a float), we in float64: the
    # positions differ by up to ~1e-5 pixel, which on noisy pixels (normalized, up to ~4 per pixel
    # of slope) is ~1e-4 in value.
    assert np.abs(batch - pair["batch"]).max() < 2e-4


def test_backbone_and_fpn_features_agree(pair):
    with no_grad():
        ours = pair["ours"].backbone(Tensor(pair["batch"]))
    assert len(ours) == 5
    for level, (a, b) in enumerate(zip(ours, pair["features"])):
        assert a.shape == b.shape
        assert _relative(a.data, b) < 1e-4, f"P{level + 2}"


def test_rpn_head_objectness_and_deltas_agree(pair):
    with no_grad():
        objectness, deltas = pair["ours"].rpn.head(_features(pair))
    for a, b in zip(objectness, pair["objectness"]):
        assert _relative(a.data, b) < 1e-4
    for a, b in zip(deltas, pair["deltas"]):
        assert _relative(a.data, b) < 1e-4


def test_proposals_agree(pair):
    ours = pair["ours"]
    ours.rpn.eval()
    with no_grad():
        proposals, _ = ours.rpn(_features(pair), pair["sizes"], pair["batch"].shape[-2:])
    for a, b in zip(proposals, pair["proposals"]):
        assert a.shape == b.shape
        _, in_place = _match(a, b, atol=1e-3)
        # Only boxes of equal or nearly equal score may swap (anchors over the zero padding see
        # the same features).  At inference P2 here (80x112) takes F(4x4, 3x3), whose float32
        # rounding depends on a pixel's place in its 4x4 tile and is larger than im2col's, so
        # more near-ties change places: 0.990 to 0.998 of the boxes stay in place on these
        # three images.
        assert in_place > 0.97


def test_box_head_scores_and_deltas_agree(pair):
    heads = pair["ours"].roi_heads
    with no_grad():
        pooled = heads.box_roi_pool(_features(pair)[:4], pair["proposals"])
        logits, regression = heads.box_predictor(heads.box_head(pooled))
    assert _relative(logits.data, pair["class_logits"]) < 1e-4
    assert _relative(regression.data, pair["box_regression"]) < 1e-4
    probs = F.softmax(logits, axis=-1).data
    want = torch.softmax(torch.from_numpy(pair["class_logits"]), -1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)


def test_mask_logits_for_the_same_boxes_agree(pair):
    heads = pair["ours"].roi_heads
    assert sum(len(b) for b in pair["det_boxes"]) >= 20  # enough detections to compare
    with no_grad():
        pooled = heads.mask_roi_pool(_features(pair)[:4], pair["det_boxes"])
        logits = heads.mask_predictor(heads.mask_head(pooled))
    assert logits.shape == pair["mask_logits"].shape
    assert _relative(logits.data, pair["mask_logits"]) < 1e-4


def test_final_detections_agree(pair):
    """Boxes, labels, scores and the pasted masks.  The masks are far from trivial (``_randomize``
    centres the mask logits): thousands of foreground pixels per image, and holes inside the
    boxes, so that equality tests the mask head and the pasting, not an empty or full box."""
    for i, (ours, theirs) in enumerate(zip(pair["ours"].predict(pair["images"]), pair["final"])):
        assert len(theirs["boxes"]) == DETECTIONS, f"image {i}: too few detections to compare"
        assert len(ours["boxes"]) == len(theirs["boxes"]), f"image {i}"
        order, _ = _match(ours["boxes"], theirs["boxes"], atol=1e-3)
        np.testing.assert_array_equal(ours["labels"], theirs["labels"][order])
        np.testing.assert_allclose(ours["scores"], theirs["scores"][order], rtol=1e-4, atol=1e-6)
        want = theirs["masks"][order, 0] > 0.5
        assert ours["masks"].shape == want.shape
        in_box = np.zeros_like(want)
        for k, (x1, y1, x2, y2) in enumerate(np.round(theirs["boxes"][order]).astype(int)):
            in_box[k, y1:y2, x1:x2] = True
        assert want.sum() >= 10000, f"image {i}: only {want.sum()} mask pixels"
        holes = (in_box & ~want).sum() / in_box.sum()
        assert 0.05 < holes < 0.95, f"image {i}: masks fill {1 - holes:.0%} of their boxes"
        union = (ours["masks"] | want).sum(axis=(1, 2))
        iou = (ours["masks"] & want).sum(axis=(1, 2)) / np.maximum(union, 1)
        assert (union > 0).all() and iou.min() >= 0.999, f"image {i}: mask IoU {iou.min():.4f}"
        assert (ours["masks"] == want).mean() >= 0.999, f"image {i}"


def test_predict_with_converted_weights_names_coco_classes(pair, tmp_path):
    """``minimask predict --weights``: torchvision's detections, drawn and named by COCO class."""
    from PIL import Image

    from minimask.categories import COCO_CATEGORIES
    from minimask.engine.checkpoint import save_checkpoint

    # The converted file with this test's small settings (convert-weights stores the preset's).
    weights = save_checkpoint(tmp_path / "small.npz", pair["ours"], config=pair["ours"].cfg)
    path = tmp_path / "scene.png"
    Image.fromarray(pair["images"][0]).save(path)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(weights), str(path), "--out", str(out),
                 "--score-thresh", str(SCORE_THRESH)]) == 0
    found = json.loads((out / "detections.json").read_text())[0]["detections"]
    # torchvision on this image alone (alone, it is padded less than in the batch of three).
    with torch.no_grad():
        theirs = pair["tv"]([torch.from_numpy(pair["images"][0]).permute(2, 0, 1).float() / 255])[0]
    assert len(found) == len(theirs["boxes"]) == DETECTIONS
    order, _ = _match(np.array([d["box_xyxy"] for d in found]), theirs["boxes"].numpy(), atol=1e-3)
    labels = theirs["labels"].numpy()[order]
    assert [d["label"] for d in found] == labels.tolist()
    assert [d["class"] for d in found] == [COCO_CATEGORIES.get(int(k), "N/A") for k in labels]
    assert (out / "scene.png").exists()
    with pytest.raises(SystemExit):  # exactly one of --weights and --checkpoint
        main(["predict", str(path)])


def test_eval_keeps_coco_ids_as_labels_for_torchvision_models(tmp_path):
    """``labels_are_coco_ids`` (the torchvision preset): eval writes the label itself as the
    category id, not the data set's k-th category."""
    from minimask.data.shapes import make_shapes
    from minimask.engine.checkpoint import save_checkpoint
    from minimask.engine.predictor import load_image

    _, val_json = make_shapes(tmp_path / "data", train=1, val=2)
    data = json.loads(open(val_json).read())
    new_id = {1: 1, 2: 5, 3: 7}  # non-contiguous ids: label k is no longer the k-th category
    for c in data["categories"]:
        c["id"] = new_id[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    with open(val_json, "w") as f:
        json.dump(data, f)
    cfg = dataclasses.replace(preset("shapes"), labels_are_coco_ids=True, box_score_thresh=0.0,
                              num_classes=8)
    model = MaskRCNN(cfg)
    checkpoint = save_checkpoint(tmp_path / "m.npz", model, config=cfg)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--ann", str(val_json), "--out", str(out)]) == 0
    found = {r["category_id"] for r in json.loads((out / "detections.json").read_text())}
    images = [load_image(tmp_path / "data" / "images" / im["file_name"]) for im in data["images"]]
    labels = {int(k) for p in model.predict(images) for k in p["labels"]}
    # Every label is written as it is, also those of no category here (COCOeval skips them); the
    # data set's own mapping (1, 2, 3 -> 1, 5, 7) would have refused labels above 3.
    assert found == labels and max(found) > 3
