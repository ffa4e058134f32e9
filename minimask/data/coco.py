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
bad one is reported at once, with the file and the annotation id, not hours into training; the
few degenerate ones real exports hold are dropped and counted instead (``CocoDataset``).  Image
files are checked all at once by ``check_images`` (header reads, ``image_problem``), and an image
that still fails when it is read (changed on disk since) raises the same ``BadImagesError``.
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


class BadImagesError(ValueError):
    """Image files that cannot be used, all of them in one message: ``problems`` is a list of
    ``(path, image_id, what is wrong)`` (``image_id`` None for a file given by name), ``source``
    the annotation file that lists them (or None).  A ``ValueError``, so the command prints it.
    Past ``MAX_LISTED`` files the message counts the rest by kind of problem (``problems`` keeps
    them all)."""

    MAX_LISTED = 200

    def __init__(self, source, problems, hint=""):
        self.source, self.problems = source, list(problems)

        def where(path, image_id, in_source):
            if image_id is None:
                return path
            return f"{path} (image id {image_id}{f' in {source}' if in_source and source else ''})"

        if len(self.problems) == 1:
            (path, image_id, what), = self.problems
            text = f"{where(path, image_id, True)}: {what}"
        else:
            lines = [f"  {where(p, i, False)}: {w}" for p, i, w in self.problems[:self.MAX_LISTED]]
            rest = self.problems[self.MAX_LISTED:]
            if rest:
                kinds = {}
                for _, _, w in rest:  # "damaged or cut short (why)", "is 64x48 pixels ... JSON says ..."
                    kind = "of another size than the JSON says" if w.startswith("is ") else w.split(" (")[0]
                    kinds[kind] = kinds.get(kind, 0) + 1
                counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
                lines.append(f"  ... and {len(rest)} more: {counts}")
            head = f"{len(self.problems)} images cannot be used:"
            text = "\n".join([f"{source}: {head}" if source else head] + lines)
        super().__init__(text + hint)


def image_problem(path, width=None, height=None):
    """What is wrong with the image file ``path`` (None if nothing), read as cheaply as Pillow
    allows: the header (format and size), then ``verify()``, which for PNG walks the chunks and
    checks their CRCs without decompressing; a JPEG has no such check, so its last bytes are
    searched for the end-of-image marker and only a file without one is decoded in full.

    ``width`` and ``height``, if given, are what the annotation JSON says the image is.
    """
    from PIL import UnidentifiedImageError

    if not os.path.isfile(path):
        return "file not found"
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            im.verify()
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds (SyntaxError, OSError, struct.error)
        return f"damaged or cut short ({type(e).__name__}: {e})"
    if width is not None and size != (width, height):
        return f"is {size[0]}x{size[1]} pixels (width x height) but the JSON says {width}x{height}"
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read()
        if b"\xff\xd9" not in tail:  # no end marker near the end: cut short? decode to be sure
            try:
                with Image.open(path) as im:
                    im.load()
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001
                return f"damaged or cut short ({type(e).__name__}: {e})"
    return None


class CocoDataset:
    """Images and instance annotations of one COCO JSON file.

    ann_file:  the annotation JSON.
    image_dir: folder of the images (default: ``images/`` beside ``ann_file``).
    train:     if True, images with no usable (non-crowd) object are skipped, since they teach
               the heads nothing (as torchvision's reference scripts do); evaluation keeps
               every image, because COCOeval counts them.
    min_box_size: boxes narrower or lower than this (in pixels, after clipping to the image)
               are dropped.
    masks:     decode the segmentations into ``masks``: True (a mask model: refused, with the
               setting that trains boxes only, if the file has no segmentation at all), False
               (boxes only: none decoded, none needed), None (if the file has any).

    What is wrong in the file is sorted when it is loaded (``notes`` says what was done):

    - *structural* errors stop with the file, the annotation or image id and the problem: an
      unknown image or category id, a duplicate image or category id, a non-finite number, an
      RLE whose size is not its image's, a malformed box or polygon;
    - *degenerate* annotations, which real exports hold a few of, are dropped and counted: a
      box under ``min_box_size`` once clipped to its image, a polygon of fewer than three points
      or no area, an empty segmentation or mask, an object without one in a file that has them;
    - boxes reaching past their image are clipped to it (as torchvision and Detectron2 do).

    Image files are not opened here: ``check_images`` checks them all at once.
    """

    def __init__(self, ann_file, image_dir=None, train=True, min_box_size=1.0, masks=None):
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir) if image_dir is not None else os.path.join(
            os.path.dirname(os.path.abspath(self.ann_file)), "images")
        self.train = train
        self.min_box_size = float(min_box_size)
        self.notes = []                # what loading repaired or dropped, one line each
        self.skipped_images = []       # image ids dropped by check_images(skip=True)
        data = self._load_json()

        # categories: sorted ids -> labels 1..K
        cats = self._list(data, "categories")
        if not cats:
            raise ValueError(f"{self.ann_file}: no 'categories' listed")
        seen = set()
        for c in cats:
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise ValueError(f"{self.ann_file}: category {c!r} has no whole-number 'id'")
            if c["id"] in seen:
                raise ValueError(f"{self.ann_file}: category id {c['id']} is listed twice")
            seen.add(c["id"])
        cats = sorted(cats, key=lambda c: c["id"])
        self.cat_id_to_label = {c["id"]: k + 1 for k, c in enumerate(cats)}
        self.label_to_cat_id = {k + 1: c["id"] for k, c in enumerate(cats)}
        self.class_names = tuple(str(c.get("name", c["id"])) for c in cats)  # of labels 1..K
        self._keypoint_categories(cats)

        self.images = {}
        for img in self._list(data, "images"):
            self._check_image_entry(img)
            if img["id"] in self.images:
                raise ValueError(f"{self.ann_file}: image id {img['id']!r} is listed twice (file_name "
                                 f"{self.images[img['id']]['file_name']!r} and {img['file_name']!r}); "
                                 f"image ids must be unique")
            self.images[img["id"]] = img

        annotations = self._list(data, "annotations")
        for ann in annotations:
            self._check(ann)
        objects = [a for a in annotations if not a.get("iscrowd", 0)]
        self.has_masks = any(_has_segmentation(a) for a in objects)
        if masks and objects and not self.has_masks:
            raise ValueError(f"{self.ann_file}: its {len(objects)} annotations have boxes but no "
                             f"segmentation, so a mask model has nothing to learn; to train boxes only "
                             f"(Faster R-CNN), use --set mask_on=False")
        self.masks = self.has_masks if masks is None else bool(masks)

        # annotations grouped per image: clipped to the image, degenerate ones dropped (counted)
        self.anns = {image_id: [] for image_id in self.images}
        dropped, clipped = {}, 0
        for ann in annotations:
            ann, why, was_clipped = self._repair(ann)
            clipped += was_clipped
            if why is not None:
                dropped.setdefault(why, []).append(ann.get("id"))
                continue
            self.anns[ann["image_id"]].append(ann)
        if clipped:
            self._note(f"{self.ann_file}: clipped {clipped} boxes reaching past their image to it")
        if dropped:
            ids = [i for group in dropped.values() for i in group]
            kinds = ", ".join(f"{len(v)} {k}" for k, v in dropped.items())
            self._note(f"{self.ann_file}: dropped {len(ids)} of {len(annotations)} annotations as degenerate "
                       f"({kinds}); first ids: {', '.join(str(i) for i in ids[:5])}")

        ids = sorted(self.images)
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.anns[i])]
            skipped = len(self.images) - len(ids)
            if skipped:
                self._note(f"{self.ann_file}: skipped {skipped} images with no objects (train=True)")
        self.image_ids = ids

    # ------------------------------------------------------------------ loading and checks

    def _note(self, text):
        self.notes.append(text)
        log.info("%s", text)

    def _load_json(self):
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}") from None
        except IsADirectoryError:
            raise ValueError(f"{self.ann_file}: a folder, not an annotation JSON file") from None
        except UnicodeDecodeError:
            raise ValueError(f"{self.ann_file}: not a text file (expected a COCO annotation JSON)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{self.ann_file}: not a COCO annotation file (no 'images' list)")
        return data

    def _list(self, data, key):
        value = data.get(key, [])
        if not isinstance(value, list):
            raise ValueError(f"{self.ann_file}: '{key}' must be a list, got {type(value).__name__}")
        return value

    def _check_image_entry(self, img):
        if not isinstance(img, dict):
            raise ValueError(f"{self.ann_file}: image entry {img!r} is not an object")
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise ValueError(f"{self.ann_file}: image entry {img!r} has no {key!r}")
        if not _is_int(img["id"]):
            raise ValueError(f"{self.ann_file}: image id {img['id']!r} is not a whole number")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{self.ann_file}: image id {img['id']}: file_name {img['file_name']!r} "
                             f"is not a file name")
        for key in ("height", "width"):
            if not _is_int(img[key]) or img[key] <= 0:
                raise ValueError(f"{self.ann_file}: image id {img['id']}: {key} {img[key]!r} is not a "
                                 f"positive whole number")

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
        """Raise a ValueError naming the file and annotation id for a structural error: data that
        is wrong, not merely degenerate (those ``_repair`` drops)."""
        if not isinstance(ann, dict):
            raise ValueError(f"{self.ann_file}: annotation {ann!r} is not an object")
        if ann.get("image_id") not in self.images:
            raise self._bad(ann, "unknown image_id (no image with that id in 'images')")
        if ann.get("category_id") not in self.cat_id_to_label:
            raise self._bad(ann, f"unknown category_id {ann.get('category_id')!r} "
                                 f"(categories: {sorted(self.cat_id_to_label)})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise self._bad(ann, f"bad bbox {bbox!r} (expected [x, y, w, h], four numbers)")
        if not all(math.isfinite(v) for v in bbox):
            raise self._bad(ann, f"bad bbox {bbox!r}: a number that is not finite")
        if bbox[2] < 0 or bbox[3] < 0:
            raise self._bad(ann, f"bad bbox {bbox!r} (expected [x, y, w, h], w and h >= 0)")
        img = self.images[ann["image_id"]]
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            for p in seg:
                if not isinstance(p, list) or len(p) % 2 or not all(_is_number(v) for v in p):
                    raise self._bad(ann, "bad segmentation: polygons must be lists of x, y pairs")
                if not all(math.isfinite(v) for v in p):
                    raise self._bad(ann, "bad segmentation: a polygon holds a number that is not finite")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if list(size or []) != [img["height"], img["width"]]:
                raise self._bad(ann, f"bad segmentation: RLE size {size!r} is not the image's "
                                     f"[height, width] [{img['height']}, {img['width']}]")
            if isinstance(counts, list):
                if not all(_is_int(v) and v >= 0 for v in counts):
                    raise self._bad(ann, "bad segmentation: uncompressed RLE counts must be whole numbers "
                                         ">= 0")
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
        elif seg is not None:
            raise self._bad(ann, f"bad segmentation {type(seg).__name__} (expected polygons or RLE)")
        kp = ann.get("keypoints")
        if kp is not None and self.keypoint_names:
            j = len(self.keypoint_names)
            if (not isinstance(kp, list) or len(kp) != 3 * j
                    or not all(_is_number(v) and math.isfinite(v) for v in kp)):
                raise self._bad(ann, f"bad keypoints: expected {3 * j} finite numbers (x, y, v for each of "
                                     f"the {j} keypoints of the category)")
            if any(v not in (0, 1, 2) for v in kp[2::3]):
                raise self._bad(ann, "bad keypoints: visibility flags must be 0, 1 or 2")

    def _repair(self, ann):
        """``(annotation, why it is dropped or None, clipped)`` for a checked annotation.

        The box is clipped to the image; only a box that changes gets a new (x, y, w, h), so a
        box inside its image is kept to the bit.  Crowd regions keep their segmentation as
        given (only their box is used in training)."""
        img = self.images[ann["image_id"]]
        width, height = img["width"], img["height"]
        x, y, w, h = ann["bbox"]
        x1, y1 = min(max(x, 0), width), min(max(y, 0), height)
        x2, y2 = min(max(x + w, 0), width), min(max(y + h, 0), height)
        clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
        if clipped:
            ann = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1], _xyxy=[x1, y1, x2, y2])
        if ann.get("iscrowd", 0):
            return ann, None, clipped
        if x2 - x1 < self.min_box_size or y2 - y1 < self.min_box_size:
            return ann, f"boxes under {self.min_box_size:g} px once clipped to the image", clipped
        if not self.masks:
            return ann, None, clipped
        seg = ann.get("segmentation")
        if seg is None:
            return ann, "without a segmentation", clipped
        if isinstance(seg, list):
            if not seg:
                return ann, "with an empty segmentation", clipped
            parts = [p for p in seg if len(p) >= 6 and _polygon_area(p) > 0]
            if not parts:
                return ann, "polygons of fewer than 3 points or no area", clipped
            if len(parts) < len(seg):  # pycocotools would read a 4-number part as a box
                ann = dict(ann, segmentation=parts)
        else:
            counts = seg["counts"]
            runs = counts if isinstance(counts, list) else _runs_of_rle_string(counts)
            if sum(runs[1::2]) == 0:
                return ann, "with an empty mask", clipped
        return ann, None, clipped

    def check_images(self, skip=False, progress=True, log=print,
                     hint="\nfix or remove them, or skip them with --set skip_bad_images=True"):
        """Open every image of the data set (``image_ids``) and check it (``image_problem``):
        there, an image, the size the JSON says.  All problems are raised together in one
        ``BadImagesError``; with ``skip``, the bad images are dropped instead (counted in the log,
        kept out of ``coco`` too, so evaluation does not count them as missed).  Returns the
        ``(path, image_id, problem)`` list; ``hint`` ends the error (what to do about it)."""
        if self.image_ids and not os.path.isdir(self.image_dir):  # one line, not one per image
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (the images of "
                                    f"{self.ann_file}; default: images/ beside it)")
        ids = self.image_ids
        if progress and len(ids) >= 1000:
            from tqdm import tqdm

            ids = tqdm(ids, desc=f"checking {os.path.basename(self.ann_file)} images", unit="img",
                       leave=False)
        problems = []
        for image_id in ids:
            info = self.images[image_id]
            path = os.path.join(self.image_dir, info["file_name"])
            what = image_problem(path, info["width"], info["height"])
            if what is not None:
                problems.append((path, image_id, what))
        if problems and not skip:
            raise BadImagesError(self.ann_file, problems, hint)
        if problems:
            bad = {image_id for _, image_id, _ in problems}
            self.image_ids = [i for i in self.image_ids if i not in bad]
            self.skipped_images += sorted(bad)
            self.__dict__.pop("_coco", None)
            log(f"{self.ann_file}: skipped {len(bad)} bad image files (skip_bad_images=True), "
                f"{len(self.image_ids)} images left; first: " +
                "; ".join(f"{p} ({w})" for p, _, w in problems[:3]))
        return problems

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
        """(H, W, 3) uint8 RGB; grayscale, palette and RGBA images are converted.

        A file that cannot be read raises a ``BadImagesError`` naming it (``FileNotFoundError``
        if it is gone): the same message as ``check_images``, also when it happens in the data
        loader's thread, for a file that changed after the check."""
        from PIL import UnidentifiedImageError

        info = self.images[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path} (image id {image_id} in "
                                    f"{self.ann_file})") from None
        except UnidentifiedImageError:
            raise BadImagesError(self.ann_file, [(path, image_id, "not an image Pillow can read")]) from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated data, a bad chunk, ...: name the file
            raise BadImagesError(self.ann_file, [(path, image_id, f"damaged or cut short "
                                                                  f"({type(e).__name__}: {e})")]) from None
        if image.shape[:2] != (info["height"], info["width"]):
            what = (f"is {image.shape[1]}x{image.shape[0]} pixels (width x height) but the JSON says "
                    f"{info['width']}x{info['height']}")
            raise BadImagesError(self.ann_file, [(path, image_id, what)])
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
            "boxes": _boxes(objects),
            "labels": np.array([self.cat_id_to_label[a["category_id"]] for a in objects], np.int64),
            "crowd_boxes": _boxes(crowds),
            "image_id": int(image_id),
        }
        if self.masks:
            target["masks"] = (np.stack([self.decode_mask(a) for a in objects]) if objects
                               else np.zeros((0, h, w), np.uint8))
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
                coco = COCO(self.ann_file)
                if self.skipped_images:  # bad files skipped: not images the model failed on
                    drop = set(self.skipped_images)
                    coco.dataset["images"] = [i for i in coco.dataset["images"] if i["id"] not in drop]
                    coco.dataset["annotations"] = [a for a in coco.dataset.get("annotations", [])
                                                   if a["image_id"] not in drop]
                    coco.createIndex()
            self._coco = coco
        return self._coco

    def __repr__(self):
        return (f"CocoDataset({self.ann_file!r}, {len(self)} images, {len(self.class_names)} classes, "
                f"train={self.train})")


def _runs_of_rle_string(s):
    """Run lengths of a compressed RLE string (pycocotools' format), or None if it is cut short.

    Each run is written in chunks of 5 bits, one character (value + 48) per chunk, bit 0x20
    meaning "more chunks follow" and bit 0x10 of the last chunk the sign; from the fourth run on
    (index 3, as pycocotools' ``rleFrString``: ``m > 2``), the number stored is the difference to
    the run two before (zeros-runs and ones-runs each
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


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _has_segmentation(ann):
    seg = ann.get("segmentation")
    return isinstance(seg, dict) or (isinstance(seg, list) and len(seg) > 0)


def _polygon_area(p):
    """Area of a polygon ``[x1, y1, x2, y2, ...]`` by the shoelace formula."""
    x, y = np.asarray(p[0::2], np.float64), np.asarray(p[1::2], np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _boxes(anns):
    """xyxy float32 (N, 4) of annotations; a box clipped to its image comes from its clipped
    corners (``_repair``), the others from COCO's x, y, w, h as given."""
    b = _xywh_to_xyxy([a["bbox"] for a in anns])
    for i, a in enumerate(anns):
        if "_xyxy" in a:
            b[i] = a["_xyxy"]
    return b


def _xywh_to_xyxy(bboxes):
    """COCO's [x, y, w, h] to [x1, y1, x2, y2] (width = x2 - x1, no +1), float32 (N, 4)."""
    b = np.array(bboxes, np.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    return b


__all__ = ["CocoDataset", "BadImagesError", "image_problem"]
