"""The training loop (Sec. 3.1, "Training"): SGD on the multi-task loss, with checkpoints.

Mask R-CNN minimises Eq. 1 of the paper, L = L_cls + L_box + L_mask (plus the RPN's two
terms, as in Faster R-CNN), by SGD with momentum 0.9 and weight decay 1e-4, counting
*iterations*, not epochs (160k at 16 images per batch on COCO; the lr drops 10x at 120k).
The file reads in three pieces, then the loop that strings them together:

- ``open_run``: the run folder, ``config.json``, ``metrics.jsonl``, and on ``--resume`` the
  newest checkpoint (weights, momentum buffers, schedule, data seed);
- ``train_step(model, optimizer, scheduler, images, targets)``: one iteration, forward, the
  NaN/inf guard, backward, update; it returns the loss values;
- ``finish``: the final evaluation, ``loss.png``, ``summary.json``.

What makes it a tool:

- ``metrics.jsonl``: one JSON line per iteration (iter, each loss, total, lr, seconds);
- checkpoints every ``cfg.checkpoint_period`` iterations and at the end, the newest
  ``cfg.keep_checkpoints`` kept (``checkpoint.py``);
- COCO evaluation every ``cfg.eval_period`` iterations (if > 0) and at the end;
- exact resume: a run stopped and resumed computes the same losses, bit for bit (on the CPU),
  as one that never stopped.  Every random draw is a pure function of (seed, iteration): the
  loader's order and flips (``data/loader.py``), and the model's own generators, which
  ``model.reseed(seed, iteration)`` replaces before each iteration;
- a NaN or infinite loss stops the run *before* the update, naming the term and the
  iteration, so the last checkpoint is still a good one to go back to (with a lower lr, say);
- nothing is lost to an interruption: SIGINT (Ctrl-C) or SIGTERM lets the iteration in
  progress finish (or drops a periodic evaluation), saves a checkpoint of the last completed
  iteration and raises ``TrainingInterrupted`` (the command prints how to resume and exits
  with 130 or 143); a second signal stops at once.  A run killed outright (SIGKILL, a crash)
  resumes from its last periodic checkpoint, since checkpoints are written atomically;
- the data is checked before the first iteration: annotations when they are read
  (``CocoDataset``), every image file at once (``CocoDataset.check_images``; with
  ``cfg.skip_bad_images`` the bad ones are left out instead).

The engine calls the model only through its public surface: ``model(images, targets)`` (the
loss dict), ``model.predict(images)``, ``model.reseed(seed, iteration)``, and the ``Module``
methods (``to``, ``train``, ``parameters``, ``named_buffers``, ``state_dict``).  Iterations are
counted from 0; a checkpoint is named after the number completed (``model_0000010.npz`` after iterations
0..9), which is where a resumed run starts.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time

import numpy as np

from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_unfinished,
    resumable_checkpoint,
    save_checkpoint,
)

# ---------------------------------------------------------------- one iteration


def loss_values(losses):
    """The loss dict's terms as floats, without ``total``."""
    return {k: float(v.item()) for k, v in losses.items()}


def check_finite(values):
    """The guard: raise ``FloatingPointError`` naming the first NaN or infinite value."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"{name} is {v}")


def sum_losses(losses):
    """The Tensor the step differentiates: the sum of the loss dict's terms (each weight 1)."""
    total = None
    for v in losses.values():
        total = v if total is None else total + v
    return total


def train_step(model, optimizer, scheduler, images, targets):
    """One SGD iteration on one batch; returns the loss values (floats, with ``total``).

    forward (the loss dict of Eq. 1), then the guard: a NaN or infinite term raises
    ``FloatingPointError`` naming it *before* any weight changes; then backward through the sum
    and one optimizer and scheduler step.
    """
    losses = model(images, targets)
    values = loss_values(losses)
    values["total"] = sum(values.values())
    check_finite(values)
    optimizer.zero_grad()
    sum_losses(losses).backward()
    optimizer.step()
    scheduler.step()
    return values


# ---------------------------------------------------------------- the run folder


@dataclasses.dataclass
class Run:
    """What a run knows about its folder: where it starts, its data seed, its records."""
    out_dir: str
    start: int = 0
    seed: int = 0
    state: dict = None          # the checkpoint resumed from (None for a fresh run)
    records: list = dataclasses.field(default_factory=list)
    last_good: str = None       # the newest checkpoint written or resumed from
    train_time: float = 0.0

    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, "metrics.jsonl")

    def record(self, metrics_file, it, values, lr, seconds, data_seconds):
        """One iteration's line of ``metrics.jsonl`` (written at once: a crash loses nothing)."""
        self.train_time += seconds
        record = {"iter": it, **values, "lr": lr, "time": round(seconds, 4),
                  "data_time": round(data_seconds, 4)}
        self.records.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()


def _read_metrics(path, before=None):
    """Records of ``metrics.jsonl`` (those with iter < ``before`` if given).  A line that does not
    parse (the last one, cut short by a kill while it was written) is left out."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                records.append(record)
    return [r for r in records if before is None or r["iter"] < before]


def _write_text(path, text):
    """Replace the file ``path`` by ``text`` atomically (``nn.atomic_write``, as the checkpoints),
    so a kill while it is written keeps the old file."""
    from ..nn import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def _config_changes(old, new):
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}


def open_run(cfg, out_dir, resume=False, log=print):
    """Create or reopen the run folder ``out_dir`` for ``cfg``; returns a ``Run``.

    A fresh run refuses a folder that already holds checkpoints; ``resume`` loads the newest
    one that can be read (an unreadable newer one is named in a warning and passed over).
    ``config.json`` is (re)written, and ``metrics.jsonl`` lines past the checkpoint (from a run
    that crashed later) are dropped, since those iterations are redone.  Temporary files of a
    save that a kill cut short are removed.
    """
    os.makedirs(out_dir, exist_ok=True)
    unfinished = remove_unfinished(out_dir)
    if unfinished:
        log(f"removed {len(unfinished)} unfinished file(s) of a run killed while saving: "
            f"{', '.join(os.path.basename(p) for p in unfinished)}")
    run = Run(out_dir, seed=cfg.seed)
    if resume:
        found, state = resumable_checkpoint(out_dir, log)
        if found is None:
            log(f"resume: no checkpoint in {out_dir}, starting from iteration 0")
        else:
            run.state = state
            run.start, run.last_good = run.state["iteration"], found
            run.seed = run.state["loader"]["seed"]  # the data order of the run being continued
            log(f"resuming from {found} (iteration {run.start})")
            changes = _config_changes(run.state["config"], cfg) if run.state["config"] is not None else {}
            if changes:
                log("note: the config differs from the checkpoint's: " +
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    elif list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints "
                              f"({os.path.basename(latest_checkpoint(out_dir))}); pass resume=True "
                              f"(--resume) to continue that run, or choose another out_dir (--out)")
    _write_text(os.path.join(out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2))
    run.records = _read_metrics(run.metrics_path, before=run.start)
    _write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in run.records))
    return run


def build_training(cfg, device, state=None, model_fn=None, log=print):
    """The model on ``device`` in training mode, its SGD optimizer (no weight decay on norms and
    biases) and warm-up + multi-step schedule; restored from ``state`` when resuming.

    A fresh run with ``cfg.backbone_weights`` starts its ResNet from that ImageNet backbone file
    (``models.backbone_weights.load_backbone_weights``, which names any tensor that does not fit),
    as the paper does (Sec. 3.1); a resumed run takes every weight from its checkpoint instead."""
    from ..models import build_model
    from ..nn import init
    from ..optim import SGD, WarmupMultiStepLR, param_groups_no_decay

    init.manual_seed(cfg.seed)  # everything random starts from cfg.seed: weights now, draws per iteration
    model = (model_fn or build_model)(cfg)
    if state is None and cfg.backbone_weights:
        from ..models.backbone_weights import load_backbone_weights

        done = load_backbone_weights(model, cfg.backbone_weights)
        log(f"backbone: ImageNet ResNet-{done['depth']} weights from {done['path']} "
            f"({done['tensors']} tensors)")
    model.to(device)
    model.train()
    optimizer = SGD(param_groups_no_decay(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = WarmupMultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma,
                                  warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        scheduler.load_state_dict(state["scheduler"])
    return model, optimizer, scheduler


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


# ---------------------------------------------------------------- the end of a run


def save_loss_plot(records, path):
    """Draw ``records`` (metrics.jsonl lines) to a PNG with matplotlib's Agg (no display)."""
    from ..viz import new_figure, plot_losses

    fig = new_figure(8, 5)
    plot_losses(records, ax=fig.add_subplot())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def finish(run, cfg, model, val_set, log=print):
    """After the last iteration: evaluate on ``val_set`` (if any), draw ``loss.png``, write and
    return ``summary.json``'s dict."""
    from .evaluator import evaluate

    eval_results = None
    if val_set is not None:
        eval_results = evaluate(model, val_set, os.path.join(run.out_dir, f"eval_{cfg.iters:07d}"),
                                batch_size=cfg.batch_size, log=log)
    plot = save_loss_plot(run.records, os.path.join(run.out_dir, "loss.png"))
    trained = max(0, cfg.iters - run.start)
    last = run.records[-1] if run.records else {}
    recent = run.records[-20:]
    loss_keys = [k for k in last if k.startswith("loss") or k == "total"]
    summary = {
        "out_dir": run.out_dir,
        "iterations": cfg.iters,
        "start_iter": run.start,
        "final_losses": {k: last[k] for k in loss_keys},
        "median_losses_last_20": {k: float(np.median([r[k] for r in recent])) for k in loss_keys},
        "train_time_s": run.train_time,
        "s_per_iter": run.train_time / trained if trained else None,
        "images_per_s": trained * cfg.batch_size / run.train_time if run.train_time > 0 else None,
        "checkpoint": run.last_good,
        "loss_plot": plot,
        "eval": eval_results,
    }
    with open(os.path.join(run.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if trained:
        log(f"done: {trained} iterations in {run.train_time:.1f} s ({summary['s_per_iter']:.3f} s/iter, "
            f"{summary['images_per_s']:.2f} images/s); total loss {last.get('total', float('nan')):.4f}; "
            f"checkpoint {run.last_good}")
    return summary


def _progress(cfg, start, log, enabled):
    """A tqdm bar (losses, lr, s/iter, ETA) and a ``log`` that prints above it."""
    if not enabled:
        return None, log
    from tqdm import tqdm

    bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)
    if log is print:  # print would tear the bar; tqdm.write prints above it
        log = lambda *parts: tqdm.write(" ".join(str(p) for p in parts))  # noqa: E731
    return bar, log


# ---------------------------------------------------------------- interruptions


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (SIGINT: Ctrl-C, or SIGTERM).

    signum:     the signal (``signal.SIGINT`` or ``signal.SIGTERM``);
    iteration:  iterations completed and saved (None after a second signal: the one in progress
                was dropped and ``checkpoint`` is the last one written before);
    checkpoint: the checkpoint to resume from (None if no iteration had completed);
    at_once:    True if a second signal cut the run short without waiting.
    """

    def __init__(self, signum, iteration, checkpoint, at_once=False):
        self.signum, self.iteration, self.checkpoint, self.at_once = signum, iteration, checkpoint, at_once
        name = signal.Signals(signum).name
        if at_once:
            text = f"{name} twice: stopped at once, the iteration in progress is lost"
        else:
            text = f"{name}: stopped after iteration {iteration}"
        super().__init__(text + (f"; checkpoint {checkpoint}" if checkpoint else "; no checkpoint yet"))


class _Abandon(KeyboardInterrupt):
    """Raised by the signal handler inside work that may be dropped (a periodic evaluation)."""


class _StopOnSignal:
    """While training: the first SIGINT or SIGTERM only asks the loop to stop (``signum``), so
    the iteration in progress finishes (a signal arriving inside a NumPy or Numba call is seen
    when it returns, never half-way through an update); during ``abandon`` work (evaluation)
    it raises ``_Abandon`` to drop that work.  A second signal raises ``TrainingInterrupted``
    at once.  Installed only in the main thread (the only one Python lets handle signals)."""

    def __init__(self, run):
        self.run, self.signum, self.abandon, self._old = run, None, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise TrainingInterrupted(signum, None, self.run.last_good, at_once=True)
        self.signum = signum
        # os.write, not print: the handler may run in the middle of a print in the main thread
        key = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        os.write(2, f"\n{signal.Signals(signum).name}: finishing the current iteration, then saving a "
                    f"checkpoint ({key} again to quit at once)\n".encode())
        if self.abandon:
            raise _Abandon()


# ---------------------------------------------------------------- the data


def _load_data(cfg, train_ann, train_images, val_ann, val_images, log, progress):
    """The training and validation ``CocoDataset``s, checked: annotations as they are read,
    then every image file at once (bad ones skipped with ``cfg.skip_bad_images``)."""
    from ..data import CocoDataset

    dataset = CocoDataset(train_ann, train_images, train=True, masks=cfg.mask_on)
    val_set = CocoDataset(val_ann, val_images, train=False, masks=False) if val_ann else None
    if val_set is not None and cfg.mask_on and not val_set.has_masks and \
            any(val_set.anns[i] for i in val_set.image_ids):
        raise ValueError(f"{val_set.ann_file}: no annotation has a segmentation, so the mask AP of a mask "
                         f"model cannot be computed on it; give a --val-ann with masks (or none), or train "
                         f"boxes only with --set mask_on=False")
    for ds in (dataset, val_set):
        for note in getattr(ds, "notes", ()):
            log(note)
    cfg = _match_classes(cfg, dataset, log)
    for ds in (dataset, val_set):
        if ds is not None:
            ds.check_images(skip=cfg.skip_bad_images, progress=progress, log=log)
    if len(dataset) == 0:
        bad = len(dataset.skipped_images)
        raise ValueError(f"{dataset.ann_file}: no image with a usable annotation to train on (of its "
                         f"{len(dataset.images)} images, {len(dataset.images) - bad} have no object: no "
                         f"annotation, only crowd regions or only degenerate ones" +
                         (f"; {bad} bad image files were skipped" if bad else "") + ")")
    return cfg, dataset, val_set


# ---------------------------------------------------------------- the loop


def _save(cfg, run, done, model, optimizer, scheduler, loader):
    run.last_good = save_checkpoint(checkpoint_path(run.out_dir, done), model, optimizer, scheduler, cfg,
                                    done, loader)
    prune_checkpoints(run.out_dir, cfg.keep_checkpoints)


def _checkpoint_and_evaluate(cfg, run, done, model, optimizer, scheduler, loader, val_set, stop, log):
    """What is due after ``done`` iterations: a checkpoint every ``checkpoint_period`` and at the
    end, an evaluation every ``eval_period`` (dropped, not half-run, if a signal comes)."""
    from .evaluator import evaluate

    if (cfg.checkpoint_period > 0 and done % cfg.checkpoint_period == 0) or done == cfg.iters:
        _save(cfg, run, done, model, optimizer, scheduler, loader)
    if val_set is None or cfg.eval_period <= 0 or done % cfg.eval_period or done == cfg.iters \
            or stop.signum is not None:
        return
    stop.abandon = True
    try:
        evaluate(model, val_set, os.path.join(run.out_dir, f"eval_{done:07d}"), batch_size=cfg.batch_size,
                 log=log)
    except _Abandon:
        log(f"evaluation at iteration {done} dropped")
    finally:
        stop.abandon = False
    model.train()


def _show(bar, values, lr):
    if bar is not None:
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()} | {"lr": f"{lr:.2g}"},
                        refresh=False)
        bar.update()


def data_parallel_context(cfg, device, model, seed, log):
    """The context that runs each batch in ``cfg.data_parallel`` processes (``parallel.py``), or
    one that does nothing (yielding None) for one process."""
    from .parallel import DataParallel

    if cfg.data_parallel == 1:
        return contextlib.nullcontext()
    if device != "cpu":  # one GPU takes the whole batch (its numbers are not the CPU's bits anyway)
        log(f"note: data_parallel={cfg.data_parallel} shares a batch among CPU processes; on the GPU "
            f"the batch runs in one process")
        return contextlib.nullcontext()
    log(f"data parallel: {cfg.data_parallel} processes of {cfg.batch_size // cfg.data_parallel} images "
        f"each, one thread each")
    return DataParallel(model, cfg.data_parallel, seed)


def train(cfg, train_ann, train_images=None, val_ann=None, val_images=None, out_dir="runs/run",
          device="cpu", resume=False, log=print, model_fn=None, progress=True):
    """Train a model on a COCO-format data set; return the summary dict.

    cfg:          a ``MaskRCNNConfig`` (its training fields: batch_size, iters, lr, momentum,
                  weight_decay, milestones, gamma, warmup_*, hflip_prob, seed, *_period, ...).
    train_ann, train_images: the training JSON and image folder (default ``images/`` beside it);
    val_ann, val_images:     the same for evaluation (optional: without it, no evaluation).
    out_dir:      where checkpoints, metrics.jsonl, loss.png and eval_*/ go.
    device:       "cpu" or "gpu".
    resume:       continue from the newest checkpoint of ``out_dir``.
    model_fn:     ``cfg -> Module``; default ``models.build_model`` (tests pass a tiny model with
                  the same public surface: ``model(images, targets)``, ``predict``, ``reseed``).
    progress:     show a tqdm bar (losses, lr, s/iter, ETA).

    Raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``) after SIGINT or SIGTERM, once the
    last completed iteration is saved.
    """
    from ..data import DataLoader, RandomHorizontalFlip
    from .parallel import fork_available

    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    if cfg.data_parallel > 1 and device == "cpu" and not fork_available():
        raise ValueError(f"config: data_parallel={cfg.data_parallel} needs a system with fork (Linux); "
                         f"use --set data_parallel=1")
    cfg, dataset, val_set = _load_data(cfg, train_ann, train_images, val_ann, val_images, log, progress)
    run = open_run(cfg, out_dir, resume, log)
    model, optimizer, scheduler = build_training(cfg, device, run.state, model_fn, log=log)
    # A flipped left knee is a right knee: keypoint data sets give the swap map.
    flip = RandomHorizontalFlip(cfg.hflip_prob, getattr(dataset, "keypoint_flip_map", None))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=run.seed,
                        train_transform=flip, drop_last=True)
    log(f"training on {len(dataset)} images ({dataset.ann_file}), {len(dataset.class_names)} classes, "
        f"batch {cfg.batch_size}, iterations {run.start}..{cfg.iters}, device {device}, output {out_dir}")
    if loader.repeats:
        log(f"{len(dataset)} images are fewer than a batch of {cfg.batch_size}: each batch repeats them "
            f"(cut from shuffled passes over the images laid end to end)")
    late = [m for m in cfg.milestones if m >= cfg.iters]
    if late:
        log(f"note: milestones {list(late)} are at or past iters={cfg.iters}: the learning rate does not "
            f"drop there in this run")
    parallel = data_parallel_context(cfg, device, model, run.seed, log)  # forks before any thread starts
    bar, log = _progress(cfg, run.start, log, progress)
    batches = loader.batches(run.start, cfg.iters)
    stop = _StopOnSignal(run)
    done = run.start
    try:
        with parallel as dp, stop, open(run.metrics_path, "a") as metrics_file:
            t_data = time.perf_counter()
            for it, (images, targets) in enumerate(batches, run.start):
                if stop.signum is not None:
                    break  # asked to stop while the batch was read: iteration ``it`` is not begun
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
                try:
                    if dp is None:
                        model.reseed(run.seed, it)
                        values = train_step(model, optimizer, scheduler, images, targets)
                    else:  # reseeds each process itself
                        values = dp.step(it, optimizer, scheduler, images, targets)
                except FloatingPointError as e:
                    where = run.last_good or "none (no checkpoint was written yet)"
                    raise FloatingPointError(f"{e} at iteration {it}; the last good checkpoint is {where}") \
                        from None
                t1 = time.perf_counter()
                run.record(metrics_file, it, values, lr, t1 - t_data, t0 - t_data)
                _show(bar, values, lr)
                done = it + 1
                _checkpoint_and_evaluate(cfg, run, done, model, optimizer, scheduler, loader, val_set,
                                         stop, log)
                if stop.signum is not None:
                    break
                t_data = time.perf_counter()
            if stop.signum is not None:
                if done > 0 and run.last_good != checkpoint_path(out_dir, done):
                    _save(cfg, run, done, model, optimizer, scheduler, loader)
                raise TrainingInterrupted(stop.signum, done, run.last_good)
    finally:
        batches.close()  # stops the prefetch thread
        if bar is not None:
            bar.close()
    return finish(run, cfg, model, val_set, log)


__all__ = ["train", "train_step", "loss_values", "check_finite", "sum_losses", "open_run", "build_training",
           "finish", "Run", "save_loss_plot", "TrainingInterrupted"]
