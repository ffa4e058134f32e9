"""Synthetic shapes: a small COCO-format instance-segmentation data set made on the fly.

Mask R-CNN (Sec. 3) learns three things per object: its class, its box and its mask.  To watch
it learn on a CPU in minutes we need a data set where all three are clear but not trivial:

- textured backgrounds (colour gradients, smooth noise, stripes), so the network cannot just
  threshold the background colour;
- 1 to 6 objects per image of three classes (circle, triangle, square; squares may be stretched
  into rectangles and every shape may be rotated), random colours, sizes and positions;
- objects drawn in order, so later ones occlude earlier ones; the masks are of the *visible*
  parts, as COCO's are;
- annotations in both of COCO's mask formats: a polygon where the object is whole, a
  compressed RLE (run-length encoding) where occlusion cut it (COCO itself keeps RLE for crowd
  regions and uses polygons for ordinary objects, occluded or not), ``area`` the mask's pixel count,
  ``bbox`` the visible mask's ``[x, y, w, h]``, ``iscrowd`` 0.

Every shape is a polygon (a circle is a many-sided one) and its mask is made by pycocotools'
own rasterizer from the very coordinates written to the JSON, so decoding a polygon gives back
exactly the mask that was drawn (the tests check this for every annotation).

Each image is drawn from its own generator seeded by ``(seed, split, index)``: the same seed
gives the same files byte for byte, and image 7 does not change when you ask for more images.

    minimask data shapes --out data/shapes --train 1000 --val 200 --seed 0 --size 128
"""

import json
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

CLASSES = ("circle", "triangle", "square")
SPLITS = {"train": 0, "val": 1}  # split number, part of each image's seed

MIN_VISIBLE_FRACTION = 0.3  # an object must keep this much of itself visible ...
MIN_VISIBLE_AREA = 24       # ... and at least this many pixels (at 128 px; scaled with size)
MIN_CONTRAST = 90.0         # RGB distance between an object and what lies under it


# ---------------------------------------------------------------- backgrounds

def _random_colour(rng):
    return rng.integers(0, 256, size=3).astype(np.float32)


def background(rng, size):
    """A (size, size, 3) float32 background: gradient, smooth noise or stripes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == 0:  # linear gradient between two colours along a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif kind == 1:  # smooth noise: a coarse random grid blown up (nearest, then box-blurred)
        cells = int(rng.integers(3, 9))
        grid = rng.random((cells, cells)).astype(np.float32)
        rep = -(-size // cells)  # ceil
        t = np.kron(grid, np.ones((rep, rep), np.float32))[:size, :size]
        t = _box_blur(t, max(1, rep // 2))
    else:  # soft stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    return c1 + t[..., None] * (c2 - c1)


def _box_blur(a, r):
    """Mean over a (2r+1)^2 window (edges clamped), via cumulative sums: smooths the noise."""
    p = np.pad(a, r, mode="edge")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    h, w = a.shape
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)


# ---------------------------------------------------------------- shapes as polygons

def polygon(rng, cls, size):
    """Vertices (V, 2) of a random shape of class ``cls`` that fits inside the image."""
    s = size / 128.0
    r = rng.uniform(9, 26) * s  # "radius": distance from the centre to the farthest vertex
    if cls == "circle":
        # enough sides that no corner shows at this radius (about one per 1.5 px of perimeter)
        n = int(min(64, max(16, 2 * math.pi * r / 1.5)))
        t = np.arange(n) * (2 * math.pi / n)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif cls == "triangle":
        # three corners around the centre, each jittered so triangles are not all equilateral
        t = np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.35, 0.35, size=3)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    else:  # "square": a rectangle with aspect in [1, 1.6], rotated by any angle
        aspect = rng.uniform(1.0, 1.6)
        half = r / math.sqrt(1 + aspect ** 2)
        pts = np.array([[-aspect, -1], [aspect, -1], [aspect, 1], [-aspect, 1]]) * half
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T
    # place the centre so the whole shape lies inside the image (1 px margin)
    lo = -pts.min(0) + 1
    hi = size - 1 - pts.max(0)
    centre = rng.uniform(lo, np.maximum(hi, lo))
    # round to 2 decimals *before* drawing: the JSON holds exactly these numbers
    return np.round(pts + centre, 2)


def rasterize(poly, size):
    """Mask (size, size) uint8 of a polygon, by pycocotools, as any COCO reader would decode it."""
    rle = mask_utils.frPyObjects([poly.ravel().tolist()], size, size)
    return mask_utils.decode(mask_utils.merge(rle))


# ---------------------------------------------------------------- one image

def make_image(rng, size=128, max_objects=6):
    """Draw one image. Returns (image uint8 (size, size, 3), objects), where each object is a
    dict with ``label`` (1..3), ``polygon`` (V, 2), ``full`` (its whole mask) and ``visible``.

    Objects are placed one at a time.  A new object must differ in colour from what lies under
    it, and must not bury any earlier object below ``MIN_VISIBLE_*``: a candidate that would is
    redrawn (a few tries) or dropped, so every object left is clearly visible and every visible
    shape is annotated.
    """
    image = background(rng, size)
    min_area = MIN_VISIBLE_AREA * (size / 128.0) ** 2
    objects = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(wanted):
        for _try in range(10):
            label = int(rng.integers(len(CLASSES))) + 1
            poly = polygon(rng, CLASSES[label - 1], size)
            full = rasterize(poly, size).astype(bool)
            if full.sum() < 2 * min_area:
                continue
            # would it bury an earlier object?
            ok = all(
                (o["visible"] & ~full).sum() >= max(min_area, MIN_VISIBLE_FRACTION * o["full"].sum())
                for o in objects
            )
            if not ok:
                continue
            colour = contrasting_colour(rng, image[full])
            break
        else:
            continue  # no good place found: drop this object
        for o in objects:
            o["visible"] &= ~full
        # flat colour with a gentle shading ramp, so objects are not perfectly uniform
        yy, xx = np.nonzero(full)
        ramp = rng.uniform(-25, 25) * ((xx - xx.mean()) / (np.ptp(xx) + 1))
        image[yy, xx] = colour + ramp[:, None]
        objects.append({"label": label, "polygon": poly, "full": full, "visible": full.copy()})
    # sensor noise over everything
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def contrasting_colour(rng, under):
    """A random colour far (in RGB) from the mean of the pixels ``under`` it; best of 30 tries."""
    mean = under.mean(0)
    best, best_d = None, -1.0
    for _ in range(30):
        c = _random_colour(rng)
        d = float(np.linalg.norm(c - mean))
        if d >= MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


# ---------------------------------------------------------------- annotations

def annotate(obj, image_id, ann_id):
    """The COCO annotation of one drawn object: polygon if whole, compressed RLE if occluded."""
    visible = obj["visible"]
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    if (visible == obj["full"]).all():
        segmentation = [obj["polygon"].ravel().tolist()]
    else:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["label"],
        "segmentation": segmentation,
        "area": float(visible.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],  # x, y, w, h of the visible mask
        "iscrowd": 0,
    }


def write_split(out_dir, split, count, seed, size, draw, annotate, categories, description, salt=()):
    """Draw ``count`` images with ``draw(rng, size) -> (image, objects)``, save them as PNGs in
    ``out_dir/images/`` and their annotations (``annotate(obj, image_id, ann_id)``) with
    ``categories`` in ``out_dir/{split}.json``; return the JSON's path.  Image i's generator is
    seeded by ``(seed, split, i, *salt)``, so any image can be redrawn alone."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {list(SPLITS)}")
    if count < 0:
        raise ValueError(f"{split}: image count must be >= 0, got {count}")
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = draw(np.random.default_rng([seed, SPLITS[split], i, *salt]), size)
        image_id = i + 1
        file_name = f"{split}_{i:06d}.png"
        Image.fromarray(image).save(os.path.join(image_dir, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            annotations.append(annotate(obj, image_id, len(annotations) + 1))
    data = {"info": {"description": f"{description}, split {split}, seed {seed}, size {size}"},
            "images": images, "annotations": annotations, "categories": categories}
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def make_split(out_dir, split, count, seed=0, size=128):
    """Write ``count`` images to ``out_dir/images/`` and ``out_dir/{split}.json``; return the path."""
    if size < 32:
        raise ValueError(f"image size {size} is too small for shapes; use 32 or more")
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASSES)]
    return write_split(out_dir, split, count, seed, size, make_image, annotate, categories,
                       "minimask synthetic shapes")


def make_shapes(out_dir, train=1000, val=200, seed=0, size=128):
    """Write the train and val splits; return ``(train_json, val_json)``."""
    return (make_split(out_dir, "train", train, seed, size),
            make_split(out_dir, "val", val, seed, size))


__all__ = ["CLASSES", "make_image", "annotate", "write_split", "make_split", "make_shapes", "background",
           "polygon", "rasterize", "contrasting_colour"]
