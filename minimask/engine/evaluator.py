"""Evaluation with the official COCO tools (the paper's Sec. 4 metrics).

The paper reports "the standard COCO metrics including AP (averaged over IoU thresholds),
AP50, AP75, and APS, APM, APL (AP at different scales)", with IoU "computed on masks" for
instance segmentation and on boxes for detection (Sec. 4).  We do not re-implement those
metrics: pycocotools' ``COCOeval`` is the reference every paper uses, so we feed it.

Steps:

1. run ``model.predict`` on every image of the data set (in order, batches of ``batch_size``);
2. write the detections in COCO's *results format*, one dict per detection::

       {"image_id": 42, "category_id": 18, "score": 0.93,
        "bbox": [x, y, w, h],                                   # the original image's pixels
        "segmentation": {"size": [H, W], "counts": "..."}}      # compressed RLE, as text

   Labels 1..K go back to the data set's own category ids (COCO's ids have gaps);
3. run ``COCOeval`` for ``bbox`` and for ``segm`` and keep its 12 summary numbers.

Keypoint models (Sec. 5) add ``"keypoints": [x1, y1, v1, ...]`` to the detections of the
keypoint class, and are scored with ``COCOeval(iouType="keypoints")``: OKS, the object keypoint
similarity, takes the place of IoU,

    OKS = mean over labelled keypoints i of exp(-d_i^2 / (2 s^2 k_i^2)),   k_i = 2 sigma_i,

d_i the distance from the predicted to the true keypoint, s^2 the object's area, sigma_i
how much annotators disagree on keypoint i (COCO's 17 values, or the data set's own), so a
prediction off by a few pixels on a big person is still right.  AP averages over OKS 0.50:0.95
like box AP over IoU; there is no "small" range (COCO labels no keypoints on small people),
so COCOeval gives 10 numbers (``KEYPOINT_STAT_NAMES``).

Results are fractions in [0, 1] as COCOeval gives them (papers print them times 100); -1 means
"no ground truth in this range" (e.g. APl on small images).
"""

import contextlib
import io
import json
import os

import numpy as np
import pycocotools.mask as mask_utils

from ..backend import device_of, to_device

# COCOeval.stats, in order (Detectron2's names for the first six).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def encode_masks(masks):
    """(N, H, W) bool masks -> N compressed RLEs with ``counts`` as str (JSON-able)."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) in Fortran (column-major) order: RLE runs go down columns.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(prediction, image_id, label_to_cat_id, keypoint_labels=None):
    """One image's prediction dict (boxes xyxy, scores, labels, masks, keypoints) -> COCO result
    dicts.  With ``keypoints`` (N, J, 3) in the prediction, the detections whose label is in
    ``keypoint_labels`` (all if None) get COCO's flat ``keypoints`` list, scored by the box score
    (as torchvision's reference evaluation)."""
    boxes = np.asarray(to_device(prediction["boxes"], "cpu"), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(to_device(prediction["scores"], "cpu"), dtype=np.float64).reshape(-1)
    labels = np.asarray(to_device(prediction["labels"], "cpu")).reshape(-1)
    masks = prediction.get("masks")
    rles = encode_masks(to_device(masks, "cpu")) if masks is not None else [None] * len(boxes)
    keypoints = prediction.get("keypoints")
    if keypoints is not None:
        keypoints = np.asarray(to_device(keypoints, "cpu"), dtype=np.float64)  # (N, J, 3)
    if not len(boxes) == len(scores) == len(labels) == len(rles):
        raise ValueError(f"image {image_id}: prediction has {len(boxes)} boxes, {len(scores)} scores, "
                         f"{len(labels)} labels and {len(rles)} masks; they must match")
    results = []
    for (x1, y1, x2, y2), score, label, rle in zip(boxes, scores, labels, rles):
        if int(label) not in label_to_cat_id:
            raise ValueError(f"image {image_id}: predicted label {int(label)} is not a class of the data "
                             f"set (labels 1..{len(label_to_cat_id)})")
        r = {"image_id": int(image_id), "category_id": int(label_to_cat_id[int(label)]),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],  # xyxy -> xywh
             "score": float(score)}
        if rle is not None:
            r["segmentation"] = rle
        if keypoints is not None and (keypoint_labels is None or int(label) in keypoint_labels):
            r["keypoints"] = [round(float(v), 2) for v in keypoints[len(results)].reshape(-1)]
        results.append(r)
    return results


def _image_and_id(dataset, i):
    """Image ``i`` and its COCO image id; only the image is read (no masks decoded) when the
    data set can do that (``CocoDataset.load_image``)."""
    if hasattr(dataset, "load_image") and hasattr(dataset, "image_ids"):
        image_id = dataset.image_ids[i]
        return dataset.load_image(image_id), image_id
    image, target = dataset[i]
    return image, target["image_id"]


def _model_device(model):
    for p in model.parameters():
        return device_of(p.data)
    return "cpu"


def category_ids(model, dataset):
    """How the model's labels map to the data set's category ids.

    A model trained here on ``dataset`` predicts contiguous labels 1..K, mapped back with the
    data set's own table.  torchvision's COCO models (``cfg.labels_are_coco_ids``, the
    ``torchvision_r50_fpn`` preset) predict the category id itself (91 outputs, ids with gaps),
    so their labels map to themselves; the data set's categories must then be among those ids.
    """
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "labels_are_coco_ids", False):
        return dict(dataset.label_to_cat_id)
    known = set(dataset.label_to_cat_id.values())
    outside = sorted(c for c in known if not 1 <= c < cfg.num_classes)
    if outside:
        raise ValueError(f"{getattr(dataset, 'ann_file', 'the data set')}: category ids {outside[:5]} are "
                         f"not among the model's COCO ids 1..{cfg.num_classes - 1} (its labels are COCO "
                         f"category ids: labels_are_coco_ids=True)")
    return {i: i for i in range(1, cfg.num_classes)}


def predict_dataset(model, dataset, batch_size=2, progress=False):
    """Run ``model.predict`` over ``dataset`` in order; return the COCO results list (labels
    mapped to category ids by ``category_ids``)."""
    from ..tensor import no_grad

    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    to_cat = category_ids(model, dataset)
    cat_to_label = {c: k for k, c in to_cat.items()}
    keypoint_labels = {cat_to_label[c] for c in getattr(dataset, "keypoint_cat_ids", ()) if c in cat_to_label}
    was_training = getattr(model, "training", False)
    model.eval()
    results = []
    indices = range(0, len(dataset), batch_size)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="batch", leave=False)
    try:
        with no_grad():
            for start in indices:
                stop = min(start + batch_size, len(dataset))
                items = [_image_and_id(dataset, i) for i in range(start, stop)]
                images = [to_device(image, device) for image, _ in items]
                for (_, image_id), pred in zip(items, model.predict(images)):
                    results += to_coco_results(pred, image_id, to_cat, keypoint_labels)
    finally:
        model.train(was_training)
    return results


def coco_eval(coco_gt, results, iou_type, log=print, sigmas=None, cat_ids=None):
    """COCOeval's summary numbers for ``iou_type`` ("bbox", "segm": 12; "keypoints": 10) as a dict.

    For "keypoints": ``sigmas`` the OKS falloff per keypoint (COCOeval's default is COCO's 17),
    ``cat_ids`` the categories that have keypoints (others have no keypoints to compare), and
    only the results with ``keypoints`` are scored.

    pycocotools' ``loadRes`` cannot take an empty list (it reads ``results[0]``), so a model
    that found nothing gets 0 everywhere, which is what the metric means: no recall.
    """
    from pycocotools.cocoeval import COCOeval

    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
    if iou_type == "keypoints":
        results = [r for r in results if "keypoints" in r]
    if not results:
        log(f"{iou_type}: no detections at all, AP = 0")
        return {name: 0.0 for name in names}
    # loadRes writes "area", "id" and "iscrowd" into the dicts it is given: hand it copies.
    # For masks, also drop "bbox": with it present loadRes would take each detection's area
    # from its box, and the area (which decides small/medium/large) must be the mask's.
    drop = {"bbox"} if iou_type == "segm" else set()
    results = [{k: v for k, v in r.items() if k not in drop} for r in results]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints timings; keep only the table
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        if cat_ids is not None:
            ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        ev.summarize()
    # COCOeval writes -1 where a range has no ground truth (APl on 128 px images, say): print "-"
    # there, since -1 reads as a score; the numbers returned (and saved) stay COCOeval's.
    lines = [line[:-6] + "     -" if line.endswith("= -1.000") else line
             for line in table.getvalue().rstrip().splitlines()]
    log(f"{iou_type}:\n" + "\n".join(lines))
    return {name: float(v) for name, v in zip(names, ev.stats)}


def evaluate(model, dataset, out_dir=None, batch_size=2, log=print, progress=False):
    """Predict on every image of ``dataset`` (a ``CocoDataset`` with ``train=False``), score the
    results with COCOeval, and return ``{"bbox": {"AP": ..., ...}, "segm": {...}}``.

    With ``out_dir``: ``detections.json`` (the results) and ``coco_eval.json`` (the numbers).
    """
    if getattr(dataset, "train", False):
        # train=True drops images without objects; COCOeval would then miss their false positives.
        raise ValueError("evaluate: the data set was made with train=True; evaluation needs every "
                         "image (CocoDataset(..., train=False))")
    results = predict_dataset(model, dataset, batch_size=batch_size, progress=progress)
    has_masks = any("segmentation" in r for r in results) or not results
    metrics = {"bbox": coco_eval(dataset.coco, results, "bbox", log=log)}
    if has_masks:
        metrics["segm"] = coco_eval(dataset.coco, results, "segm", log=log)
    if any("keypoints" in r for r in results):
        names = getattr(dataset, "keypoint_names", None) or ()
        if dataset.keypoint_sigmas is None and len(names) != 17:
            # COCOeval falls back to COCO's 17 person sigmas and fails deep inside on a shape
            # mismatch; say what is missing instead.
            raise ValueError(f"{dataset.ann_file}: the keypoint category has {len(names)} keypoints "
                             f"but no 'keypoint_sigmas' (one OKS falloff per keypoint); COCO's "
                             f"sigmas only fit its 17 person keypoints")
        metrics["keypoints"] = coco_eval(dataset.coco, results, "keypoints", log=log,
                                         sigmas=dataset.keypoint_sigmas, cat_ids=dataset.keypoint_cat_ids)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "detections.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out_dir, "coco_eval.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


__all__ = ["evaluate", "predict_dataset", "coco_eval", "to_coco_results", "encode_masks", "category_ids",
           "STAT_NAMES", "KEYPOINT_STAT_NAMES"]
