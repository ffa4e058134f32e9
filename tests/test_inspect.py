"""``minimask inspect``: one sheet and one summary per image, with counts that add up.

The model is the real shapes model, untrained (saved as a checkpoint with the data set's class
names): its detections mean nothing, but every stage runs, and the counts at each stage must be
consistent with the config and with each other, and the detections must be ``model.predict``'s.
The drawing helpers the sheets (and ``minimask predict``) rely on are checked here too: the
enlargement factor and the placement of labels that must not cover each other.
"""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from minimask.cli import main
from minimask.data import CocoDataset, make_split
from minimask.engine.checkpoint import save_checkpoint
from minimask.inspect import inspect_image
from minimask.models import build_model, preset
from minimask.viz import display_scale, label_positions


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """An untrained shapes model saved as a checkpoint, and a 2-image val split of 64 px images."""
    root = tmp_path_factory.mktemp("inspect")
    val = make_split(str(root / "data"), "val", 2, seed=3, size=64)
    cfg = dataclasses.replace(preset("shapes"), class_names=CocoDataset(val, train=False).class_names)
    checkpoint = str(root / "model.npz")
    save_checkpoint(checkpoint, build_model(cfg), config=cfg, iteration=0)
    return cfg, checkpoint, val, root


def test_inspect_writes_a_sheet_and_a_summary_whose_counts_add_up(shapes_model, capsys):
    cfg, checkpoint, val, root = shapes_model
    image = str(root / "data" / "images" / "val_000000.png")
    out = root / "out"
    assert main(["inspect", "--checkpoint", checkpoint, image, "--ann", val, "--out", str(out),
                 "--score-thresh", "0.05", "--top-anchors", "30"]) == 0
    assert "wrote 1 sheets" in capsys.readouterr().out

    sheet = Image.open(out / "val_000000.png")
    assert sheet.size[0] == 6 * 512  # six panels of 512 px a row
    (report,) = json.loads((out / "inspect.json").read_text())
    # Anchors: 3 per cell of every level (strides 4..64) of the batch: the 64 px image resized to
    # the preset's 128.
    side = cfg.min_size[-1]
    assert report["anchors_per_level"] == [3 * (side // s) ** 2 for s in (4, 8, 16, 32, 64)]
    assert report["top_anchors"] == 30
    # Every object has a positive anchor: the matcher's low-quality rule gives each its best ones.
    data = CocoDataset(val, train=False)
    objects = [a for a in data.anns[data.image_ids[0]] if not a.get("iscrowd", 0)]
    assert len(report["positive_anchors"]) == len(objects) > 0
    assert min(report["positive_anchors"]) >= 1
    # Proposals: at most the test-time budget, counted once per RPN level; every one is an RoI
    # of the box head, and in a 128 px image none is as large as the 224 px that P4 needs.
    assert 0 < report["proposals"] <= cfg.rpn_post_nms_top_n_test
    assert sum(report["proposals_per_level"]) == report["proposals"]
    assert sum(report["rois_per_level"].values()) == report["proposals"]
    assert report["rois_per_level"]["P4"] == report["rois_per_level"]["P5"] == 0
    assert 0 <= report["detections_kept"] <= report["detections"] <= cfg.box_detections_per_img
    assert report["same_as_predict"] is True
    assert set(report["times_ms"]) >= {"transform", "backbone", "rpn head", "proposals", "box head",
                                       "mask head", "postprocess"}

    summary = (out / "val_000000.txt").read_text()
    assert f"proposals after NMS: {report['proposals']} " in summary
    assert f"positive anchors per object: {report['positive_anchors']}" in summary
    assert "detections equal model.predict's: yes" in summary


def test_inspect_image_stages_without_ground_truth(shapes_model):
    cfg, checkpoint, val, root = shapes_model
    model = build_model(cfg)
    image = np.asarray(Image.open(root / "data" / "images" / "val_000001.png").convert("RGB"))
    stages = inspect_image(model, image, top_anchors=10, top_masks=2)
    assert "positive_anchors" not in stages
    side = cfg.min_size[-1]  # the 64 px image resized to 128
    assert [f.shape for f in stages["features"]] == [(side // s, side // s) for s in (4, 8, 16, 32, 64)]
    assert stages["fpn_names"] == ["P2", "P3", "P4", "P5", "P6"]
    scores = stages["top_anchor_scores"]
    assert len(scores) == 10 and np.all(np.diff(scores) <= 0)  # best first
    det = stages["detections"]
    assert det["masks"].shape == (len(det["scores"]), 64, 64)
    # Every class's mask of the top detections; the predicted class's is the one predict pastes.
    probs = stages["mask_probs_per_class"]
    assert probs.shape == (min(2, len(det["scores"])), cfg.num_classes - 1, 28, 28)
    assert np.all((probs >= 0) & (probs <= 1))


def test_inspect_refuses_a_missing_image_and_an_image_not_in_the_annotations(shapes_model, capsys, tmp_path):
    cfg, checkpoint, val, root = shapes_model
    assert main(["inspect", "--checkpoint", checkpoint, str(tmp_path / "nope.png")]) == 1
    assert "image file not found" in capsys.readouterr().err
    stranger = tmp_path / "stranger.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(stranger)
    assert main(["inspect", "--checkpoint", checkpoint, str(stranger), "--ann", val,
                 "--out", str(tmp_path / "out")]) == 1
    assert "no image named 'stranger.png'" in capsys.readouterr().err


def test_display_scale_enlarges_small_images_by_a_whole_factor():
    assert display_scale(128, 128) == 4
    assert display_scale(48, 64) == 8
    assert display_scale(100, 300) == 2   # 600 >= 512
    assert display_scale(800, 1333) == 1  # large images stay as they are


def _overlaps(rects):
    r = np.asarray(rects)

    def cross(a, b, lo, hi):  # do the spans [lo, hi] of rectangles a and b overlap?
        return min(r[a, hi], r[b, hi]) > max(r[a, lo], r[b, lo])

    pairs = [(i, j) for i in range(len(r)) for j in range(i + 1, len(r))]
    return [(i, j) for i, j in pairs if cross(i, j, 0, 2) and cross(i, j, 1, 3)]


def test_labels_of_crowded_boxes_do_not_cover_each_other():
    # Five boxes on top of each other, shifted a little: the same top-left spot for all labels
    # would stack them; each must find a free spot.
    boxes = np.array([[40, 40, 90, 90]] * 5, float) + np.arange(5)[:, None] * 3
    sizes = np.tile([30.0, 8.0], (5, 1))
    rects = label_positions(boxes, sizes, bounds=(0, 0, 200, 200))
    assert _overlaps(rects) == []
    assert np.allclose(rects[:, 2:] - rects[:, :2], sizes)
    # The first label goes where labels usually are: above its box, at its left edge.
    assert np.allclose(rects[0], [40, 32, 70, 40])
    # Labels stay inside the bounds: a box at the top edge gets its label inside it instead.
    (top,) = label_positions([[10, 0, 60, 30]], [[30, 8]], bounds=(0, 0, 100, 100))
    assert top[1] >= 0 and np.allclose(top, [10, 0, 40, 8])
