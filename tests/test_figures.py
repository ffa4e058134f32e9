"""The synthetic stick figures (``minimask data figures``): COCO keypoint format, deterministic,
visibility flags that mean what COCO says."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from minimask.data import CocoDataset
from minimask.data.figures import KEYPOINT_NAMES, KEYPOINT_SIGMAS, SKELETON, make_image, make_split

J = len(KEYPOINT_NAMES)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    path = make_split(str(out), "train", 40, seed=1)
    with open(path) as f:
        return str(out), path, json.load(f)


def test_at_least_seven_named_joints_with_skeleton_and_sigmas(split):
    _, _, data = split
    cat = [c for c in data["categories"] if c["name"] == "figure"][0]
    assert J >= 7 and cat["keypoints"] == list(KEYPOINT_NAMES)
    assert len(cat["keypoint_sigmas"]) == J and all(0 < s < 0.2 for s in KEYPOINT_SIGMAS)
    assert all(1 <= a <= J and 1 <= b <= J for a, b in SKELETON)
    # the skeleton joins all joints into one figure
    reached, edges = {1}, [tuple(p) for p in cat["skeleton"]]
    for _ in range(J):
        reached |= {b for a, b in edges if a in reached} | {a for a, b in edges if b in reached}
    assert reached == set(range(1, J + 1))
    assert {c["name"] for c in data["categories"]} == {"figure", "circle", "triangle", "square"}


def test_keypoint_annotations_follow_coco(split):
    _, _, data = split
    size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    figures = [a for a in data["annotations"] if a["category_id"] == 1]
    others = [a for a in data["annotations"] if a["category_id"] != 1]
    assert figures and others
    assert all("keypoints" not in a for a in others)
    flags = []
    for a in figures:
        kp = np.asarray(a["keypoints"], float).reshape(J, 3)
        h, w = size[a["image_id"]]
        v = kp[:, 2]
        assert set(v) <= {0, 1, 2} and a["num_keypoints"] == int((v > 0).sum())
        assert (kp[v == 0, :2] == 0).all()                       # not labelled: x = y = 0
        inside = (kp[:, 0] >= 0) & (kp[:, 0] < w) & (kp[:, 1] >= 0) & (kp[:, 1] < h)
        assert inside[v > 0].all()
        # the box and area are those of the visible mask
        mask = mask_utils.decode({"size": a["segmentation"]["size"],
                                  "counts": a["segmentation"]["counts"].encode()})
        assert a["area"] == mask.sum() and a["area"] > 0
        flags += list(v)
    flags = np.asarray(flags)
    # over 40 images every kind occurs: visible, hidden by a later object, outside the image
    assert (flags == 2).mean() > 0.6 and (flags == 1).any() and (flags == 0).any()


def test_visibility_matches_the_drawing():
    """v = 2 joints lie on their figure's visible pixels, v = 1 joints under a later object."""
    checked = {1: 0, 2: 0}
    for i in range(30):
        _, objects = make_image(np.random.default_rng([5, i]))
        for o in objects:
            if "points" not in o:
                continue
            for (x, y), hidden in zip(o["points"], o["hidden"]):
                if not (0 <= x < 128 and 0 <= y < 128):
                    continue
                on_visible = bool(o["visible"][int(y), int(x)])
                assert on_visible == (not hidden)
                checked[1 if hidden else 2] += 1
    assert checked[1] > 0 and checked[2] > 100


def test_same_seed_same_files(tmp_path):
    a = make_split(str(tmp_path / "a"), "val", 4, seed=9)
    b = make_split(str(tmp_path / "b"), "val", 4, seed=9)
    c = make_split(str(tmp_path / "c"), "val", 4, seed=10)
    assert open(a).read() == open(b).read() != open(c).read()
    for name in os.listdir(tmp_path / "a" / "images"):
        first, second = tmp_path / "a" / "images" / name, tmp_path / "b" / "images" / name
        assert first.read_bytes() == second.read_bytes()


def test_reads_as_a_keypoint_data_set(split):
    out, path, _ = split
    ds = CocoDataset(path)
    assert ds.class_names == ("figure", "circle", "triangle", "square")
    assert ds.keypoint_names == KEYPOINT_NAMES and ds.keypoint_sigmas == KEYPOINT_SIGMAS
    names = list(KEYPOINT_NAMES)
    twin = [names[i] for i in ds.keypoint_flip_map]
    assert twin[names.index("left_knee")] == "right_knee" and twin[names.index("hip")] == "hip"
    image, target = ds[0]
    assert image.shape == (128, 128, 3)
    assert target["keypoints"].shape == (len(target["boxes"]), J, 3)


def test_bad_keypoints_name_the_annotation(split, tmp_path):
    _, path, data = split
    bad = json.loads(json.dumps(data))
    fig = [a for a in bad["annotations"] if a["category_id"] == 1][0]
    fig["keypoints"] = fig["keypoints"][:-3]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=f"annotation id {fig['id']}.*keypoints"):
        CocoDataset(str(p))


def test_cli_writes_figures(tmp_path, capsys):
    from minimask.cli import main

    assert main(["data", "figures", "--out", str(tmp_path), "--train", "3", "--val", "2"]) == 0
    assert (tmp_path / "train.json").is_file() and (tmp_path / "val.json").is_file()
    assert len(os.listdir(tmp_path / "images")) == 5
