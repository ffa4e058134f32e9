# %% [markdown]
# # Lesson 08: training
#
# Lessons 03 to 07 built every part of Mask R-CNN; this one trains them together.  The paper's
# **Sec. 3.1** ("Training") says how: the loss on each sampled RoI is the sum of three terms,
#
# $$L = L_{cls} + L_{box} + L_{mask} \qquad \text{(Eq. 1)}$$
#
# (the classification and box losses of Fast R-CNN, and the per-class binary mask loss of lesson
# 07), to which the RPN adds its own two terms, objectness and anchor-box regression (lesson 04).
# The sum is minimised by **SGD** with momentum 0.9 and weight decay $10^{-4}$, counted in
# *iterations*: on COCO, 160k iterations of 16 images at a learning rate of 0.02, divided by 10 at
# 120k.  Two things here are not the paper's.  The paper trains its RPN separately and does not
# share its features with Mask R-CNN, "for convenient ablation" (Sec. 3.1, though it notes that
# they are shareable); minimask, like torchvision and Detectron2, sums all five terms and trains
# the whole network on them at once.  And the learning rate starts with a short linear
# **warm-up**, which the paper does not mention: it comes from Goyal et al. 2017 ("Accurate, Large
# Minibatch SGD"), and Detectron, Detectron2 and torchvision's reference scripts all use one.
#
# We do the same on the synthetic `shapes` data with the trainer's own pieces
# (`minimask.engine.trainer`: `open_run`, `build_training`, `train_step`, `finish`, the parts of
# the loop behind `minimask train`), written out as a loop, and look at what it leaves behind:
#
# 1. the data and the configuration (the `shapes` preset, on a shorter schedule);
# 2. the run itself: one SGD step per batch, a line of `metrics.jsonl` per iteration, checkpoints;
# 3. the **loss curves**, one per term, and what their first values mean;
# 4. **predictions on validation images** at several checkpoints: watching the model learn;
# 5. the final COCO AP, which lesson 09 takes apart.
#
# **The outputs committed with this notebook come from a full-mode run** (no `MINIMASK_QUICK`:
# 800 iterations of 8 images, the preset's schedule shrunk to that length, by the loop of section
# 2; 5.5 minutes on a 2-core machine whose `lscpu` says AMD EPYC, with nothing else running;
# quick mode trains 20 iterations and learns nothing).  Rebuild it with
# `python lessons/_build.py run 08 --full`.

# %%
import dataclasses
import json
import os
import shutil
import time

import matplotlib.pyplot as plt
import numpy as np

from minimask.data import CocoDataset, DataLoader, RandomHorizontalFlip
from minimask.data.shapes import make_shapes
from minimask.engine.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from minimask.engine.predictor import Predictor
from minimask.engine.trainer import build_training, finish, open_run, train_step
from minimask.models.config import from_dict, preset, to_dict
from minimask.viz import draw_detections, plot_losses

QUICK = bool(os.environ.get("MINIMASK_QUICK"))  # CI runs the lessons in quick mode
plt.rcParams["figure.dpi"] = 80
plt.rcParams["image.interpolation"] = "nearest"  # pixels as they are (and small PNGs)

# 1000 training and 200 validation images of 128 pixels (a handful in quick mode), made once
# into lessons/data/ and shared with lessons 09 and 10.
DATA = "data/shapes_quick" if QUICK else "data/shapes"
if not os.path.isfile(f"{DATA}/val.json"):  # val.json is written last: its presence means complete
    make_shapes(DATA, train=24 if QUICK else 1000, val=8 if QUICK else 200, seed=0)
train_set = CocoDataset(f"{DATA}/train.json", train=True)
val_set = CocoDataset(f"{DATA}/val.json", train=False)
print(train_set)
print(val_set)

# %% [markdown]
# ## 1. The data and the configuration
#
# Each image holds one to six circles, triangles and squares on a textured background, with the
# masks of their visible parts (lesson 03 drew them; `minimask/data/shapes.py` says how they are
# made).  A training batch is eight of them, in an order and with horizontal flips that depend only
# on the seed and the iteration.

# %%
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, i in zip(axes, range(4)):
    image, target = train_set[i]
    draw_detections(image, target["boxes"], target["labels"], masks=target["masks"],
                    class_names=train_set.class_names, ax=ax)
    ax.set_title(f"train image {target['image_id']}: {len(target['labels'])} objects", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# The `shapes` preset is a narrow ResNet-18-FPN (16 channels in the stem, 64 in the pyramid),
# trained from scratch with ordinary batch norm (no ImageNet weights: the paper starts from them,
# Sec. 3.1, but our images look nothing like ImageNet), anchors a quarter of COCO's size for
# 128-pixel images, and fewer RoIs per image.  Its schedule (printed below, from
# `preset("shapes")` itself) is `iters` iterations of 8 images, with the learning rate divided by
# 10 at each of its `milestones`.  Here we run **800** iterations, the same schedule shrunk: its
# drops at the same fractions of the run, the same warm-up; and we keep a checkpoint every 160
# iterations to look at later.  In quick mode the run is 20 iterations: everything runs, nothing
# is learned.  The class names are the data set's (a preset knows none).

# %%
ITERS = 20 if QUICK else 800
shapes = preset("shapes")
cfg = dataclasses.replace(
    shapes, iters=ITERS, warmup_iters=min(shapes.warmup_iters, ITERS // 5),
    milestones=tuple(round(m * ITERS / shapes.iters) for m in shapes.milestones),  # same fractions
    class_names=train_set.class_names,
    checkpoint_period=ITERS // 5, keep_checkpoints=5)  # five checkpoints, all kept
print(f"the preset: {shapes.iters} iterations, lr / 10 at {shapes.milestones}; here: {ITERS}, "
      f"lr / 10 at {cfg.milestones}")
default = to_dict(shapes)
print("changed from the preset:", {k: v for k, v in to_dict(cfg).items() if default[k] != v})
print(f"batch {cfg.batch_size}, lr {cfg.lr} (warm-up {cfg.warmup_iters} iterations from "
      f"{cfg.warmup_factor} x), momentum {cfg.momentum}, weight decay {cfg.weight_decay}, "
      f"seed {cfg.seed}")

# %% [markdown]
# ## 2. The run
#
# The loop below is the one `minimask train` runs (`train` in `minimask/engine/trainer.py`, which
# adds a progress bar, resuming, evaluation during the run and the NaN report), built from the same
# pieces:
#
# - `open_run` makes the run folder with `config.json` and an empty `metrics.jsonl`;
# - `build_training` builds the model from the config's seed, the SGD optimizer (no weight decay on
#   norms and biases) and the warm-up + multi-step schedule;
# - the `DataLoader` gives batch `it` in an order, and with flips, that depend only on the seed and
#   `it`; `model.reseed(seed, it)` does the same for the model's own random draws (the samplers);
# - `train_step` is one iteration: forward (the five losses), a check that none is NaN or infinite,
#   backward through their sum, one SGD step and one schedule step; it returns the loss values;
# - `save_checkpoint` every `checkpoint_period` iterations (weights, momentum buffers and the
#   schedule: a run stopped and resumed computes the same losses bit for bit);
# - `finish` evaluates the last weights on the validation set (COCO AP) and writes `summary.json`.
#
# One line per iteration goes to `metrics.jsonl` (each loss, the learning rate, the seconds it
# took).  A run already in `runs/08_training/` with the same config is reused rather than trained
# again (delete the folder to retrain).
#
# The committed outputs come from a full run of this loop on a 2-core AMD EPYC machine with
# nothing else running, with the default threads (two for BLAS, two for Numba): 800 iterations
# took 5.5 minutes, 0.42 s per iteration of 8 images (the cell prints it).  On cores busy with
# other programs, one thread each (`OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1`) is faster than
# threads fighting for them.

# %%
RUN = "runs/08_training_quick" if QUICK else "runs/08_training"
summary_file = f"{RUN}/summary.json"
if QUICK:
    shutil.rmtree(RUN, ignore_errors=True)  # CI trains afresh
# (the stored config is read with today's fields: one added since gets its default)
same = os.path.isfile(summary_file) and from_dict(json.load(open(f"{RUN}/config.json"))) == cfg
if same:
    summary = json.load(open(summary_file))
    print(f"reusing the run in {RUN}")
else:
    shutil.rmtree(RUN, ignore_errors=True)
    run = open_run(cfg, RUN)                                  # the folder, config.json, metrics.jsonl
    model, optimizer, scheduler = build_training(cfg, "cpu")  # seeded weights, SGD, the schedule
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, seed=run.seed,
                        train_transform=RandomHorizontalFlip(cfg.hflip_prob), drop_last=True)
    print(f"training on {len(train_set)} images, batch {cfg.batch_size}, iterations 0..{cfg.iters}")
    batches = loader.batches(0, cfg.iters)  # batch `it` depends on (seed, it) only
    t_start = t_last = time.perf_counter()
    try:
        with open(run.metrics_path, "a") as metrics:
            for it, (images, targets) in enumerate(batches):
                model.reseed(run.seed, it)                # the samplers' draws: from (seed, it) alone
                lr = optimizer.param_groups[0]["lr"]      # the lr this step uses
                losses = train_step(model, optimizer, scheduler, images, targets)
                now = time.perf_counter()
                record = {"iter": it, **losses, "lr": lr, "time": round(now - t_last, 4)}
                t_last = now
                run.records.append(record)
                metrics.write(json.dumps(record) + "\n")
                if (it + 1) % cfg.checkpoint_period == 0:
                    run.last_good = save_checkpoint(checkpoint_path(RUN, it + 1), model, optimizer,
                                                    scheduler, cfg, it + 1, loader)
    finally:
        batches.close()  # stops the loader's prefetch thread
    run.train_time = time.perf_counter() - t_start
    summary = finish(run, cfg, model, val_set)  # COCO evaluation of the last weights, summary.json
print(f"{ITERS} iterations in {summary['train_time_s'] / 60:.1f} min: {summary['s_per_iter']:.2f} s per "
      f"iteration, {summary['images_per_s']:.1f} images/s")

# %% [markdown]
# ## 3. The loss curves
#
# Each term on its own axes, as logged (faint) and as a running mean over 20 iterations (bold:
# each iteration sees a different batch, so single values are noisy), on a log scale.  The grey
# line is the learning rate: the warm-up at the start, the two drops near the end.
#
# The first values are worth checking, since they say the heads start where they should.  A
# classifier whose last layer starts near zero (normal with std 0.01) spreads its probability
# evenly, so its cross-entropy is the log of the number of choices: $\ln 2 = 0.69$ for the RPN's
# object/background, $\ln 4 = 1.39$ for the box head's three classes plus background.  The
# box-regression terms start small, because their layers start nearer still to zero (std 0.001)
# and few RoIs are positive yet.  The mask term starts *above* $\ln 2$: its last 1x1 conv is
# Kaiming-initialised like the other convs of the head, as torchvision's `MaskRCNNPredictor` does,
# so the logits start spread out, and a confidently wrong pixel costs more than an undecided one.
# Detectron2 starts that layer differently, from a normal distribution of std 0.001
# (`detectron2/modeling/roi_heads/mask_head.py`), so its mask loss starts at $\ln 2$, as its
# classifiers' do.

# %%
records = [json.loads(line) for line in open(f"{RUN}/metrics.jsonl")]
terms = ["loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "total"]
its = np.array([r["iter"] for r in records])
lr = np.array([r["lr"] for r in records])
fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
for ax, term in zip(axes.flat, terms):
    y = np.array([r[term] for r in records])
    w = min(20, len(y))
    ax.plot(its, y, color="tab:blue", alpha=0.3, lw=0.8)
    ax.plot(its[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color="tab:blue", lw=1.8)
    ax.set_yscale("log")
    ax.set_title(f"{term}: {y[0]:.3f} -> {np.median(y[-w:]):.3f}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(its, lr, color="0.6", lw=1)
    ax2.set_yticks([])
for ax in axes[1]:
    ax.set_xlabel("iteration")
plt.tight_layout()
plt.show()
print("first iteration:", {k: round(records[0][k], 3) for k in terms[:-1]},
      f" (ln 2 = {np.log(2):.3f}, ln 4 = {np.log(4):.3f})")

# %% [markdown]
# All five terms on one axes (`minimask.viz.plot_losses`, the same drawing `train` saves as
# `loss.png`) show which dominates the total when: early on the classification terms, later the
# box and mask terms, the two that ask for precision to the pixel.

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
plot_losses(records, ax=ax)
ax.set_title("all terms (running mean of 20)")
plt.show()

# %% [markdown]
# ## 4. Predictions during training
#
# Each checkpoint holds the config and the weights, so `Predictor.from_checkpoint` rebuilds the
# model as it was at that iteration.  Three validation images (never trained on), one per row:
# the ground truth first, then the detections scoring at least 0.5 at the first, the middle and
# the last checkpoint.  The masks, boxes and classes sharpen as training goes on.  The 128-pixel
# images are drawn large, each pixel a block (matplotlib's nearest-neighbour), so the labels cover
# little of the objects.

# %%
checkpoints = list_checkpoints(RUN)
shown = sorted({checkpoints[0], checkpoints[len(checkpoints) // 2], checkpoints[-1]})
examples = [val_set[i] for i in range(3)]
images = [image for image, _ in examples]
fig, axes = plt.subplots(len(images), 1 + len(shown), figsize=(3.4 * (1 + len(shown)), 3.6 * len(images)),
                         squeeze=False)
for ax, (image, target) in zip(axes[:, 0], examples):
    draw_detections(image, target["boxes"], target["labels"], masks=target.get("masks"),
                    class_names=val_set.class_names, ax=ax)
    ax.set_title(f"ground truth: {len(target['labels'])} objects", fontsize=10)
for col, path in enumerate(shown, 1):
    predictor = Predictor.from_checkpoint(path, score_thresh=0.5)
    done = int(os.path.basename(path)[6:13])
    for ax, image, pred in zip(axes[:, col], images, predictor.predict(images)):
        draw_detections(image, pred["boxes"], pred["labels"], pred["scores"], pred["masks"],
                        class_names=predictor.class_names, ax=ax)
        ax.set_title(f"iteration {done}: {len(pred['scores'])} found", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. How good is it?
#
# `train` ends with a COCO evaluation of the last weights on the validation set (lesson 09 explains
# these numbers and draws them).  AP is the mean over IoU thresholds 0.5, 0.55, ..., 0.95; AP50 and
# AP75 fix the threshold; "bbox" scores the boxes and "segm" the masks (IoU computed on masks).
# Values are in percent, as the paper prints them; "-" stands for COCOeval's -1, an area range
# with no object in it (no shape is "large", over 96x96 pixels).

# %%
names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
print(f"{'':>5}" + "".join(f"{k:>7}" for k in names))
for kind in ("bbox", "segm"):
    stats = summary["eval"][kind]
    print(f"{kind:>5}" + "".join(f"{100 * stats[k]:7.1f}" if stats[k] >= 0 else f"{'-':>7}" for k in names))

# %% [markdown]
# ## Exercises
#
# 1. Continue the run to the preset's full schedule (`preset("shapes").iters` iterations) with
#    `train(..., resume=True)` and a config with that `iters` (keep this run's milestones, or move
#    them to the preset's?).  How much do AP and AP75 gain?
# 2. Set `lr=0.08` (four times higher).  Which loss term misbehaves first?  Does the warm-up save
#    the run, and what happens with `warmup_iters=0`?
# 3. Drop the mask loss (multiply `losses["loss_mask"]` by 0 in a `model_fn` wrapper).  Does the
#    box AP go up or down?  Compare with the paper's multi-task finding (Table 3, "Faster R-CNN,
#    RoIAlign" vs Mask R-CNN: +0.9 box AP from the mask branch).
# 4. Stop the run half way (interrupt the kernel), then call `train(..., resume=True)`.  Check that
#    the lines of `metrics.jsonl` after the restart equal those of an uninterrupted run.
# 5. In the loss curves, `loss_rpn_box` and `loss_box` are much smaller than the classification
#    terms.  Does that mean they matter less?  (Think about the gradients, not the values.)
