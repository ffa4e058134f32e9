# %% [markdown]
# # Lesson 09: evaluation, or what COCO AP means
#
# The paper reports "the standard COCO metrics including AP (averaged over IoU thresholds),
# AP50, AP75, and AP_S, AP_M, AP_L (AP at different scales)", with IoU "computed on masks" for
# instance segmentation (**Sec. 4**, first paragraph), and box AP ("AP^bb") for detection
# (Table 3).  Every number in Tables 1 to 6 is one of these.  We do not re-implement them:
# `minimask.engine.evaluator` feeds the official `pycocotools` `COCOeval`, as every paper does.
# This lesson opens the box:
#
# 1. detections in COCO's results format, from the model of lesson 08;
# 2. **IoU** of two boxes and of two masks;
# 3. from matches to a **precision-recall curve**, by hand, and the 101-point interpolated AP;
# 4. the same curves from **COCOeval's `eval["precision"]` array**, at every IoU threshold;
# 5. **bbox vs segm** AP;
# 6. **per-category** AP;
# 7. a gallery of the **worst failures**.
#
# **The outputs committed with this notebook come from a full-mode run** (no `MINIMASK_QUICK`):
# the model is the last checkpoint of lesson 08's full run (800 iterations; see that lesson's top
# for how it was trained), so this lesson trained nothing and only predicted and evaluated, on
# the 200 validation images.  Without lesson 08's run it trains a model of its own first, on the
# preset's schedule shrunk to 300 iterations (20 in quick mode, as CI runs it).

# %%
import contextlib
import dataclasses
import io
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.cocoeval import COCOeval

from minimask.data import CocoDataset
from minimask.data.shapes import make_shapes
from minimask.engine.checkpoint import latest_checkpoint
from minimask.engine.evaluator import STAT_NAMES, coco_eval, predict_dataset
from minimask.engine.predictor import Predictor
from minimask.engine.trainer import train
from minimask.models.config import preset

QUICK = bool(os.environ.get("MINIMASK_QUICK"))  # CI runs the lessons in quick mode
plt.rcParams["figure.dpi"] = 80
plt.rcParams["image.interpolation"] = "nearest"  # pixels as they are (and small PNGs)

DATA = "data/shapes_quick" if QUICK else "data/shapes"  # as in lessons 08 and 10
if not os.path.isfile(f"{DATA}/val.json"):
    make_shapes(DATA, train=24 if QUICK else 1000, val=8 if QUICK else 200, seed=0)
val_set = CocoDataset(f"{DATA}/val.json", train=False)  # every image, even one with no object
coco = val_set.coco  # pycocotools' COCO of the ground truth

# The model: lesson 08's last checkpoint if that lesson has been run, else a short run here.
checkpoint = latest_checkpoint("runs/08_training_quick" if QUICK else "runs/08_training")
if checkpoint is None:
    iters, shapes = (20 if QUICK else 300), preset("shapes")
    cfg = dataclasses.replace(  # the preset's schedule shrunk: its lr drops at the same fractions
        shapes, iters=iters, warmup_iters=min(shapes.warmup_iters, iters // 5), checkpoint_period=0,
        milestones=tuple(round(m * iters / shapes.iters) for m in shapes.milestones))
    out = "runs/09_model_quick" if QUICK else "runs/09_model"
    shutil.rmtree(out, ignore_errors=True)
    print(f"lesson 08's run is missing: training {iters} iterations into {out}")
    train(cfg, f"{DATA}/train.json", out_dir=out, progress=False, log=lambda *args: None)
    checkpoint = latest_checkpoint(out)
predictor = Predictor.from_checkpoint(checkpoint)
print("model:", checkpoint)
print(val_set)

# %% [markdown]
# ## 1. Detections in COCO's results format
#
# `predict_dataset` runs `model.predict` on every validation image and writes each detection the
# way COCO wants it: the image, the category, the score, the box as `[x, y, w, h]`, and the mask
# as a compressed run-length encoding (RLE).  Everything the model returns counts: up to 20
# detections per image in the `shapes` preset, down to a score of 0.05.  Low-scoring detections
# cost nothing in AP (they come last on the precision-recall curve), and can only add recall.

# %%
results = predict_dataset(predictor.model, val_set, batch_size=8)
assert results, "the model found nothing at all: AP would be 0 (train it longer)"
example = dict(results[0], segmentation={**results[0]["segmentation"],
                                         "counts": results[0]["segmentation"]["counts"][:24] + "..."})
print(f"{len(results)} detections on {len(val_set)} images, {len(coco.getAnnIds())} objects; the first:")
print(example)

# %% [markdown]
# ## 2. IoU, on boxes and on masks
#
# A detection is right if it has the right class and its **intersection over union** with a
# ground-truth object, $|A \cap B| / |A \cup B|$, reaches a threshold.  For "bbox" AP, $A$ and $B$
# are boxes; for "segm" (mask) AP they are the sets of pixels of the masks.  A mask IoU is the
# harder test: a box can be perfect while the mask inside it is blotchy, and a thin object's mask
# can miss while its box still overlaps.

# %%
def gt_rle(ann):
    return coco.annToRLE(ann)  # polygon or RLE -> RLE at the image's size


def best_match(det):
    """The ground-truth object of the same class that overlaps ``det``'s mask most, and the IoUs."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=det["image_id"], catIds=det["category_id"]))
    if not anns:
        return None, 0.0, 0.0
    mask_ious = mask_utils.iou([det["segmentation"]], [gt_rle(a) for a in anns], [0] * len(anns))[0]
    box_ious = mask_utils.iou([det["bbox"]], [a["bbox"] for a in anns], [0] * len(anns))[0]
    j = int(np.argmax(mask_ious))
    return anns[j], float(box_ious[j]), float(mask_ious[j])


# The top-scoring detection of the first image with objects, beside its ground truth.
det = max((r for r in results if r["image_id"] == results[0]["image_id"]), key=lambda r: r["score"])
ann, box_iou, mask_iou = best_match(det)
image = val_set.load_image(det["image_id"])
fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
axes[0].imshow(image)
name = coco.cats[det["category_id"]]["name"]
axes[0].set_title(f"image {det['image_id']}: a {name}, score {det['score']:.2f}", fontsize=9)
for ax, kind in zip(axes[1:], ("box", "mask")):
    h, w = image.shape[:2]
    if kind == "box":
        pred = mask_utils.decode(mask_utils.frPyObjects(np.array([det["bbox"]]), h, w))[..., 0]
        truth = (mask_utils.decode(mask_utils.frPyObjects(np.array([ann["bbox"]], float), h, w))[..., 0]
                 if ann else 0 * pred)
        iou = box_iou
    else:
        pred = mask_utils.decode(det["segmentation"])
        truth = mask_utils.decode(gt_rle(ann)) if ann else 0 * pred
        iou = mask_iou
    picture = np.zeros((h, w, 3))
    picture[..., 0] = pred            # red: predicted only
    picture[..., 1] = truth           # green: ground truth only; yellow: both (the intersection)
    ax.imshow(picture)
    ax.set_title(f"{kind} IoU = {(pred & truth).sum()} / {(pred | truth).sum()} = {iou:.2f}", fontsize=9)
for ax in axes:
    ax.set_axis_off()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. A precision-recall curve by hand
#
# For one category and one IoU threshold $t$, COCOeval (its `evaluateImg` and `accumulate`)
# works like this:
#
# 1. sort all detections of the category, over all images, by score, highest first;
# 2. go down the list; a detection is a **true positive** if some ground-truth object of its image
#    that no earlier detection took has IoU $\ge t$ with it (the one with the highest IoU is
#    taken), otherwise a **false positive** (a duplicate of a found object is a false positive);
# 3. after the first $n$ detections, **precision** = TP / $n$ and **recall** = TP / (number of
#    objects);
# 4. make precision non-increasing (each point takes the best precision at any higher recall:
#    the "interpolated" curve), read it at the 101 recalls 0, 0.01, ..., 1 (0 past the last
#    recall reached), and average: that is the **AP** of the category at $t$.
#
# COCO's AP then averages over the 10 thresholds $t = 0.5, 0.55, \ldots, 0.95$ and over the
# categories.  (PASCAL VOC's AP was the same at the single $t = 0.5$, with 11 recall points.)

# %%
REC_THRS = np.linspace(0, 1, 101)


def pr_by_hand(cat_id, t):
    """(recall, precision, interpolated precision at REC_THRS) for masks of ``cat_id`` at IoU ``t``."""
    dets = sorted((r for r in results if r["category_id"] == cat_id), key=lambda r: -r["score"])
    n_gt = len(coco.getAnnIds(catIds=cat_id))
    taken, tp = set(), []
    for d in dets:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=d["image_id"], catIds=cat_id))
        ious = (mask_utils.iou([d["segmentation"]], [gt_rle(a) for a in anns], [0] * len(anns))[0]
                if anns else [])
        best, best_iou = None, t
        for a, iou in zip(anns, ious):
            if a["id"] not in taken and iou >= best_iou:
                best, best_iou = a["id"], iou
        if best is not None:
            taken.add(best)
        tp.append(best is not None)
    tp = np.cumsum(tp)
    recall = tp / n_gt
    precision = tp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    at = np.searchsorted(recall, REC_THRS, side="left")
    sampled = np.array([envelope[i] if i < len(envelope) else 0.0 for i in at])
    return recall, precision, sampled


cat_id = max(coco.getCatIds(), key=lambda c: len(coco.getAnnIds(catIds=c)))  # the commonest
recall, precision, sampled = pr_by_hand(cat_id, 0.5)
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(recall, precision, ".-", ms=3, lw=0.8, label="precision after each detection")
ax.step(REC_THRS, sampled, where="post", color="tab:red", label="interpolated, at 101 recalls")
ax.set_xlabel("recall")
ax.set_ylabel("precision")
ax.set_title(f"{coco.cats[cat_id]['name']} masks at IoU 0.5: AP = {sampled.mean():.3f}")
ax.legend(loc="lower left")
ax.grid(True, alpha=0.3)
plt.show()

# %% [markdown]
# ## 4. The same from COCOeval
#
# COCOeval keeps the interpolated curves in `ev.eval["precision"]`, an array of shape
# $(T, R, K, A, M)$: 10 IoU thresholds, 101 recall points, $K$ categories, 4 area ranges (all,
# small, medium, large) and 3 limits on detections per image (1, 10, 100).  An entry is -1 where
# a category has no object in that area range.  The first number of the summary, AP, is the mean
# of `precision[:, :, :, 0, 2]` (all areas, 100 detections) over the entries that are not -1.
#
# We run it ourselves to keep the arrays, exactly as `minimask.engine.evaluator.coco_eval` does
# (which keeps only the 12 summary numbers): for masks the `bbox` field of each result is dropped,
# so that `loadRes` takes each detection's area from its mask, not its box.

# %%
def run_cocoeval(iou_type):
    drop = {"bbox"} if iou_type == "segm" else set()
    dets = [{k: v for k, v in r.items() if k not in drop} for r in results]  # loadRes writes into them
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        ev = COCOeval(coco, coco.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


evs = {kind: run_cocoeval(kind) for kind in ("bbox", "segm")}
precision_array = evs["segm"].eval["precision"]
print("eval['precision'] shape (T, R, K, A, M):", precision_array.shape)
k = coco.getCatIds().index(cat_id)
print(f"{coco.cats[cat_id]['name']} at IoU 0.5: by hand {sampled.mean():.4f}, "
      f"COCOeval {precision_array[0, :, k, 0, 2].mean():.4f}")
p = precision_array[:, :, :, 0, 2]
print(f"mean of the array {p[p > -1].mean():.4f} = AP in the summary {evs['segm'].stats[0]:.4f}")
with contextlib.redirect_stdout(io.StringIO()):
    package = coco_eval(coco, results, "segm", log=lambda *args: None)
print(f"and minimask's evaluator says AP {package['AP']:.4f}")

# %%
ious = evs["segm"].params.iouThrs
cat_ids = coco.getCatIds()
fig, axes = plt.subplots(1, len(cat_ids), figsize=(4 * len(cat_ids), 3.6), sharey=True)
for ax, kk, cid in zip(axes, range(len(cat_ids)), cat_ids):
    for ti, t in enumerate(ious):
        curve = precision_array[ti, :, kk, 0, 2]
        ax.plot(REC_THRS, np.where(curve < 0, np.nan, curve), color=plt.cm.viridis(ti / (len(ious) - 1)),
                label=f"IoU {t:.2f}" if ti in (0, 5, 9) else None)
    ap = precision_array[:, :, kk, 0, 2]
    ax.set_title(f"{coco.cats[cid]['name']}: mask AP {ap[ap > -1].mean():.3f}", fontsize=10)
    ax.set_xlabel("recall")
    ax.grid(True, alpha=0.3)
axes[0].set_ylabel("interpolated precision")
axes[0].legend(loc="lower left", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The curves at IoU 0.5 (purple) reach far to the right: most objects are *found*.  As the
# threshold rises toward 0.95 (yellow) the curves collapse: the same detections, judged by how
# *precisely* their masks follow the objects.  AP averages all ten, so it rewards exact masks,
# which is why the paper's RoIAlign (lesson 05) shows its largest gains at AP75 (Table 2c, 2d).
#
# ## 5. Boxes vs masks
#
# The same detections, scored with box IoU and with mask IoU: the 12 numbers of the summary
# (AP, then AR, the average recall, at 1, 10 and 100 detections per image), and AP at each IoU
# threshold.  "-" stands for COCOeval's -1: an area range with no object in it (no shape is
# "large", over 96x96 pixels).

# %%
print(f"{'':>6}" + "".join(f"{n:>7}" for n in STAT_NAMES))
for kind, ev in evs.items():
    print(f"{kind:>6}" + "".join(f"{100 * v:7.1f}" if v >= 0 else f"{'-':>7}" for v in ev.stats))

fig, ax = plt.subplots(figsize=(6, 3.6))
for kind, ev in evs.items():
    p = ev.eval["precision"][:, :, :, 0, 2]
    ax.plot(ious, [p[ti][p[ti] > -1].mean() for ti in range(len(ious))], "o-", label=kind)
ax.set_xlabel("IoU threshold t")
ax.set_ylabel("AP at t (mean over classes)")
ax.set_title("AP falls as the threshold rises; COCO AP is the mean of these points", fontsize=10)
ax.legend()
ax.grid(True, alpha=0.3)
plt.show()

# %% [markdown]
# On COCO the paper's mask AP is a few points *below* its box AP (37.1 vs 39.8 with
# ResNeXt-101-FPN, Sec. 4.3): real objects have thin parts, holes and fuzzy borders that boxes do
# not care about.  On the shapes data the printout above usually shows the opposite, and two
# rules of the game explain it.  Neither is about the model being better at masks in general.
#
# - **The area rules.**  COCOeval sorts objects into small, medium and large by the ground truth's
#   `area` field, and that field is the *mask's* area for both box and mask evaluation; a
#   detection's own area is its box's area for "bbox" and its mask's area for "segm".  A triangle
#   fills half its box, so the box of a detection can fall in another size range than its mask;
#   this moves APs and APm, not the overall AP (its range "all" keeps everything).
# - **A box is decided by four extreme pixels, a mask by all of them.**  The ground-truth box is
#   the tight box of the visible mask, so a triangle's box edge is set by the single pixel at its
#   tip, blurred by noise and by occlusion; the regressed box must hit all four such pixels, while
#   the mask's IoU is carried by the object's bulk.  If that is what happens, the box drawn
#   tightly around each detection's *own mask* should score better than the regressed box, and
#   the gap between mask and box AP should be largest for triangles.  Both are measured below:
#   the same detections scored three ways, and per class.

# %%
def tight_boxes(results):
    """The same results with each box replaced by the tight box of its own mask."""
    return [{**r, "bbox": [float(v) for v in mask_utils.toBbox(r["segmentation"])]} for r in results]


def quiet_ap(res, kind):
    return coco_eval(coco, res, kind, log=lambda *a: None)


ap_regressed, ap_tight, ap_mask = (quiet_ap(results, "bbox"), quiet_ap(tight_boxes(results), "bbox"),
                                   quiet_ap(results, "segm"))
print(f"{'':>28}" + "".join(f"{k:>7}" for k in ("AP", "AP50", "AP75")))
for what, m in (("box AP, the regressed boxes", ap_regressed), ("box AP, boxes of the masks", ap_tight),
                ("mask AP", ap_mask)):
    print(f"{what:>28}" + "".join(f"{100 * m[k]:7.1f}" for k in ("AP", "AP50", "AP75")))

# Per class: the mask AP minus the box AP (percent points), from COCOeval's precision arrays above.
gap = {}
for kk, c in enumerate(cat_ids):
    per = {kind: ev.eval["precision"][:, :, kk, 0, 2] for kind, ev in evs.items()}
    per = {kind: float(p[p > -1].mean()) if (p > -1).any() else float("nan") for kind, p in per.items()}
    gap[coco.cats[c]["name"]] = 100 * (per["segm"] - per["bbox"])
print("mask AP minus box AP per class: " + ", ".join(f"{n} {g:+.1f}" for n, g in gap.items()))

# Each detection against the object it overlaps most (mask IoU): its box IoU and its mask IoU.
pairs = {n: [] for n in gap}
for image_id in coco.getImgIds():
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    dets = [r for r in results if r["image_id"] == image_id and r["score"] >= 0.5]
    if not anns or not dets:
        continue
    m_iou = mask_utils.iou([d["segmentation"] for d in dets], [gt_rle(a) for a in anns], [0] * len(anns))
    b_iou = mask_utils.iou([d["bbox"] for d in dets], [a["bbox"] for a in anns], [0] * len(anns))
    for i, d in enumerate(dets):
        j = int(np.argmax(m_iou[i]))
        if m_iou[i, j] >= 0.5 and anns[j]["category_id"] == d["category_id"]:
            pairs[coco.cats[d["category_id"]]["name"]].append((b_iou[i, j], m_iou[i, j]))
fig, ax = plt.subplots(figsize=(5.2, 4.6))
for n, pr in pairs.items():
    pr = np.array(pr).reshape(-1, 2)
    ax.plot(pr[:, 0], pr[:, 1], ".", alpha=0.5, label=f"{n} ({len(pr)})")
    if len(pr):
        print(f"{n}: {len(pr)} matched detections (score >= 0.5), median box IoU {np.median(pr[:, 0]):.3f}, "
              f"median mask IoU {np.median(pr[:, 1]):.3f}")
ax.plot([0.5, 1], [0.5, 1], "k--", lw=0.8)
ax.set_xlabel("box IoU with the object")
ax.set_ylabel("mask IoU with the object")
ax.set_title("each matched detection: above the line, its mask fits better than its box", fontsize=9)
ax.legend(fontsize=8)
ax.grid(True, alpha=0.3)
plt.show()
#
# ## 6. Per-category AP
#
# Averaging `precision` over thresholds and recalls, but not over categories, gives one AP per
# class (AP50 and AP75 too, fixing the threshold).

# %%
names = [coco.cats[c]["name"] for c in cat_ids]
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(7, 3.6))
for i, (kind, ev) in enumerate(evs.items()):
    p = ev.eval["precision"][:, :, :, 0, 2]
    per_class = [p[:, :, kk][p[:, :, kk] > -1].mean() for kk in range(len(names))]
    ax.bar(x + (i - 0.5) * 0.38, per_class, 0.38, label=kind)
    for xi, v in zip(x, per_class):
        ax.text(xi + (i - 0.5) * 0.38, v, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=8)
    print(f"{kind}: " + ", ".join(f"{n} AP {100 * v:.1f} (AP50 {100 * p[0, :, kk].mean():.1f}, "
                                  f"AP75 {100 * p[5, :, kk].mean():.1f})"
                                  for kk, (n, v) in enumerate(zip(names, per_class))))
ax.set_xticks(x, names)
ax.set_ylabel("AP")
ax.set_title("AP per category", fontsize=10)
ax.legend()
plt.show()

# %% [markdown]
# ## 7. The worst failures
#
# COCOeval also keeps, per image and category, which detection matched which object at each
# threshold (`ev.evalImgs`: `dtMatches`, `gtMatches`, the ids of each).  At IoU 0.5 on masks, the
# two kinds of failure that cost most AP are
#
# - **confident false positives**: detections with a high score that match nothing (each one
#   lowers the precision of everything ranked after it), and
# - **missed objects**: objects that no detection matched (they cap the recall).
#
# For each false positive we also say *why*, from its best mask IoU with any object of the image:
# the wrong class on a real object, a duplicate of an object already found, a mask too poor to
# reach 0.5, or nothing there at all.

# %%
ev = evs["segm"]
dt_coco = ev.cocoDt
false_pos, missed = [], []
for e in ev.evalImgs:
    if e is None or e["aRng"] != ev.params.areaRng[0]:  # one entry per (category, area range, image)
        continue
    for d_id, m, score in zip(e["dtIds"], e["dtMatches"][0], e["dtScores"]):  # [0]: IoU 0.5
        if m == 0:
            false_pos.append((score, d_id))
    for g_id, m in zip(e["gtIds"], e["gtMatches"][0]):
        if m == 0:
            missed.append((coco.anns[g_id]["area"], g_id))
false_pos.sort(reverse=True)
missed.sort(reverse=True)
print(f"at mask IoU 0.5: {len(false_pos)} false positives ({sum(s >= 0.5 for s, _ in false_pos)} "
      f"scoring 0.5 or more), {len(missed)} of {len(coco.getAnnIds())} objects missed")


def why(d):
    """Why detection ``d`` (a result dict) matched nothing at mask IoU 0.5."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=d["image_id"]))
    if not anns:
        return "nothing there"
    iou = mask_utils.iou([d["segmentation"]], [gt_rle(a) for a in anns], [0] * len(anns))[0]
    a = anns[int(np.argmax(iou))]
    if iou.max() >= 0.5:
        return (f"duplicate (IoU {iou.max():.2f})" if a["category_id"] == d["category_id"]
                else f"wrong class: a {coco.cats[a['category_id']]['name']}")
    return f"poor mask (best IoU {iou.max():.2f})" if iou.max() >= 0.1 else "nothing there"


CAUSES = ("duplicate", "wrong class", "poor mask", "nothing there")


def cause(d):
    return next(c for c in CAUSES if why(d).startswith(c))


counts = {c: [0, 0] for c in CAUSES}  # cause -> [score < 0.5, score >= 0.5]
for score, d_id in false_pos:
    counts[cause(dt_coco.anns[d_id])][int(score >= 0.5)] += 1
for c, (low, high) in counts.items():
    print(f"{c:>14}: {low + high:4d} false positives, {high:3d} of them scoring 0.5 or more")
fig, ax = plt.subplots(figsize=(7, 3.2))
y = np.arange(len(CAUSES))
ax.barh(y, [counts[c][1] for c in CAUSES], color="tab:red", label="score >= 0.5")
ax.barh(y, [counts[c][0] for c in CAUSES], left=[counts[c][1] for c in CAUSES], color="tab:red", alpha=0.35,
        label="score < 0.5")
ax.set_yticks(y, CAUSES)
ax.invert_yaxis()
ax.set_xlabel("false positives at mask IoU 0.5")
ax.set_title("why each false positive matched nothing", fontsize=10)
ax.legend(fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read the causes.  A **duplicate** overlaps an object that a higher-scoring detection of
# the same class already took: COCOeval matches greedily by score, so the second one counts
# against precision even with a perfect mask; the per-class NMS at 0.5 (lesson 06) lets through
# two boxes of one object whose IoU is under 0.5, which happens most with occluded shapes whose
# visible part is oddly cut.  A **wrong class** is a real object named wrongly; a **poor mask**
# found the object but outlined it too badly to reach IoU 0.5; **nothing there** is a detection on
# the background.  Low-scoring false positives cost little (they rank after most true ones); the
# ones that lower AP are those scoring 0.5 or more, the dark part of each bar.

# %%
def show(ax, image_id, mask, outline, title, box):
    """Draw the image around ``box`` (x, y, w, h) with a margin: a close-up of the failure."""
    image = val_set.load_image(image_id)
    x, y, w, h = box
    side = max(w, h) / 2 + 12
    cx, cy = x + w / 2, y + h / 2
    x0, x1 = int(max(0, cx - side)), int(min(image.shape[1], cx + side))
    y0, y1 = int(max(0, cy - side)), int(min(image.shape[0], cy + side))
    crop = (slice(y0, y1), slice(x0, x1))
    image = image[crop]
    mask = None if mask is None else mask[crop]
    outline = None if outline is None else outline[crop]
    ax.imshow(image)
    if mask is not None:
        layer = np.zeros(mask.shape + (4,))
        layer[mask > 0] = (1, 0, 0, 0.45)  # red: the detection's mask
        ax.imshow(layer)
    if outline is not None:
        ax.contour(outline, levels=[0.5], colors="white", linewidths=1.2)  # white: the object
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


fig, axes = plt.subplots(2, 5, figsize=(11, 5.2))
for ax, (score, d_id) in zip(axes[0], false_pos[:5]):
    d = dt_coco.anns[d_id]  # the detection as loadRes stored it (our result dict, plus an id)
    show(ax, d["image_id"], mask_utils.decode(d["segmentation"]), None,
         f"FP {coco.cats[d['category_id']]['name']} {score:.2f}\n{why(d)}", d["bbox"])
for ax, (area, g_id) in zip(axes[1], missed[:5]):
    a = coco.anns[g_id]
    # the detection (of any class) that overlaps this object most: what the model did there
    dets = [r for r in results if r["image_id"] == a["image_id"]]
    ious = (mask_utils.iou([r["segmentation"] for r in dets], [gt_rle(a)], [0])[:, 0] if dets else [])
    best = dets[int(np.argmax(ious))] if len(dets) else None
    note = (f"best: {coco.cats[best['category_id']]['name']} {best['score']:.2f}, IoU {max(ious):.2f}"
            if best is not None else "no detection")
    name = coco.cats[a["category_id"]]["name"]
    show(ax, a["image_id"], mask_utils.decode(best["segmentation"]) if best is not None else None,
         mask_utils.decode(gt_rle(a)), f"missed {name} ({area:.0f} px)\n{note}", a["bbox"])
for ax in axes.flat:
    ax.set_axis_off()
fig.suptitle("close-ups. top: the highest-scoring false positives (red); bottom: the largest missed "
             "objects (white outline) and the detection that overlaps them most (red)", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Compute AP50 of one category with the 11-point interpolation of PASCAL VOC 2007 (recalls
#    0, 0.1, ..., 1) from `pr_by_hand`.  Is it higher or lower than COCO's 101-point value, and why?
# 2. Keep only the detections scoring at least 0.5 and evaluate again.  AP drops though the
#    removed detections are the "worst": where on the precision-recall curve did they count?
# 3. Set `ev.params.maxDets = [1, 5, 20]` before `evaluate()`.  Which of the 12 numbers change?
# 4. Re-score every detection by its score times the IoU of its own mask with its box (a crude
#    "mask quality").  Does mask AP improve?  (This is the idea of Mask Scoring R-CNN.)
# 5. Our APl is "-" (COCOeval's -1): why?  Change `params.areaRng` so that "large" means more than
#    40x40 pixels and look at AP per size again.
