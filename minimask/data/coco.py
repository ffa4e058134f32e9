"""Reading COCO-format instance segmentation: an annotation JSON and a folder of images.

Mask R-CNN is trained and evaluated on COCO (Sec. 4, "Instance Segmentation").  This reader
turns one COCO image and its annotations into what the model takes:

    image   (H, W, 3) uint8 RGB (grayscale and RGBA images converted)
    target  boxes (N, 4) float32 x1, y1, x2, y2 in pixels    (COCO's x, y, w, h converted here)
            labels (N,) int64 in 1..K                         (COCO category ids mapped)
            masks (N, H, W) uint8                             (polygons and RLE decoded)
            crowd_boxes (Mc, 4) float32                       (``iscrowd`` regions, see below)
            image_id int                                      (to write results files)
            keypoints (N, J, 3) float32                       (only in keypoint data sets)

Keypoint data sets (COCO's person_keypoints files, ``minimask data figures``) give a category
its ``keypoints`` (the J names) and ``skeleton``; each of its annotations then has ``keypoints``
= [x1, y1, v1, ...] with v = 0 not labelled, 1 labelled but hidden, 2 visible (Sec. 5).  Those
come out as ``keypoints`` (N, J, 3); an object without them (another class, or a person with
``num_keypoints`` 0) gets all v = 0, so it still trains the box branch but no keypoint.  The
data set also offers ``keypoint_names``, ``keypoint_skeleton``, ``keypoint_flip_map`` (mirror
twins, for flipping) and ``keypoint_sigmas`` (OKS falloffs: the category's
``keypoint_sigmas`` if given, COCO's for its 17 person keypoints).

Category ids in COCO are not contiguous (1..90 with gaps, or anything in other data sets), so
they are mapped to labels 1..K in increasing id order; 0 is background.  ``cat_id_to_label``,
``label_to_cat_id`` and ``class_names`` give the mapping both ways.

``iscrowd`` annotations mark a group of objects outlined as one region ("a crowd of people").
They are not training targets; as in Detectron2 they are returned apart as ``crowd_boxes`` so the
matchers can ignore anchors and RoIs that fall on them instead of calling them background.

Segmentations come in three forms, all decoded by pycocotools: polygons (a list of
``[x1, y1, x2, y2, ...]``), uncompressed RLE (``counts`` a list of run lengths, used for crowds)
and compressed RLE (``counts`` a string).  Annotations are checked when the file is loaded, so a
bad one is reported at once, with the file and the annotation id, not hours into training.
"""

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

log = logging.getLogger(__name__)


class CocoDataset:
    """Images and instance annotations of one COCO JSON file.

    ann_file:  the annotation JSON.
    image_dir: folder of the images (default: ``images/`` beside ``ann_file``).
    train:     if True, images with no usable (non-crowd) object are skipped, since they teach
               the heads nothing (as torchvision's reference scripts do); evaluation keeps
               every image, because COCOeval counts them.
    min_box_size: boxes narrower or lower than this (in pixels) are dropped (counted in the log).
    """

    def __init__(self, ann_file, image_dir=None, train=True, min_box_size=1.0):
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir) if image_dir is not None else os.path.join(
            os.path.dirname(os.path.abspath(self.ann_file)), "images")
        self.train = train
        self.min_box_size = float(min_box_size)
        data = self._load_json()

        # categories: sorted ids -> labels 1..K
        cats = sorted(data.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{self.ann_file}: no 'categories' listed")
        self.cat_id_to_label = {c["id"]: k + 1 for k, c in enumerate(cats)}
        self.label_to_cat_id = {k + 1: c["id"] for k, c in enumerate(cats)}
        self.class_names = tuple(c.get("name", str(c["id"])) for c in cats)  # of labels 1..K
        self._keypoint_categories(cats)

        self.images = {}
        for img in data.get("images", []):
            for key in ("id", "file_name", "height", "width"):
                if key not in img:
                    raise ValueError(f"{self.ann_file}: image entry {img!r} has no {key!r}")
            self.images[img["id"]] = img

        # annotations grouped per image; each one checked now
        self.anns = {image_id: [] for image_id in self.images}
        dropped = 0
        for ann in data.get("annotations", []):
            self._check(ann)
            x, y, w, h = ann["bbox"]
            if not ann.get("iscrowd", 0) and (w < self.min_box_size or h < self.min_box_size):
                dropped += 1
                continue
            self.anns[ann["image_id"]].append(ann)
        if dropped:
            log.info("%s: dropped %d boxes thinner than %g px", self.ann_file, dropped, self.min_box_size)

        ids = sorted(self.images)
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.anns[i])]
            skipped = len(self.images) - len(ids)
            if skipped:
                log.info("%s: skipped %d images with no objects (train=True)", self.ann_file, skipped)
        self.image_ids = ids

    # ------------------------------------------------------------------ loading and checks

    def _load_json(self):
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{self.ann_file}: not a COCO annotation file (no 'images' list)")
        return data

    def _keypoint_categories(self, cats):
        """Keypoint names, skeleton, flip map and OKS sigmas from the categories that have them."""
        from ..categories import COCO_KEYPOINT_NAMES, COCO_KEYPOINT_SIGMAS, keypoint_flip_map

        with_kp = [c for c in cats if c.get("keypoints")]
        self.keypoint_cat_ids = tuple(c["id"] for c in with_kp)
        self.keypoint_names, self.keypoint_skeleton, self.keypoint_flip_map = (), (), None
        self.keypoint_sigmas = None
        if not with_kp:
            return
        names = tuple(with_kp[0]["keypoints"])
        for c in with_kp[1:]:
            if tuple(c["keypoints"]) != names:
                raise ValueError(f"{self.ann_file}: categories {with_kp[0]['id']} and {c['id']} have "
                                 f"different keypoints; one list of keypoints is supported")
        self.keypoint_names = names
        self.keypoint_skeleton = tuple(tuple(int(i) for i in pair) for pair in with_kp[0].get("skeleton", []))
        try:
            self.keypoint_flip_map = keypoint_flip_map(names)
        except KeyError as e:
            raise ValueError(f"{self.ann_file}: keypoint {e.args[0]!r} has no mirror twin (names must pair "
                             f"left_* with right_*)") from None
        sigmas = with_kp[0].get("keypoint_sigmas")
        if sigmas is None and names == COCO_KEYPOINT_NAMES:
            sigmas = COCO_KEYPOINT_SIGMAS
        if sigmas is not None and len(sigmas) != len(names):
            raise ValueError(f"{self.ann_file}: {len(sigmas)} keypoint_sigmas for {len(names)} keypoints")
        self.keypoint_sigmas = None if sigmas is None else tuple(float(s) for s in sigmas)

    def _bad(self, ann, what):
        return ValueError(f"{self.ann_file}: annotation id {ann.get('id')!r} "
                          f"(image id {ann.get('image_id')!r}): {what}")

    def _check(self, ann):
        """Raise a ValueError naming the file and annotation id for anything we cannot use."""
        if not isinstance(ann, dict):
            raise ValueError(f"{self.ann_file}: annotation {ann!r} is not an object")
        if ann.get("image_id") not in self.images:
            raise self._bad(ann, "unknown image_id")
        if ann.get("category_id") not in self.cat_id_to_label:
            raise self._bad(ann, f"unknown category_id {ann.get('category_id')!r} "
                                 f"(categories: {sorted(self.cat_id_to_label)})")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise self._bad(ann, f"bad bbox {bbox!r} (expected [x, y, w, h], w and h >= 0)")
        img = self.images[ann["image_id"]]
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                  and all(isinstance(v, (int, float)) for v in p) for p in seg):
                raise self._bad(ann, "bad segmentation: polygons must be lists of x, y pairs, "
                                     "at least 3 points each")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if list(size or []) != [img["height"], img["width"]]:
                raise self._bad(ann, f"bad segmentation: RLE size {size!r} is not the image's "
                                     f"[height, width] [{img['height']}, {img['width']}]")
            if isinstance(counts, list):
                if sum(counts) != img["height"] * img["width"]:
                    raise self._bad(ann, "bad segmentation: uncompressed RLE counts do not sum to "
                                         "height * width")
            elif isinstance(counts, str):
                runs = _runs_of_rle_string(counts)
                if runs is None or min(runs, default=0) < 0 or sum(runs) != img["height"] * img["width"]:
                    raise self._bad(ann, "bad segmentation: compressed RLE counts do not decode to "
                                         "runs covering height * width")
            else:
                raise self._bad(ann, "bad segmentation: RLE counts must be a list or a string")
        else:
            raise self._bad(ann, f"bad segmentation {type(seg).__name__} (expected polygons or RLE)")
        kp = ann.get("keypoints")
        if kp is not None and self.keypoint_names:
            j = len(self.keypoint_names)
            if (not isinstance(kp, list) or len(kp) != 3 * j
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in kp)):
                raise self._bad(ann, f"bad keypoints: expected {3 * j} numbers (x, y, v for each of the "
                                     f"{j} keypoints of the category)")
            if any(v not in (0, 1, 2) for v in kp[2::3]):
                raise self._bad(ann, "bad keypoints: visibility flags must be 0, 1 or 2")

    def decode_mask(self, ann):
        """(H, W) uint8 mask of one annotation (polygons, uncompressed or compressed RLE)."""
        img = self.images[ann["image_id"]]
        h, w = img["height"], img["width"]
        seg = ann["segmentation"]
        try:
            if isinstance(seg, list):               # polygons: rasterize, merge the parts
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):   # uncompressed RLE: compress first
                rle = mask_utils.frPyObjects(seg, h, w)
            else:                                   # compressed RLE: pycocotools wants bytes
                rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
            mask = mask_utils.decode(rle)
        except Exception as e:
            raise self._bad(ann, f"bad segmentation, pycocotools could not decode it ({e})") from e
        if mask.shape != (h, w):
            raise self._bad(ann, f"bad segmentation: decodes to {mask.shape}, image is {(h, w)}")
        return mask

    def load_image(self, image_id):
        """(H, W, 3) uint8 RGB; grayscale, palette and RGBA images are converted."""
        info = self.images[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path} (image id {image_id} in "
                                    f"{self.ann_file})") from None
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]} (w x h) but "
                             f"{self.ann_file} says {info['width']}x{info['height']}")
        return image

    # ------------------------------------------------------------------ the data set

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        image_id = self.image_ids[i]
        image = self.load_image(image_id)
        h, w = image.shape[:2]
        objects = [a for a in self.anns[image_id] if not a.get("iscrowd", 0)]
        crowds = [a for a in self.anns[image_id] if a.get("iscrowd", 0)]
        target = {
            "boxes": _xywh_to_xyxy([a["bbox"] for a in objects]),
            "labels": np.array([self.cat_id_to_label[a["category_id"]] for a in objects], np.int64),
            "masks": (np.stack([self.decode_mask(a) for a in objects]) if objects
                      else np.zeros((0, h, w), np.uint8)),
            "crowd_boxes": _xywh_to_xyxy([a["bbox"] for a in crowds]),
            "image_id": int(image_id),
        }
        if self.keypoint_names:
            target["keypoints"] = self._keypoints(objects)
        return image, target

    def _keypoints(self, objects):
        """(N, J, 3) float32 x, y, v; all zeros (v = 0, not labelled) for an object without any."""
        j = len(self.keypoint_names)
        out = np.zeros((len(objects), j, 3), np.float32)
        for i, a in enumerate(objects):
            if a.get("keypoints") and a.get("num_keypoints", 1) > 0:
                out[i] = np.asarray(a["keypoints"], np.float32).reshape(j, 3)
        return out

    @property
    def num_classes(self):
        """K + 1: the classes and background, as the model's ``num_classes``."""
        return len(self.class_names) + 1

    @property
    def coco(self):
        """A pycocotools ``COCO`` of the same file (for COCOeval), built once, without its prints."""
        if not hasattr(self, "_coco"):
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(self.ann_file)
        return self._coco

    def __repr__(self):
        return (f"CocoDataset({self.ann_file!r}, {len(self)} images, {len(self.class_names)} classes, "
                f"train={self.train})")


def _runs_of_rle_string(s):
    """Run lengths of a compressed RLE string (pycocotools' format), or None if it is cut short.

    Each run is written in chunks of 5 bits, one character (value + 48) per chunk, bit 0x20
    meaning "more chunks follow" and bit 0x10 of the last chunk the sign; from the third run on,
    the number stored is the difference to the run two before (zeros-runs and ones-runs each
    vary smoothly down the columns, so the differences are small).  Decoding it here lets us
    reject a corrupt string with a clear message, where pycocotools would silently decode garbage.
    """
    runs, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                return None
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # negative: sign-extend
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _xywh_to_xyxy(bboxes):
    """COCO's [x, y, w, h] to [x1, y1, x2, y2] (width = x2 - x1, no +1), float32 (N, 4)."""
    b = np.array(bboxes, np.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    return b


__all__ = ["CocoDataset"]
