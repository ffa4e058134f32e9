"""CocoDataset: polygons, both RLE forms, crowds, odd category ids, empty and grayscale images,
and clear errors for missing files, bad JSON and bad annotations."""

import json
import logging

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from minimask.categories import COCO_CATEGORIES, COCO_KEYPOINT_FLIP_MAP, COCO_KEYPOINT_NAMES
from minimask.data import CocoDataset

H, W = 30, 40


def rle_uncompressed(mask):
    """COCO's uncompressed RLE, written here from its definition: run lengths of the mask read
    column by column (Fortran order), starting with a run of zeros (possibly empty)."""
    flat = mask.ravel(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def bbox_of(m):
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.fixture
def coco_dir(tmp_path):
    """A small COCO set, with the masks each annotation was made from (ground truth for the test)."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / "empty.png")
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(img_dir / "gray.png")
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(img_dir / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / "crowdonly.png")

    poly_mask = rect(3, 8, 2, 10)                       # polygon with integer corners: exact pixels
    comp_mask = rect(10, 20, 5, 12) | rect(12, 25, 11, 14)  # an L shape, compressed RLE
    unc_mask = rect(0, 30, 30, 40) & ~rect(5, 9, 33, 36)    # with a hole, uncompressed RLE
    crowd_mask = rect(20, 30, 0, 25)
    gray_mask = rect(4, 14, 4, 24)
    comp = mask_utils.encode(np.asfortranarray(comp_mask))
    comp = {"size": comp["size"], "counts": comp["counts"].decode("ascii")}
    anns = [
        dict(id=11, image_id=1, category_id=2, iscrowd=0, bbox=bbox_of(poly_mask), area=40.0,
             segmentation=[[2, 3, 10, 3, 10, 8, 2, 8]]),
        dict(id=12, image_id=1, category_id=9, iscrowd=0, bbox=bbox_of(comp_mask),
             area=float(comp_mask.sum()), segmentation=comp),
        dict(id=13, image_id=1, category_id=90, iscrowd=0, bbox=bbox_of(unc_mask),
             area=float(unc_mask.sum()), segmentation=rle_uncompressed(unc_mask)),
        dict(id=14, image_id=1, category_id=2, iscrowd=1, bbox=bbox_of(crowd_mask),
             area=float(crowd_mask.sum()), segmentation=rle_uncompressed(crowd_mask)),
        dict(id=15, image_id=1, category_id=9, iscrowd=0, bbox=[20.0, 1.0, 0.5, 6.0], area=3.0,
             segmentation=[[20, 1, 20.5, 1, 20.5, 7, 20, 7]]),  # thinner than a pixel: dropped
        dict(id=31, image_id=3, category_id=90, iscrowd=0, bbox=bbox_of(gray_mask),
             area=float(gray_mask.sum()), segmentation=[[4, 4, 24, 4, 24, 14, 4, 14]]),
        dict(id=41, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0], area=25.0,
             segmentation=[[1, 1, 6, 1, 6, 6, 1, 6]]),
        dict(id=51, image_id=5, category_id=2, iscrowd=1, bbox=bbox_of(crowd_mask),
             area=float(crowd_mask.sum()), segmentation=rle_uncompressed(crowd_mask)),
    ]
    data = {
        "images": [dict(id=i, file_name=f, height=H, width=W) for i, f in
                   [(1, "a.png"), (2, "empty.png"), (3, "gray.png"), (4, "rgba.png"), (5, "crowdonly.png")]],
        "annotations": anns,
        "categories": [dict(id=90, name="ninety"), dict(id=2, name="two"), dict(id=9, name="nine")],
    }
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps(data))
    truth = {"poly": poly_mask, "comp": comp_mask, "unc": unc_mask, "crowd": crowd_mask,
             "gray": gray, "rgba": rgba}
    return ann_file, data, truth


def test_categories_map_to_contiguous_labels(coco_dir):
    ann_file, _, _ = coco_dir
    ds = CocoDataset(ann_file)
    assert ds.cat_id_to_label == {2: 1, 9: 2, 90: 3}
    assert ds.label_to_cat_id == {1: 2, 2: 9, 3: 90}
    assert ds.class_names == ("two", "nine", "ninety")
    assert ds.num_classes == 4


def test_image_one_masks_labels_boxes_and_crowd(coco_dir, caplog):
    ann_file, _, truth = coco_dir
    with caplog.at_level(logging.INFO, logger="minimask.data.coco"):
        ds = CocoDataset(ann_file)
    assert "dropped 1 of 8 annotations as degenerate (1 boxes under 1 px once clipped to the image); " \
           "first ids: 15" in caplog.text
    assert any("first ids: 15" in note for note in ds.notes)  # what the trainer prints
    image, t = ds[ds.image_ids.index(1)]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert t["image_id"] == 1
    # the thin box (id 15) is gone; the crowd is kept apart
    np.testing.assert_array_equal(t["labels"], [1, 2, 3])
    assert t["labels"].dtype == np.int64
    assert t["masks"].shape == (3, H, W) and t["masks"].dtype == np.uint8
    np.testing.assert_array_equal(t["masks"][0], truth["poly"])
    np.testing.assert_array_equal(t["masks"][1], truth["comp"])
    np.testing.assert_array_equal(t["masks"][2], truth["unc"])
    assert t["boxes"].dtype == np.float32
    np.testing.assert_array_equal(t["boxes"][0], [2, 3, 10, 8])   # xyxy, width = x2 - x1
    # each box encloses its mask exactly
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.testing.assert_array_equal(t["crowd_boxes"], [[0, 20, 25, 30]])


def test_empty_images_skipped_in_train_kept_in_eval(coco_dir):
    ann_file, _, _ = coco_dir
    train = CocoDataset(ann_file, train=True)
    val = CocoDataset(ann_file, train=False)
    assert train.image_ids == [1, 3, 4]          # 2 has nothing, 5 only a crowd
    assert val.image_ids == [1, 2, 3, 4, 5]
    image, t = val[val.image_ids.index(2)]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)
    assert t["crowd_boxes"].shape == (0, 4)
    _, t5 = val[val.image_ids.index(5)]
    assert len(t5["boxes"]) == 0 and len(t5["crowd_boxes"]) == 1


def test_grayscale_and_rgba_become_rgb(coco_dir):
    ann_file, _, truth = coco_dir
    ds = CocoDataset(ann_file)
    image, t = ds[ds.image_ids.index(3)]
    assert image.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], truth["gray"])
    np.testing.assert_array_equal(t["labels"], [3])
    image, _ = ds[ds.image_ids.index(4)]
    np.testing.assert_array_equal(image, truth["rgba"][..., :3])


def test_explicit_image_dir(coco_dir, tmp_path):
    ann_file, _, _ = coco_dir
    moved = tmp_path / "elsewhere"
    (tmp_path / "images").rename(moved)
    ds = CocoDataset(ann_file, image_dir=moved)
    assert ds[0][0].shape == (H, W, 3)


def test_missing_image_names_the_file(coco_dir, tmp_path):
    ann_file, _, _ = coco_dir
    (tmp_path / "images" / "gray.png").unlink()
    ds = CocoDataset(ann_file)
    with pytest.raises(FileNotFoundError, match=r"gray\.png.*image id 3"):
        ds[ds.image_ids.index(3)]


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [1, 2')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        CocoDataset(bad)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDataset(tmp_path / "nothere.json")


@pytest.mark.parametrize("field, value, message", [
    ("bbox", [1, 2, 3], "bad bbox"),
    ("bbox", [1, 2, -3, 4], "bad bbox"),
    ("segmentation", [[1, 2, 3]], "bad segmentation"),
    ("segmentation", {"size": [5, 5], "counts": "abc"}, "bad segmentation: RLE size"),
    ("segmentation", {"size": [H, W], "counts": [1, 2]}, "do not sum"),
    ("category_id", 7, "unknown category_id 7"),
])
def test_bad_annotation_names_file_and_id(coco_dir, tmp_path, field, value, message):
    _, data, _ = coco_dir
    data["annotations"][1][field] = value   # annotation id 12
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"bad\.json: annotation id 12 .*{message}"):
        CocoDataset(path)


@pytest.mark.parametrize("counts", ["0000", "5", "o"])  # too few pixels; cut short (0x20 set)
def test_corrupt_compressed_rle_names_the_annotation(coco_dir, tmp_path, counts):
    _, data, _ = coco_dir
    data["annotations"][1]["segmentation"]["counts"] = counts
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json: annotation id 12 .*compressed RLE"):
        CocoDataset(path)


def test_rle_string_reader_matches_runs_counted_here():
    """Our reader of pycocotools' compressed strings against run lengths counted by a loop."""
    from minimask.data.coco import _runs_of_rle_string

    rng = np.random.default_rng(1)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        if t % 2:
            m = (rng.random((h, w)) < rng.random()).astype(np.uint8)  # many short runs
        else:
            m = np.zeros((h, w), np.uint8)
            m[h // 4:, w // 3:] = 1                                   # long runs, big deltas
        s = mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")
        assert _runs_of_rle_string(s) == rle_uncompressed(m)["counts"]


def test_pycocotools_view_of_the_same_file(coco_dir):
    ann_file, _, _ = coco_dir
    coco = CocoDataset(ann_file, train=False).coco
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5]


def test_coco_names_and_keypoint_twins():
    assert len(COCO_CATEGORIES) == 80 and max(COCO_CATEGORIES) == 90
    flip = np.array(COCO_KEYPOINT_FLIP_MAP)
    np.testing.assert_array_equal(flip[flip], np.arange(17))  # mirroring twice is the identity
    for i, j in enumerate(flip):
        a, b = COCO_KEYPOINT_NAMES[i], COCO_KEYPOINT_NAMES[j]
        assert a == b == "nose" or a.split("_")[1:] == b.split("_")[1:] and a != b


# ---------------------------------------------------------------- repair, skip or refuse


def _write(tmp_path, data, name="edited.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_degenerate_annotations_are_dropped_counted_and_named(coco_dir, tmp_path):
    _, data, _ = coco_dir
    extra = [  # all on image 4 (rgba.png), each degenerate in its own way
        dict(id=61, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0],
             segmentation=[[1, 1, 6, 1]]),                                    # two points
        dict(id=62, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0],
             segmentation=[[1, 1, 3, 3, 5, 5]]),                              # three points on a line
        dict(id=63, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0], segmentation=[]),
        dict(id=64, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0],
             segmentation=rle_uncompressed(np.zeros((H, W), np.uint8))),     # a mask with no pixel
        dict(id=65, image_id=4, category_id=9, iscrowd=0, bbox=[45.0, 1.0, 5.0, 5.0],
             segmentation=[[1, 1, 6, 1, 6, 6]]),                              # box wholly outside
        dict(id=66, image_id=4, category_id=9, iscrowd=0, bbox=[1.0, 1.0, 5.0, 5.0],
             segmentation=[[1, 1, 6, 1], [1, 1, 6, 1, 6, 6, 1, 6]]),          # one bad part: repaired
    ]
    data["annotations"] += extra
    ds = CocoDataset(_write(tmp_path, data))
    notes = "\n".join(ds.notes)
    assert "dropped 6 of 14 annotations as degenerate" in notes
    for kind in ("2 boxes under 1 px once clipped to the image", "1 with an empty segmentation",
                 "2 polygons of fewer than 3 points or no area", "1 with an empty mask"):
        assert kind in notes
    assert "first ids: 15, 65, 61, 62, 63" in notes  # grouped by kind, in file order within each
    _, t = ds[ds.image_ids.index(4)]
    assert len(t["boxes"]) == 2  # 41 and the repaired 66
    np.testing.assert_array_equal(t["masks"][1], rect(1, 6, 1, 6))  # its good part only


def test_boxes_past_the_image_are_clipped_to_it(coco_dir, tmp_path):
    _, data, _ = coco_dir
    data["annotations"][6]["bbox"] = [-3.0, 2.0, 10.0, 40.0]   # id 41 on image 4: past left and bottom
    ds = CocoDataset(_write(tmp_path, data))
    assert any("clipped 1 boxes reaching past their image" in n for n in ds.notes)
    _, t = ds[ds.image_ids.index(4)]
    np.testing.assert_array_equal(t["boxes"], [[0, 2, 7, H]])
    _, t1 = ds[ds.image_ids.index(1)]
    np.testing.assert_array_equal(t1["boxes"][0], [2, 3, 10, 8])  # boxes inside stay as they are


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"].append(dict(id=1, file_name="again.png", height=H, width=W)),
     r"image id 1 is listed twice \(file_name 'a\.png' and 'again\.png'\)"),
    (lambda d: d["categories"].append(dict(id=2, name="again")), "category id 2 is listed twice"),
    (lambda d: d["annotations"][0].update(image_id=99),
     r"annotation id 11 \(image id 99\): unknown image_id"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "annotation id 11 .*not finite"),
    (lambda d: d["annotations"][0].update(segmentation=[[2, 3, float("inf"), 3, 10, 8]]),
     "annotation id 11 .*polygon holds a number that is not finite"),
    (lambda d: d["images"][0].update(height=0), "image id 1: height 0 is not a positive whole number"),
    (lambda d: d.update(annotations={"a": 1}), "'annotations' must be a list"),
    (lambda d: d["categories"].append({"name": "no id"}), "has no whole-number 'id'"),
])
def test_structural_errors_say_what_and_where(coco_dir, tmp_path, edit, message):
    _, data, _ = coco_dir
    edit(data)
    path = _write(tmp_path, data)  # json writes NaN and Infinity, as some exporters do
    with pytest.raises(ValueError, match=message) as err:
        CocoDataset(path)
    assert str(path) in str(err.value)


def test_a_file_of_boxes_without_segmentations(coco_dir, tmp_path):
    _, data, _ = coco_dir
    for a in data["annotations"]:
        if not a["iscrowd"]:
            a.pop("segmentation")
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match="annotations have boxes but no segmentation.*--set mask_on=False"):
        CocoDataset(path, masks=True)
    for masks in (None, False):
        ds = CocoDataset(path, masks=masks)
        assert not ds.has_masks and not ds.masks
        _, t = ds[ds.image_ids.index(1)]
        assert "masks" not in t and len(t["boxes"]) == 3


def _save_truncated(image, path, fmt):
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_check_images_lists_every_bad_file_and_can_skip_them(coco_dir, tmp_path):
    from minimask.data.coco import BadImagesError

    ann_file, data, _ = coco_dir
    images = tmp_path / "images"
    (images / "gray.png").unlink()                                        # id 3: gone
    (images / "rgba.png").write_text("hello")                             # id 4: not an image
    _save_truncated(np.zeros((H, W, 3), np.uint8), images / "a.png", "PNG")  # id 1: cut short
    Image.new("RGB", (W + 1, H)).save(images / "crowdonly.png")          # id 5: another size
    val = CocoDataset(ann_file, train=False)
    with pytest.raises(BadImagesError) as err:
        val.check_images(progress=False)
    assert [(i, w.split(" (")[0]) for _, i, w in err.value.problems] == [
        (1, "damaged or cut short"), (3, "file not found"), (4, "not an image Pillow can read"),
        (5, "is 41x30 pixels")]
    text = str(err.value)
    assert text.startswith(f"{ann_file}: 4 images cannot be used:\n"
                           f"  {images / 'a.png'} (image id 1): damaged")
    assert text.endswith("--set skip_bad_images=True")
    lines = []
    val.check_images(skip=True, progress=False, log=lines.append)
    assert val.image_ids == [2] and val.skipped_images == [1, 3, 4, 5]
    assert "skipped 4 bad image files (skip_bad_images=True), 1 images left" in lines[0]
    assert val.coco.getImgIds() == [2]  # kept out of evaluation's ground truth too


def test_a_jpeg_cut_short_is_found_by_its_missing_end_marker(tmp_path):
    from minimask.data.coco import image_problem

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "whole.jpg")
    _save_truncated(image, tmp_path / "cut.jpg", "JPEG")
    assert image_problem(str(tmp_path / "whole.jpg"), 64, 64) is None
    assert image_problem(str(tmp_path / "cut.jpg"), 64, 64).startswith("damaged or cut short")


def test_an_image_that_breaks_after_the_check_is_named_when_read(coco_dir, tmp_path):
    from minimask.data.coco import BadImagesError

    ann_file, _, _ = coco_dir
    ds = CocoDataset(ann_file)
    ds.check_images(progress=False)
    _save_truncated(np.zeros((H, W, 3), np.uint8), tmp_path / "images" / "a.png", "PNG")
    with pytest.raises(BadImagesError, match=r"a\.png \(image id 1 in .*train\.json\): damaged or cut short"):
        ds[ds.image_ids.index(1)]


def test_a_missing_image_folder_is_one_line_and_long_lists_are_counted(coco_dir, tmp_path):
    from minimask.data.coco import BadImagesError

    ann_file, _, _ = coco_dir
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'nowhere'} "):
        CocoDataset(ann_file, image_dir=tmp_path / "nowhere").check_images(progress=False)
    many = [(f"{k}.png", k, "file not found") for k in range(BadImagesError.MAX_LISTED + 7)]
    many[-1] = ("last.png", -1, "damaged or cut short (OSError: broken data stream)")
    lines = str(BadImagesError("x.json", many)).splitlines()
    assert lines[0] == f"x.json: {len(many)} images cannot be used:"
    assert len(lines) == BadImagesError.MAX_LISTED + 2
    assert lines[-1] == "  ... and 7 more: 6 file not found, 1 damaged or cut short"
