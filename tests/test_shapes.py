"""Synthetic shapes: deterministic per seed, annotations that decode to their own bbox and area,
polygons only for whole objects, RLE for occluded ones, and the CLI."""

import hashlib
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from minimask.cli import main as cli_main
from minimask.data import CocoDataset
from minimask.data.shapes import CLASSES, annotate, make_image, make_split


def digest(folder):
    """Hash of every file in a folder (names and bytes)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_split(str(out), "train", 40, seed=3)
    return out


def decode(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        make_split(str(tmp_path / name), "train", 6, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_image_does_not_depend_on_how_many_are_made(tmp_path):
    make_split(str(tmp_path / "few"), "val", 2, seed=1)
    make_split(str(tmp_path / "many"), "val", 5, seed=1)
    for i in range(2):
        name = f"images/val_{i:06d}.png"
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def test_every_annotation_decodes_to_its_bbox_and_area(shapes_dir):
    data = json.loads((shapes_dir / "train.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    kinds = set()
    for ann in data["annotations"]:
        m = decode(ann["segmentation"], *sizes[ann["image_id"]])
        ys, xs = np.nonzero(m)
        assert ann["area"] == m.sum() > 0
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0
        kinds.add(type(ann["segmentation"]))
        if isinstance(ann["segmentation"], dict):
            assert isinstance(ann["segmentation"]["counts"], str)
    assert kinds == {list, dict}, "40 images should hold both whole and occluded objects"


def test_objects_per_image_and_classes(shapes_dir):
    data = json.loads((shapes_dir / "train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    assert [c["name"] for c in data["categories"]] == list(CLASSES)


def test_occlusion_rle_and_visible_masks():
    """Drawn objects: visible masks are disjoint, later objects win, RLE exactly where cut."""
    occluded_seen = 0
    for i in range(25):
        image, objects = make_image(np.random.default_rng([9, i]))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        for k, obj in enumerate(objects):
            later = np.zeros_like(obj["full"])
            for o in objects[k + 1:]:
                later |= o["full"]
            # what is visible is what no later object covers
            np.testing.assert_array_equal(obj["visible"], obj["full"] & ~later)
            ann = annotate(obj, 1, k + 1)
            cut = bool((obj["full"] & later).any())
            assert isinstance(ann["segmentation"], dict) == cut
            occluded_seen += cut
            # too little left visible never happens: such objects are redrawn or dropped
            assert obj["visible"].sum() >= 24 and obj["visible"].sum() >= 0.3 * obj["full"].sum()
            np.testing.assert_array_equal(decode(ann["segmentation"], 128, 128), obj["visible"])
    assert occluded_seen > 0


def test_objects_stand_out_from_the_background():
    """Mean colour inside each visible mask differs clearly from a ring just outside it."""
    diffs = []
    for i in range(10):
        image, objects = make_image(np.random.default_rng([4, i]))
        covered = np.zeros((128, 128), bool)
        for o in objects:
            covered |= o["full"]
        for o in objects:
            ys, xs = np.nonzero(o["visible"])
            y0, y1, x0, x1 = max(ys.min() - 4, 0), ys.max() + 5, max(xs.min() - 4, 0), xs.max() + 5
            ring = np.zeros_like(covered)
            ring[y0:y1, x0:x1] = True
            ring &= ~covered
            if ring.sum() < 20:
                continue
            inside = image[o["visible"]].astype(float).mean(0)
            outside = image[ring].astype(float).mean(0)
            diffs.append(np.linalg.norm(inside - outside))
    assert np.median(diffs) > 50


def test_cli_writes_a_loadable_data_set(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "shapes", "--out", str(out), "--train", "4", "--val", "2",
                     "--seed", "1", "--size", "64"]) == 0
    assert "wrote 4 + 2 images" in capsys.readouterr().out
    assert len(os.listdir(out / "images")) == 6
    ds = CocoDataset(out / "val.json", train=False)
    image, target = ds[1]
    assert image.shape == (64, 64, 3) and len(ds) == 2
    assert target["masks"].shape[1:] == (64, 64) and set(target["labels"]) <= {1, 2, 3}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        make_split("/tmp/never", "test", 1)
    with pytest.raises(ValueError, match="too small"):
        make_split("/tmp/never", "train", 1, size=8)
