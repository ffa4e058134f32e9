"""Prediction on image files: load a checkpoint, detect, draw, write the results.

Inference is the paper's test-time path (Sec. 3.1, "Inference"): proposals, box head, NMS,
then the mask head on the top detections, each mask resized to its box and binarised at 0.5.
The model does all of that in ``model.predict``; this file is the plumbing around it:

    predictor = Predictor.from_checkpoint("runs/shapes/model_0001500.npz")
    pred = predictor(image)                 # boxes, scores, labels, masks with score >= thresh
    predict_files(predictor, ["a.png"], "out/")   # out/a.png drawn, out/detections.json
"""

import json
import os

import numpy as np

from ..backend import to_device
from .evaluator import encode_masks


def load_image(path):
    """An image file as an (H, W, 3) uint8 RGB array, with a clear error for a missing or
    unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image Pillow can read") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated data, a bad chunk, ...: name the file
        raise ValueError(f"{path}: damaged or cut short ({type(e).__name__}: {e})") from None


class Predictor:
    """A model in eval mode plus its class names and a score threshold.

    ``predictor(image)`` takes one (H, W, 3) uint8 RGB array (NumPy) and returns a dict of
    NumPy arrays: ``boxes`` (N, 4) xyxy in the image's pixels, ``scores``, ``labels`` (1..K)
    and ``masks`` (N, H, W) bool, keeping the detections scoring at least ``score_thresh``.
    """

    def __init__(self, model, class_names=(), device="cpu", score_thresh=0.5, skeleton=()):
        self.model = model
        self.class_names = tuple(class_names)
        self.skeleton = tuple(skeleton)  # keypoint models: the limbs to draw
        self.device = device
        self.score_thresh = float(score_thresh)
        model.to(device)
        model.eval()

    @classmethod
    def from_checkpoint(cls, path, device="cpu", score_thresh=0.5, model_fn=None):
        """Rebuild the model from the config saved in the checkpoint and load its weights
        (``model_fn(cfg)`` builds it; default ``models.build_model``, the real MaskRCNN)."""
        from .. import models
        from .checkpoint import load_checkpoint

        state = load_checkpoint(path)
        cfg = state["config"]
        if cfg is None:
            raise ValueError(f"{path}: the checkpoint has no config, so the model cannot be rebuilt")
        model = (model_fn or models.build_model)(cfg)
        model.load_state_dict(state["model"])
        return cls(model, cfg.class_names, device=device, score_thresh=score_thresh,
                   skeleton=getattr(cfg, "keypoint_skeleton", ()))

    def predict(self, images):
        """Predictions for a list of images (one dict per image, NumPy, thresholded)."""
        from ..tensor import no_grad

        with no_grad():
            preds = self.model.predict([to_device(im, self.device) for im in images])
        out = []
        for pred in preds:
            p = {k: np.asarray(to_device(v, "cpu")) for k, v in pred.items()}
            keep = p["scores"] >= self.score_thresh
            per_detection = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")
            out.append({k: v[keep] if k in per_detection else v for k, v in p.items()})
        return out

    def __call__(self, image):
        return self.predict([image])[0]

    def name(self, label):
        label = int(label)
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)


def save_drawing(image, pred, class_names, path, skeleton=(), min_long_side=512):
    """Draw ``pred`` on ``image`` (``viz.draw_detections``) and save it as a PNG.

    A small image is drawn enlarged by a whole factor (``viz.display_scale``) until its longer
    side is at least ``min_long_side`` pixels, each pixel a block of one colour (nearest
    neighbour), so that the labels, drawn at a readable size, cover little of the objects; a
    large image is drawn at its own resolution."""
    from ..viz import display_scale, draw_detections, new_figure

    h, w = image.shape[:2]
    dpi = 100
    scale = display_scale(h, w, min_long_side)
    fig = new_figure(w * scale / dpi, h * scale / dpi)
    ax = fig.add_axes([0, 0, 1, 1])  # the whole figure: no margins around the picture
    draw_detections(image, pred["boxes"], pred["labels"], pred["scores"], pred.get("masks"),
                    class_names=class_names, ax=ax, keypoints=pred.get("keypoints"), skeleton=skeleton)
    fig.savefig(path, dpi=dpi)
    return path


def output_name(path, used):
    """The stem of ``path`` for the files written about it, made unique among ``used`` (two
    images of the same name from different folders get ``name`` and ``name_2``); added to it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def predict_files(predictor, paths, out_dir, log=print):
    """Run ``predictor`` on image files; write ``out_dir/<name>.png`` (the drawing) per image
    and ``out_dir/detections.json``; return the list of per-image result dicts.

    Every path is checked before any work, so a typo fails at once, not after an hour.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    os.makedirs(out_dir, exist_ok=True)
    results, used = [], set()
    for path in paths:
        image = load_image(path)
        pred = predictor(image)
        name = output_name(path, used)
        drawing = save_drawing(image, pred, predictor.class_names, os.path.join(out_dir, name + ".png"),
                               skeleton=getattr(predictor, "skeleton", ()))
        masks = pred.get("masks")
        rles = encode_masks(masks) if masks is not None else [None] * len(pred["boxes"])
        detections = []
        keypoints = pred.get("keypoints")
        rows = zip(pred["boxes"], pred["scores"], pred["labels"], rles)
        for i, (box, score, label, rle) in enumerate(rows):
            d = {"label": int(label), "class": predictor.name(label), "score": float(score),
                 "box_xyxy": [float(v) for v in box]}
            if rle is not None:
                d["segmentation"] = rle
            if keypoints is not None and keypoints[i, :, 2].any():  # x, y, v per keypoint
                d["keypoints"] = [round(float(v), 2) for v in keypoints[i].reshape(-1)]
            detections.append(d)
        results.append({"file": os.fspath(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
                        "drawing": drawing, "detections": detections})
        log(f"{path}: {len(detections)} detections -> {drawing}")
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


__all__ = ["Predictor", "predict_files", "load_image", "save_drawing", "output_name"]
