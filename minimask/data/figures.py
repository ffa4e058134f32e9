"""Synthetic stick figures: a small COCO-format *keypoint* data set made on the fly (Sec. 5).

The paper's pose model learns, for every person, where each of its K keypoints is (Sec. 5,
"Mask R-CNN for Human Pose Estimation").  COCO's people are too slow to learn from on a CPU, so
this file draws a stand-in whose joints are clear but not trivial to find:

- a stick figure (class ``figure``) of 11 named joints, ``KEYPOINT_NAMES``: head, neck, elbows,
  hands, hip, knees, feet, in random poses (arms and legs swing and bend, the torso leans, the
  whole figure tilts), sizes and places; thick limbs, so the figure has an area and a mask;
- the figure faces the viewer, so its left limbs are (mostly) on the image's right, and they
  are drawn a darker shade than the right ones (as pose drawings colour left and right apart).
  Two cues, then, and a left-right flip cannot keep both: renaming left and right after the
  flip keeps the position cue but makes the *lighter* limbs the left ones.  This is why the
  ``figures`` preset trains without flips;
- distractors from ``shapes`` (circle, triangle, square: classes 2..4) on the same textured
  backgrounds; everything is drawn in random order, so a later object hides what it covers;
- joints written as COCO writes them: ``keypoints`` = [x1, y1, v1, x2, y2, v2, ...] with
  v = 2 visible, v = 1 labelled but hidden (under a later object), v = 0 not labelled (outside
  the image; x = y = 0 then), and ``num_keypoints`` the count of v > 0;
- the ``figure`` category carries ``keypoints`` (the names), ``skeleton`` (1-based pairs of
  joints joined by a limb, for drawings) and, minimask's addition, ``keypoint_sigmas``: the OKS
  falloff per joint for COCOeval (see ``KEYPOINT_SIGMAS``).

The mask of a figure is its visible body (always written as compressed RLE), ``bbox`` the box
of that mask, ``area`` its pixel count (OKS scales its tolerance by this area, as on COCO).
Each image is drawn from its own generator seeded by ``(seed, split, index)``: same seed, same
files byte for byte.

    minimask data figures --out data/figures --train 4000 --val 200 --seed 0 --size 128
"""

import math

import numpy as np
import pycocotools.mask as mask_utils

from .shapes import CLASSES as SHAPE_CLASSES
from .shapes import background, contrasting_colour, polygon, rasterize, write_split  # shared drawing

CLASSES = ("figure",) + SHAPE_CLASSES

KEYPOINT_NAMES = ("head", "neck", "left_elbow", "right_elbow", "left_hand", "right_hand", "hip",
                  "left_knee", "right_knee", "left_foot", "right_foot")
# Limbs (1-based joint indices, COCO's convention).
SKELETON = ((1, 2), (2, 3), (3, 5), (2, 4), (4, 6), (2, 7), (7, 8), (8, 10), (7, 9), (9, 11))
# OKS sigmas: COCO's value for the nearest human joint (shoulders for head and neck, elbows,
# wrists for hands, hips, knees, ankles for feet).  The head here is a disc centre, as well
# defined as a shoulder, not an eye (COCO's eyes and nose have 0.025).
KEYPOINT_SIGMAS = (0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.087, 0.087, 0.089, 0.089)

MIN_VISIBLE_FRACTION = 0.5   # an object keeps at least half of itself visible
MIN_VISIBLE_AREA = 40        # and this many pixels (at 128 px; scaled with the size)
OUTSIDE_PROB = 0.25          # chance that a figure may stand partly outside the image


# ---------------------------------------------------------------- a pose

def _unit(angle):
    """Unit vector at ``angle`` radians from straight down (y grows downwards), towards +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def random_pose(rng, height):
    """Joints (11, 2) of a figure about ``height`` px tall with its neck at (0, 0), and the
    thickness of its limbs.  Angles are measured from straight down; a positive angle swings
    towards +x, which is the figure's *left* (it faces the viewer)."""
    h = height
    lean = rng.uniform(-0.25, 0.25)                       # torso lean
    neck = np.zeros(2)
    hip = neck + 0.33 * h * _unit(lean)
    head = neck - 0.15 * h * _unit(lean + rng.uniform(-0.35, 0.35))
    joints = {"head": head, "neck": neck, "hip": hip}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        upper = sign * rng.uniform(0.15, 2.6)               # arm: from hanging to raised
        bend = sign * rng.uniform(-0.3, 1.8)                # elbow bends the forearm outwards
        elbow = neck + 0.2 * h * _unit(lean + upper)
        joints[f"{side}_elbow"] = elbow
        joints[f"{side}_hand"] = elbow + 0.18 * h * _unit(lean + upper + bend)
        thigh = sign * rng.uniform(0.05, 0.8)               # leg: from straight to spread
        knee_bend = -sign * rng.uniform(0.0, 1.0)           # knees bend back towards the middle
        knee = hip + 0.25 * h * _unit(lean + thigh)
        joints[f"{side}_knee"] = knee
        joints[f"{side}_foot"] = knee + 0.24 * h * _unit(lean + thigh + knee_bend)
    points = np.stack([joints[n] for n in KEYPOINT_NAMES])
    tilt = rng.uniform(-0.35, 0.35)                        # the whole figure tilts a little
    rot = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    return points @ rot.T, max(2.5, 0.075 * h)


def _segment(p, q, width):
    """A rectangle polygon (4, 2) of the given width from p to q (a limb)."""
    d = q - p
    n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9) * (width / 2)
    return np.stack([p + n, q + n, q - n, p - n])


def _disc(c, r, sides=16):
    t = np.arange(sides) * (2 * math.pi / sides)
    return c + r * np.stack([np.cos(t), np.sin(t)], 1)


def figure_parts(points, thickness):
    """The figure as polygons, grouped by colour: ("body" | "left" | "right", [polygons])."""
    j = {n: points[i] for i, n in enumerate(KEYPOINT_NAMES)}
    height = np.linalg.norm(j["hip"] - j["neck"]) / 0.33
    body = [_disc(j["head"], 0.1 * height), _segment(j["neck"], j["hip"], 2 * thickness),
            _segment(j["head"], j["neck"], thickness)]
    parts = [("body", body)]
    for side in ("left", "right"):
        polys = [_segment(j["neck"], j[f"{side}_elbow"], thickness),
                 _segment(j[f"{side}_elbow"], j[f"{side}_hand"], thickness),
                 _segment(j["hip"], j[f"{side}_knee"], thickness),
                 _segment(j[f"{side}_knee"], j[f"{side}_foot"], thickness)]
        # round joints: a disc at each bend and end, so limbs join without notches
        polys += [_disc(j[f"{side}_{n}"], thickness / 2, 8) for n in ("elbow", "hand", "knee", "foot")]
        parts.append((side, polys))
    return parts


def _union(polys, size):
    mask = np.zeros((size, size), bool)
    for poly in polys:
        mask |= rasterize(np.round(poly, 2), size).astype(bool)
    return mask


# ---------------------------------------------------------------- one image

def _place_figure(rng, size):
    """Joints (in image pixels), limb thickness and the colour masks of one random figure."""
    s = size / 128.0
    points, thickness = random_pose(rng, rng.uniform(50, 100) * s)
    lo, hi = points.min(0), points.max(0)
    margin = -0.3 * (hi - lo) if rng.random() < OUTSIDE_PROB else np.full(2, 2.0)
    low = margin - lo                       # top-left corner that keeps the figure (mostly) in
    high = size - margin - hi
    offset = rng.uniform(low, np.maximum(high, low))
    points = np.round(points + offset, 2)
    parts = [(kind, _union(polys, size)) for kind, polys in figure_parts(points, thickness)]
    return points, parts


def make_image(rng, size=128, max_figures=3, max_distractors=3):
    """Draw one image.  Returns (image uint8 (size, size, 3), objects); each object is a dict
    with ``label`` (1 figure, 2..4 shapes), ``full`` and ``visible`` masks, and for figures
    ``points`` (11, 2) and ``hidden`` (11,) bool: the joint is covered by a later object."""
    image = background(rng, size)
    min_area = MIN_VISIBLE_AREA * (size / 128.0) ** 2
    labels = [1] * int(rng.integers(1, max_figures + 1))
    distractors = int(rng.integers(0, max_distractors + 1))
    labels += [int(rng.integers(2, len(CLASSES) + 1)) for _ in range(distractors)]
    rng.shuffle(labels)
    objects = []
    for label in labels:
        for _try in range(10):
            if label == 1:
                points, parts = _place_figure(rng, size)
                full = parts[0][1] | parts[1][1] | parts[2][1]
            else:
                poly = polygon(rng, CLASSES[label - 1], size)
                full = rasterize(poly, size).astype(bool)
            if full.sum() < 2 * min_area:
                continue
            if all((o["visible"] & ~full).sum() >= max(min_area, MIN_VISIBLE_FRACTION * o["full"].sum())
                   for o in objects):
                break
        else:
            continue  # no place found that keeps every earlier object visible: drop this one
        colour = contrasting_colour(rng, image[full])
        for o in objects:  # what the new object covers is hidden from now on
            o["visible"] &= ~full
            if "points" in o:
                o["hidden"] |= _covers(full, o["points"])
        obj = {"label": label, "full": full, "visible": full.copy()}
        if label == 1:
            # head and torso in the figure's colour, left limbs darker, right limbs lighter
            shades = {"body": colour, "left": 0.45 * colour, "right": 0.45 * colour + 140}
            for kind, mask in parts:
                image[mask] = shades[kind]
            obj.update(points=points, hidden=np.zeros(len(points), bool))
        else:
            yy, xx = np.nonzero(full)
            ramp = rng.uniform(-25, 25) * ((xx - xx.mean()) / (np.ptp(xx) + 1))
            image[yy, xx] = colour + ramp[:, None]
        objects.append(obj)
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _covers(mask, points):
    """For each point, whether ``mask`` covers the pixel it lies in (False outside the image)."""
    size = mask.shape[0]
    ij = np.floor(points).astype(int)
    inside = ((ij >= 0) & (ij < size)).all(1)
    out = np.zeros(len(points), bool)
    out[inside] = mask[ij[inside, 1], ij[inside, 0]]
    return out


# ---------------------------------------------------------------- annotations

def keypoint_triplets(points, hidden, size):
    """COCO's flat [x, y, v, ...] for one figure: v = 2 visible, 1 hidden, 0 outside the image."""
    out = []
    for (x, y), h in zip(points, hidden):
        if not (0 <= x < size and 0 <= y < size):
            out += [0.0, 0.0, 0]
        else:
            out += [float(x), float(y), 1 if h else 2]
    return out


def annotate(obj, image_id, ann_id, size):
    visible = obj["visible"]
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    ann = {
        "id": ann_id, "image_id": image_id, "category_id": obj["label"],
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(visible.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }
    if "points" in obj:
        kp = keypoint_triplets(obj["points"], obj["hidden"], size)
        ann["keypoints"] = kp
        ann["num_keypoints"] = int(sum(v > 0 for v in kp[2::3]))
    return ann


def categories():
    """The COCO category list: ``figure`` with its keypoints, then the three shapes."""
    cats = [{"id": 1, "name": "figure", "supercategory": "figure", "keypoints": list(KEYPOINT_NAMES),
             "skeleton": [list(p) for p in SKELETON], "keypoint_sigmas": list(KEYPOINT_SIGMAS)}]
    cats += [{"id": k + 2, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPE_CLASSES)]
    return cats


def make_split(out_dir, split, count, seed=0, size=128):
    """Write ``count`` images to ``out_dir/images/`` and ``out_dir/{split}.json``; return the path."""
    if size < 64:
        raise ValueError(f"image size {size} is too small for figures; use 64 or more")
    return write_split(out_dir, split, count, seed, size, make_image,
                       lambda obj, image_id, ann_id: annotate(obj, image_id, ann_id, size),
                       categories(), "minimask synthetic stick figures",
                       salt=(7,))  # 7: not the shapes' images


def make_figures(out_dir, train=4000, val=200, seed=0, size=128):
    """Write the train and val splits; return ``(train_json, val_json)``."""
    return (make_split(out_dir, "train", train, seed, size),
            make_split(out_dir, "val", val, seed, size))


__all__ = ["CLASSES", "KEYPOINT_NAMES", "SKELETON", "KEYPOINT_SIGMAS", "random_pose", "make_image",
           "annotate", "categories", "make_split", "make_figures"]
