"""Cut a subset of N images out of a COCO annotation file: a small data set to train on one GPU.

The paper trains on COCO train2017 (118k images, Sec. 4) for 90k iterations on 8 GPUs; a model
trained on a few thousand images on one GPU still learns every stage and is a fair ground for
ablations.  ``make_subset`` picks N images at random (seeded: same seed, same subset), keeps
every annotation of those images and *all* the categories (so the labels 1..80 mean the same
classes as on full COCO, even if a rare class has no image in the subset), and puts links to
(or copies of) the image files in ``images/`` beside the new JSON, the layout every minimask
command expects:

    data/coco5k/
        instances_train2017.json     (the subset's annotations)
        images/000000391895.jpg ...  (symbolic links to the originals, or copies)

    minimask data subset --ann annotations/instances_train2017.json --images train2017 \\
        --n 5000 --out data/coco5k

pycocotools reads the file (it indexes annotations by image) and so checks that it is COCO.
"""

import contextlib
import io
import json
import os
import shutil

import numpy as np

from ..nn import atomic_write


def _load_coco(ann_file):
    """pycocotools' COCO index of ``ann_file``, with clear errors for a missing or bad file."""
    from pycocotools.coco import COCO

    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints "loading annotations..."
            coco = COCO(ann_file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{ann_file}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"{ann_file}: not a COCO instances file (no {key!r} list)")
    return coco


def make_subset(ann_file, image_dir, n, out_dir, name=None, seed=0, copy=False, keep_empty=False):
    """Write ``out_dir/<name>.json`` with ``n`` randomly chosen images of ``ann_file`` and their
    annotations, and link (or copy) their files into ``out_dir/images/``.

    ann_file:   a COCO instances JSON (e.g. ``instances_train2017.json``).
    image_dir:  the folder of its images (default: ``images/`` beside ``ann_file``).
    n:          how many images; all of them if the file has fewer.
    name:       the output JSON's name without ``.json`` (default: ``ann_file``'s).
    seed:       the subset is a seeded random draw, sorted by image id.
    copy:       copy the image files instead of making symbolic links.
    keep_empty: also draw images with no (non-crowd) object; by default they are left out, as
                training skips them anyway.
    Returns ``(json_path, counts)`` with counts of images, annotations and categories.
    """
    if int(n) <= 0:
        raise ValueError(f"n must be a positive number of images, got {n}")
    coco = _load_coco(ann_file)
    image_dir = os.fspath(image_dir) if image_dir is not None else os.path.join(
        os.path.dirname(os.path.abspath(ann_file)), "images")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir} (give it with --images)")

    ids = sorted(coco.imgs)
    if not keep_empty:
        ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, []))]
    if not ids:
        raise ValueError(f"{ann_file}: no image with an object to draw from")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(i) for i in rng.choice(ids, size=min(int(n), len(ids)), replace=False))

    images = [coco.imgs[i] for i in chosen]
    missing = [im["file_name"] for im in images
               if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} chosen images are not in {image_dir}, "
                                f"e.g. {', '.join(missing[:3])}")
    annotations = [a for i in chosen for a in coco.imgToAnns.get(i, [])]
    subset = {key: value for key, value in coco.dataset.items()
              if key not in ("images", "annotations")}  # info, licenses, categories: as they were
    subset["images"], subset["annotations"] = images, annotations

    name = name or os.path.splitext(os.path.basename(os.fspath(ann_file)))[0]
    out_images = os.path.join(out_dir, "images")
    os.makedirs(out_images, exist_ok=True)
    for im in images:
        src = os.path.abspath(os.path.join(image_dir, im["file_name"]))
        dst = os.path.join(out_images, im["file_name"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)  # a link or copy from an earlier run
        if copy:
            shutil.copyfile(src, dst)
        else:
            os.symlink(src, dst)
    json_path = os.path.join(out_dir, name + ".json")
    with atomic_write(json_path, "w") as f:  # never a half-written annotation file
        json.dump(subset, f)
    counts = {"images": len(images), "annotations": len(annotations),
              "categories": len(subset["categories"])}
    return json_path, counts


__all__ = ["make_subset"]
