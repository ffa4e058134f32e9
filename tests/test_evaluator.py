"""Evaluator: COCO results files and COCOeval's numbers.

A fake model that returns the ground truth must score AP 1.0 (boxes and masks), one that
returns nothing AP 0 (pycocotools cannot load an empty results list; we must not crash), and
one that gets every class wrong AP 0.  The data set's category ids are made non-contiguous
(5, 9, 20) so that mapping labels 1..K back to ids is tested too.
"""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from minimask.data import CocoDataset, make_split
from minimask.engine.evaluator import STAT_NAMES, encode_masks, evaluate, to_coco_results

CAT_IDS = {1: 5, 2: 9, 3: 20}


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    path = make_split(str(root), "val", 4, seed=1, size=64)
    with open(path) as f:
        data = json.load(f)
    for c in data["categories"]:
        c["id"] = CAT_IDS[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = CAT_IDS[a["category_id"]]
    with open(path, "w") as f:
        json.dump(data, f)
    return CocoDataset(path, train=False)


class Oracle:
    """Returns given predictions, looked up by the image's pixels (so order does not matter)."""

    def __init__(self, answers):
        self.answers, self.training, self.calls = answers, True, 0

    def parameters(self):
        return []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def predict(self, images):
        assert not self.training
        self.calls += 1
        return [self.answers(im) for im in images]


def ground_truth_answers(dataset, relabel=lambda labels: labels):
    by_pixels = {}
    for i in range(len(dataset)):
        image, t = dataset[i]
        n = len(t["boxes"])
        by_pixels[image.tobytes()] = {"boxes": t["boxes"], "labels": relabel(t["labels"]),
                                      "scores": np.linspace(1.0, 0.5, n).astype(np.float32),
                                      "masks": t["masks"].astype(bool)}
    return lambda im: by_pixels[im.tobytes()]


def test_perfect_predictions_give_ap_one_and_a_coco_results_file(val_set, tmp_path):
    model = Oracle(ground_truth_answers(val_set))
    metrics = evaluate(model, val_set, out_dir=str(tmp_path), batch_size=3, log=lambda *a: None)
    assert model.calls == 2 and model.training  # 4 images in batches of 3; training mode restored
    for kind in ("bbox", "segm"):
        assert list(metrics[kind]) == list(STAT_NAMES)
        assert metrics[kind]["AP"] == pytest.approx(1.0)
        assert metrics[kind]["AP50"] == pytest.approx(1.0)
        assert metrics[kind]["AR100"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "coco_eval.json").read_text()) == metrics

    # The results file: one entry per annotation, in COCO's own terms.
    results = json.loads((tmp_path / "detections.json").read_text())
    anns = val_set.coco.dataset["annotations"]
    assert len(results) == len(anns)
    by_key = {(a["image_id"], tuple(np.round(a["bbox"], 3))): a for a in anns}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        ann = by_key[(r["image_id"], tuple(np.round(r["bbox"], 3)))]  # xywh, original pixels
        assert r["category_id"] == ann["category_id"] and r["category_id"] in (5, 9, 20)
        assert isinstance(r["segmentation"]["counts"], str)
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle), val_set.coco.annToMask(ann))


def test_no_detections_give_ap_zero_not_a_crash(val_set, tmp_path):
    def nothing(im):
        return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "labels": np.zeros(0, np.int64), "masks": np.zeros((0,) + im.shape[:2], bool)}

    logged = []
    metrics = evaluate(Oracle(nothing), val_set, out_dir=str(tmp_path), log=logged.append)
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    assert json.loads((tmp_path / "detections.json").read_text()) == []
    assert any("no detections" in line for line in logged)


def test_right_places_wrong_classes_give_ap_zero(val_set):
    # Every object found exactly, but called the next class: no true positive anywhere.
    model = Oracle(ground_truth_answers(val_set, relabel=lambda labels: labels % 3 + 1))
    metrics = evaluate(model, val_set, log=lambda *a: None)
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0


def test_half_the_objects_found_gives_recall_one_half(val_set):
    # Keep every other object (sorted per image): recall at 100 detections is found / total.
    answers = ground_truth_answers(val_set)

    def half(im):
        a = answers(im)
        return {k: v[::2] for k, v in a.items()}

    metrics = evaluate(Oracle(half), val_set, log=lambda *a: None)
    found = sum(len(range(0, len(val_set[i][1]["boxes"]), 2)) for i in range(len(val_set)))
    total = sum(len(val_set[i][1]["boxes"]) for i in range(len(val_set)))
    # COCOeval averages recall over categories, so compare per category.
    per_cat_found, per_cat_total = {}, {}
    for i in range(len(val_set)):
        labels = val_set[i][1]["labels"]
        for j, k in enumerate(labels):
            per_cat_total[k] = per_cat_total.get(k, 0) + 1
            per_cat_found[k] = per_cat_found.get(k, 0) + (j % 2 == 0)
    expected = np.mean([per_cat_found[k] / per_cat_total[k] for k in per_cat_total])
    assert 0 < found < total
    assert metrics["bbox"]["AR100"] == pytest.approx(expected)
    assert metrics["segm"]["AR100"] == pytest.approx(expected)


def test_training_set_is_refused(val_set):
    train_view = CocoDataset(val_set.ann_file, train=True)
    with pytest.raises(ValueError, match="train=True; evaluation needs every image"):
        evaluate(Oracle(lambda im: None), train_view)


def test_to_coco_results_converts_boxes_and_rejects_unknown_labels():
    pred = {"boxes": np.array([[1.5, 2.0, 11.5, 7.0]], np.float32), "scores": np.array([0.75], np.float32),
            "labels": np.array([2])}
    (r,) = to_coco_results(pred, 7, {1: 5, 2: 9})
    assert r == {"image_id": 7, "category_id": 9, "bbox": [1.5, 2.0, 10.0, 5.0], "score": 0.75}
    with pytest.raises(ValueError, match="predicted label 3 is not a class"):
        to_coco_results(dict(pred, labels=np.array([3])), 7, {1: 5, 2: 9})


def test_encode_masks_round_trips(rng):
    masks = rng.random((3, 9, 13)) > 0.5
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    for m, r in zip(masks, rles):
        assert r["size"] == [9, 13]
        np.testing.assert_array_equal(mask_utils.decode(dict(r, counts=r["counts"].encode())), m)
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []


def test_coco_eval_prints_a_dash_where_a_range_has_no_ground_truth():
    from minimask.engine.evaluator import coco_eval

    pycocotools = pytest.importorskip("pycocotools.coco", reason="pycocotools reads the ground truth")
    gt = pycocotools.COCO()
    gt.dataset = {"images": [{"id": 1, "width": 64, "height": 64}], "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 20],
                                   "area": 400.0, "iscrowd": 0}]}
    gt.createIndex()
    lines = []
    stats = coco_eval(gt, [{"image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 20], "score": 0.9}], "bbox",
                      log=lines.append)
    assert stats["APl"] == -1.0  # no large object: COCOeval's -1, kept in the numbers
    table = lines[0].splitlines()
    large = [x for x in table if "Precision" in x and "area= large" in x]
    assert large and large[0].rstrip().endswith("] =      -") and "-1.000" not in lines[0]


def test_predictor_load_image_names_a_cut_short_file(tmp_path):
    from PIL import Image

    from minimask.engine.predictor import load_image

    path = tmp_path / "cut.png"
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(path)
    np.testing.assert_array_equal(load_image(path), 120)
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not
    with pytest.raises(ValueError, match=r"cut\.png: damaged or cut short"):
        load_image(path)
