"""minimask data subset: N images of a COCO file with their annotations, linked beside a new JSON."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minimask.cli import main
from minimask.data import CocoDataset
from minimask.data.subset import make_subset


@pytest.fixture
def coco(tmp_path):
    """A tiny COCO file: 6 images, image i has i % 3 objects (so 2 have none), 3 categories with
    gapped ids, one crowd annotation."""
    src = tmp_path / "coco"
    (src / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(src / "train" / name)
        images.append({"id": 100 + i, "file_name": name, "height": 20, "width": 30})
        for k in range(i % 3):
            x, y = 2 + 5 * k, 3
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": [1, 7, 9][k],
                                "bbox": [x, y, 4, 5], "area": 20.0, "iscrowd": 0,
                                "segmentation": [[x, y, x + 4, y, x + 4, y + 5, x, y + 5]]})
    annotations.append({"id": len(annotations) + 1, "image_id": 105, "category_id": 9, "bbox": [20, 10, 5, 5],
                        "area": 25.0, "iscrowd": 1, "segmentation": [[20, 10, 25, 10, 25, 15, 20, 15]]})
    cats = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}, {"id": 9, "name": "c"}]
    ann = src / "instances_train.json"
    ann.write_text(json.dumps({"info": {"description": "tiny"}, "images": images,
                               "annotations": annotations, "categories": cats}))
    return ann, src / "train", annotations


def test_subset_keeps_chosen_images_all_their_annotations_and_all_categories(coco, tmp_path):
    ann, image_dir, annotations = coco
    out = tmp_path / "sub"
    path, counts = make_subset(ann, image_dir, 3, out, seed=1)
    assert path == os.path.join(out, "instances_train.json")
    data = json.loads(open(path).read())
    ids = [im["id"] for im in data["images"]]
    assert len(ids) == 3 and ids == sorted(ids)
    # Only images with an object are drawn by default: 100 and 103 have none.
    assert not {100, 103} & set(ids)
    expected = [a for a in annotations if a["image_id"] in ids]
    assert sorted(a["id"] for a in data["annotations"]) == sorted(a["id"] for a in expected)
    assert data["categories"] == json.loads(ann.read_text())["categories"]  # all, even unused ones
    assert data["info"] == {"description": "tiny"}
    assert counts == {"images": 3, "annotations": len(expected), "categories": 3}
    for im in data["images"]:  # linked, and the same bytes as the originals
        link = out / "images" / im["file_name"]
        assert link.is_symlink()
        assert link.read_bytes() == (image_dir / im["file_name"]).read_bytes()
    # minimask reads it with the default layout (images/ beside the JSON), labels as the full file
    ds = CocoDataset(path, train=True)
    assert len(ds) == 3 and ds.class_names == ("a", "b", "c")


def test_subset_is_seeded_and_n_larger_than_the_file_takes_all(coco, tmp_path):
    ann, image_dir, _ = coco
    a, _ = make_subset(ann, image_dir, 2, tmp_path / "a", seed=5)
    b, _ = make_subset(ann, image_dir, 2, tmp_path / "b", seed=5)
    ids = lambda p: [im["id"] for im in json.loads(open(p).read())["images"]]  # noqa: E731
    assert ids(a) == ids(b)
    _, counts = make_subset(ann, image_dir, 100, tmp_path / "all", keep_empty=True, copy=True, name="all")
    assert counts["images"] == 6
    assert not (tmp_path / "all" / "images" / "000000000000.jpg").is_symlink()  # copied
    _, counts = make_subset(ann, image_dir, 100, tmp_path / "objects")
    assert counts["images"] == 4


def test_subset_errors_name_the_problem(coco, tmp_path):
    ann, image_dir, _ = coco
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        make_subset(tmp_path / "nope.json", image_dir, 2, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        make_subset(ann, tmp_path / "no_images", 2, tmp_path / "o")
    os.remove(image_dir / "000000000001.jpg")
    with pytest.raises(FileNotFoundError, match="000000000001.jpg"):
        make_subset(ann, image_dir, 6, tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        make_subset(bad, image_dir, 2, tmp_path / "o")


def test_cli_data_subset(coco, tmp_path, capsys):
    ann, image_dir, _ = coco
    out = tmp_path / "cli"
    assert main(["data", "subset", "--ann", str(ann), "--images", str(image_dir), "--n", "2",
                 "--out", str(out), "--name", "train"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert len(json.loads((out / "train.json").read_text())["images"]) == 2
    assert main(["data", "subset", "--ann", str(tmp_path / "x.json"), "--n", "2", "--out", str(out)]) == 1
    assert "annotation file not found" in capsys.readouterr().err
