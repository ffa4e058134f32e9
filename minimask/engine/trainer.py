"""The training loop (Sec. 3.1, "Training"): SGD on the multi-task loss, with checkpoints.

Mask R-CNN minimises Eq. 1 of the paper, L = L_cls + L_box + L_mask (plus the RPN's two
terms, trained jointly as in Faster R-CNN), by SGD with momentum 0.9 and weight decay 1e-4,
counting *iterations*, not epochs (160k at 16 images per batch on COCO; the lr drops 10x at
120k).  One iteration here:

    images, targets = batch ``it`` of the loader      (seeded order, random flips)
    losses = model(images, targets)                   (a dict of scalar Tensors)
    total = sum(losses.values())
    optimizer.zero_grad(); total.backward(); optimizer.step(); scheduler.step()

Around it, what makes it a tool:

- ``metrics.jsonl``: one JSON line per iteration (iter, each loss, total, lr, seconds), and
  ``loss.png`` drawn from it at the end;
- checkpoints every ``cfg.checkpoint_period`` iterations and at the end, the newest
  ``cfg.keep_checkpoints`` kept (``checkpoint.py``);
- COCO evaluation every ``cfg.eval_period`` iterations (if > 0) and at the end;
- exact resume: a run stopped and resumed computes the same losses, bit for bit (on the CPU),
  as one that never stopped.  Every random draw is a pure function of (seed, iteration): the
  loader's order and flips (``data/loader.py``), and the model's generators (anchor and RoI
  samplers, the training scale), reseeded here before each iteration.  The weights, momentum
  buffers and schedule come from the checkpoint;
- a NaN or infinite loss stops the run *before* the update, naming the term and the
  iteration, so the last checkpoint is still a good one to go back to (with a lower lr, say).

Iterations are counted from 0; a checkpoint is named after the number completed
(``model_0000010.npz`` after iterations 0..9), which is where a resumed run starts.
"""

import dataclasses
import json
import math
import os
import time

import numpy as np

from ..backend import to_device
from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def build_model(cfg):
    """The real model: ``MaskRCNN(cfg)`` (imported here, so the engine does not depend on it)."""
    from ..models import MaskRCNN

    return MaskRCNN(cfg)


def seed_samplers(model, seed, iteration):
    """Give every random generator in ``model`` a new one seeded by (seed, iteration, k).

    Found on every module of the model: attributes that are NumPy ``Generator``s (``MaskRCNN``'s
    ``scale_rng``, drawing the multi-scale training size), and objects with an ``rng``
    attribute that is one (``BalancedPositiveNegativeSampler`` for the RPN's anchors and the
    heads' RoIs).  Reseeding them before each iteration makes that iteration's draws depend on
    nothing but (seed, iteration), so a resumed run need not save their running state.
    Returns how many were reseeded.
    """
    k = 0
    for module in model.modules():
        for name, value in sorted(vars(module).items()):
            fresh = np.random.default_rng([seed, 2, iteration, k])
            if isinstance(value, np.random.Generator):
                object.__setattr__(module, name, fresh)
                k += 1
            elif isinstance(getattr(value, "rng", None), np.random.Generator):
                value.rng = fresh
                k += 1
    return k


def _to_device(images, targets, device):
    """Images and the arrays of the targets onto ``device`` (no copy for "cpu")."""
    if device == "cpu":
        return images, targets
    images = [to_device(im, device) for im in images]
    targets = [{k: to_device(v, device) if isinstance(v, np.ndarray) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _read_metrics(path, before=None):
    """Records of ``metrics.jsonl`` (those with iter < ``before`` if given)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if before is None or r["iter"] < before]


def save_loss_plot(records, path):
    """Draw ``records`` (metrics.jsonl lines) to a PNG with matplotlib's Agg (no display)."""
    from ..viz import new_figure, plot_losses

    fig = new_figure(8, 5)
    plot_losses(records, ax=fig.add_subplot())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _match_classes(cfg, dataset, log):
    """The config's classes must be the data set's: same count; names taken from the data."""
    k = len(dataset.class_names)
    if cfg.num_classes != k + 1:
        raise ValueError(f"{dataset.ann_file} has {k} classes {list(dataset.class_names)}, so the model "
                         f"needs num_classes={k + 1} (with background), but the config says "
                         f"num_classes={cfg.num_classes}; use --set num_classes={k + 1}")
    if tuple(cfg.class_names) != tuple(dataset.class_names):
        if cfg.class_names:
            log(f"class names {list(cfg.class_names)} replaced by the data set's {list(dataset.class_names)}")
        cfg = dataclasses.replace(cfg, class_names=tuple(dataset.class_names))
    if getattr(cfg, "keypoint_on", False):
        names = tuple(getattr(dataset, "keypoint_names", ()))
        if len(names) != cfg.num_keypoints:
            raise ValueError(f"{dataset.ann_file} has {len(names)} keypoints per object but the config "
                             f"says num_keypoints={cfg.num_keypoints}")
        cfg = dataclasses.replace(cfg, keypoint_names=names, keypoint_skeleton=dataset.keypoint_skeleton)
    return cfg


def _config_changes(old, new):
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}


def train(cfg, train_ann, train_images=None, val_ann=None, val_images=None, out_dir="runs/run",
          device="cpu", resume=False, log=print, model_fn=None, progress=True):
    """Train a model on a COCO-format data set; return a summary dict.

    cfg:          a ``MaskRCNNConfig`` (its training fields: batch_size, iters, lr, momentum,
                  weight_decay, milestones, gamma, warmup_*, hflip_prob, seed, *_period, ...).
    train_ann, train_images: the training JSON and image folder (default ``images/`` beside it);
    val_ann, val_images:     the same for evaluation (optional: without it, no evaluation).
    out_dir:      where checkpoints, metrics.jsonl, loss.png and eval_*/ go.
    device:       "cpu" or "gpu".
    resume:       continue from the newest checkpoint of ``out_dir``.
    model_fn:     ``cfg -> Module``; default ``build_model``, the real ``MaskRCNN`` (tests pass
                  a tiny one: the engine only needs ``model(images, targets)`` and ``predict``).
    progress:     show a tqdm bar (losses, lr, s/iter, ETA).
    """
    from ..data import CocoDataset, DataLoader, RandomHorizontalFlip
    from ..nn import init
    from ..optim import SGD, WarmupMultiStepLR, param_groups_no_decay
    from .evaluator import evaluate

    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    dataset = CocoDataset(train_ann, train_images, train=True)
    val_set = CocoDataset(val_ann, val_images, train=False) if val_ann else None
    cfg = _match_classes(cfg, dataset, log)

    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    state = None
    if resume:
        found = latest_checkpoint(out_dir)
        if found is None:
            log(f"resume: no checkpoint in {out_dir}, starting from iteration 0")
        else:
            state = load_checkpoint(found)
            log(f"resuming from {found} (iteration {state['iteration']})")
            changes = _config_changes(state["config"], cfg) if state["config"] is not None else {}
            if changes:
                log("note: the config differs from the checkpoint's: " +
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    elif list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints "
                              f"({os.path.basename(latest_checkpoint(out_dir))}); pass resume=True "
                              f"(--resume) to continue that run, or choose another out_dir (--out)")

    # Everything random starts from cfg.seed: weight init now, data and samplers per iteration.
    init.manual_seed(cfg.seed)
    model = (model_fn or build_model)(cfg)
    model.to(device)
    model.train()
    optimizer = SGD(param_groups_no_decay(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = WarmupMultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma,
                                  warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor)
    start, seed = 0, cfg.seed
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["iteration"]
        seed = state["loader"]["seed"]  # the data order of the run being continued
    # A flipped left knee is a right knee: keypoint data sets give the swap map.
    flip = RandomHorizontalFlip(cfg.hflip_prob, getattr(dataset, "keypoint_flip_map", None))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=seed,
                        train_transform=flip, drop_last=True)

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    # Lines past the checkpoint (from a run that crashed later) are redone: drop them.
    records = _read_metrics(metrics_path, before=start)
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    log(f"training on {len(dataset)} images ({dataset.ann_file}), {len(dataset.class_names)} classes, "
        f"batch {cfg.batch_size}, iterations {start}..{cfg.iters}, device {device}, output {out_dir}")
    last_good = latest_checkpoint(out_dir) if state is not None else None
    eval_results = None
    train_time = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)
        if log is print:  # print would tear the bar; tqdm.write prints above it
            log = lambda *parts: tqdm.write(" ".join(str(p) for p in parts))  # noqa: E731
    batches = loader.batches(start, cfg.iters)
    try:
        with open(metrics_path, "a") as metrics_file:
            t_data = time.perf_counter()
            for it, (images, targets) in enumerate(batches, start):
                t0 = time.perf_counter()
                images, targets = _to_device(images, targets, device)
                seed_samplers(model, seed, it)
                losses = model(images, targets)
                values = {k: float(v.item()) for k, v in losses.items()}
                values["total"] = sum(values.values())
                for name, v in values.items():
                    if not math.isfinite(v):
                        where = last_good if last_good else "none (no checkpoint was written yet)"
                        raise FloatingPointError(f"{name} is {v} at iteration {it}; the last good "
                                                 f"checkpoint is {where}")
                total = None
                for v in losses.values():
                    total = v if total is None else total + v
                lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                scheduler.step()

                t1 = time.perf_counter()
                train_time += t1 - t_data
                record = {"iter": it, **values, "lr": lr, "time": round(t1 - t_data, 4),
                          "data_time": round(t0 - t_data, 4)}
                records.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if bar is not None:
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()}
                                    | {"lr": f"{lr:.2g}"}, refresh=False)
                    bar.update()

                done = it + 1
                if (cfg.checkpoint_period > 0 and done % cfg.checkpoint_period == 0) or done == cfg.iters:
                    last_good = save_checkpoint(checkpoint_path(out_dir, done), model, optimizer, scheduler,
                                                cfg, done, loader)
                    prune_checkpoints(out_dir, cfg.keep_checkpoints)
                if val_set is not None and cfg.eval_period > 0 and done % cfg.eval_period == 0 \
                        and done != cfg.iters:
                    eval_results = evaluate(model, val_set, os.path.join(out_dir, f"eval_{done:07d}"),
                                            batch_size=cfg.batch_size, log=log)
                    model.train()
                t_data = time.perf_counter()
    finally:
        batches.close()  # stops the prefetch thread
        if bar is not None:
            bar.close()

    trained = max(0, cfg.iters - start)
    if val_set is not None:
        eval_results = evaluate(model, val_set, os.path.join(out_dir, f"eval_{cfg.iters:07d}"),
                                batch_size=cfg.batch_size, log=log)
    plot = save_loss_plot(records, os.path.join(out_dir, "loss.png"))
    last = records[-1] if records else {}
    recent = records[-20:]
    summary = {
        "out_dir": out_dir,
        "iterations": cfg.iters,
        "start_iter": start,
        "final_losses": {k: v for k, v in last.items() if k.startswith("loss") or k == "total"},
        "median_losses_last_20": {k: float(np.median([r[k] for r in recent])) for k in last
                                  if k.startswith("loss") or k == "total"},
        "train_time_s": train_time,
        "s_per_iter": train_time / trained if trained else None,
        "images_per_s": trained * cfg.batch_size / train_time if train_time > 0 else None,
        "checkpoint": last_good,
        "loss_plot": plot,
        "eval": eval_results,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if trained:
        log(f"done: {trained} iterations in {train_time:.1f} s ({summary['s_per_iter']:.3f} s/iter, "
            f"{summary['images_per_s']:.2f} images/s); total loss {last.get('total', float('nan')):.4f}; "
            f"checkpoint {last_good}")
    return summary


__all__ = ["train", "build_model", "seed_samplers", "save_loss_plot"]
