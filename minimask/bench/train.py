"""minimask beside torchvision's Mask R-CNN built to the same config, on the CPU, in one run.

``minimask bench train --config shapes [--repeat 10] [--set key=value] [--json out.json]``
prints, for a training step and for inference on one image:

- minimask's median time, torchvision's (its ``MaskRCNN`` built layer for layer to the same
  config by ``torch_side.build_mirror``, given minimask's random weights by ``copy_weights``,
  fed the same batches), and the ratio minimask / torchvision;
- the GFLOP of the step counted from the layers that ran (``flops.py``: every conv and fc
  layer's multiply-adds at the actual feature sizes and RoI counts, x2 for FLOP, x3 for
  forward + backward) and the GFLOP/s each side achieved on them;
- this machine's single-precision matrix-product rate, measured in the same run (NumPy float32
  1024x1024 matmul, the BLAS the convolutions use): how far the step is from the arithmetic
  limit, and a yardstick to compare machines by;
- inference by stage: the median time of each submodule both models have under the same name
  (``STAGES``: ResNet body, FPN, RPN, the RoI heads' poolers, heads and predictors), and the
  rest, so that a ratio can be traced to the part of the network it comes from.

The batches are the synthetic shapes (``data/shapes.py``) drawn at the config's training size,
square when its shorter and longer sides are equal (``shapes``: 128x128), otherwise 3:4 (the
shape of most COCO images: 800x1067 for ``r50_fpn``); ``--set batch_size=N`` changes the
batch.  Both sides take turns step by step (so load from other processes falls on both alike),
each side's steps are timed after two warm-up steps (Numba compiles, caches fill), wall time
and CPU time of the process (all its threads), medians; each timed call starts after a
``SETTLE_S`` pause, so that the other side's thread pools have stopped spinning.  The
optimizer is SGD with momentum at a small constant learning rate: the step's work, not the
training, is what is measured.

torch and torchvision are optional (``torch_side.load``): without them, or where torchvision's
compiled operators do not load (a CUDA build of torchvision next to a CPU-only torch), only
minimask's numbers are printed, with the reason.  Thread counts: minimask's BLAS and Numba
pools as the environment sets them (``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``, ...); torch is
given as many threads as the BLAS has, so both use the same cores.

``--set data_parallel=2`` times minimask's step as the trainer runs it then (``engine/parallel.py``:
two one-thread processes, each on half the batch); torchvision keeps its threads, given back
between minimask's steps.  Its CPU time is then the trainer's process only, and its GFLOP is
the first share's count times the number of shares.
"""

import contextlib
import dataclasses
import json
import platform
import statistics
import time

import numpy as np

from . import flops

WARMUP = 2  # untimed steps (or images) before the timed ones


# ---------------------------------------------------------------- the machine


def cpu_name():
    """The CPU's model name (``lscpu``'s "Model name"), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(n=1024, repeat=7):
    """GFLOP/s of NumPy's float32 n x n matrix product (2 n^3 FLOP), median of ``repeat``."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # the BLAS starts its threads
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def thread_counts():
    from numba import get_num_threads

    from .ops import blas_threads

    return dict(blas=blas_threads(), numba=get_num_threads())


# ---------------------------------------------------------------- inputs


def image_size(cfg):
    """(h, w) of the bench's images: the config's training size, square or 3:4 (see above)."""
    h = cfg.min_size[0]
    w = h if cfg.max_size <= h else min(cfg.max_size, round(h * 4 / 3))
    return h, w


def shapes_batches(count, batch, size, seed=0):
    """``count`` batches of ``batch`` synthetic shapes images of ``size`` (h, w) with targets
    (boxes from the visible masks, labels 1..3)."""
    from ..data.shapes import make_image

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(count):
        images, targets = [], []
        while len(images) < batch:
            image, objects = make_image(rng, max(h, w))
            masks = np.array([o["visible"][:h, :w] for o in objects], np.uint8).reshape(-1, h, w)
            keep = masks.reshape(len(masks), -1).sum(1) >= 16  # still an object after the crop
            if not keep.any():
                continue
            masks = masks[keep]
            boxes = []
            for m in masks:
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels = np.array([o["label"] for o, k in zip(objects, keep) if k], np.int64)
            images.append(np.ascontiguousarray(image[:h, :w]))
            targets.append(dict(boxes=np.array(boxes, np.float32), labels=labels, masks=masks))
        out.append((images, targets))
    return out


# ---------------------------------------------------------------- timing


# Before each timed call the process sleeps this long, so that the thread pools the other side
# just used have gone to sleep: OpenBLAS's workers spin for a while after each call (its
# THREAD_TIMEOUT, up to about 0.1 s), and torch's OpenMP threads likewise.  Without the pause a
# side's call starts while the other's pool still spins on the two cores, and both are slowed
# by an amount that depends on the order of the turns, which neither side has in real use.
SETTLE_S = 0.25


class Clock:
    """Wall and CPU seconds of each timed call (CPU: ``time.process_time``, all threads)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __call__(self, fn, *args):
        time.sleep(SETTLE_S)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)
        return out

    def summary(self, gflop=None):
        wall, cpu = statistics.median(self.wall), statistics.median(self.cpu)
        out = dict(wall_ms=1e3 * wall, cpu_ms=1e3 * cpu, wall_all_ms=[round(1e3 * t, 2) for t in self.wall])
        if gflop is not None:
            out["gflop"] = gflop
            out["gflops_per_s"] = gflop / wall
        return out


# The parts of inference timed one by one: submodules both models have under the same names
# (the mirror is built that way).  What is left of the total ("the rest") is the model's own
# code between them: the input transform, the RPN's and the box head's decoding and NMS, the
# mask pasting and the post-processing.
STAGES = ("backbone.body", "backbone.fpn", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head",
          "roi_heads.box_predictor", "roi_heads.mask_roi_pool", "roi_heads.mask_head",
          "roi_heads.mask_predictor")


def _timed(fn, name, seconds):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    return timed


@contextlib.contextmanager
def stage_times(model, seconds):
    """While active, each call of a ``STAGES`` submodule of ``model`` (minimask's or
    torchvision's) adds its wall time to ``seconds[name]``.  torch's modules get forward hooks;
    minimask's Modules call ``self.forward``, which an instance attribute wraps; its other
    callables (the poolers) are swapped for a timed stand-in.  All undone on exit."""
    from ..nn import Module

    undo = []
    for name in STAGES:
        *path, leaf = name.split(".")
        parent = model
        for part in path:
            parent = getattr(parent, part, None)
        module = getattr(parent, leaf, None)
        if module is None:
            continue
        if hasattr(module, "register_forward_hook"):  # torch.nn.Module
            def pre(mod, args):
                mod._bench_t0 = time.perf_counter()

            def post(mod, args, out, name=name):
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - mod._bench_t0
            undo += [module.register_forward_pre_hook(pre).remove, module.register_forward_hook(post).remove]
        elif isinstance(module, Module):
            module.forward = _timed(module.forward, name, seconds)
            undo.append(lambda module=module: delattr(module, "forward"))
        else:
            object.__setattr__(parent, leaf, _timed(module, name, seconds))
            undo.append(lambda p=parent, leaf=leaf, m=module: object.__setattr__(p, leaf, m))
    try:
        yield seconds
    finally:
        for u in undo:
            u()


def stage_summary(per_call, totals):
    """Median ms per stage over the timed calls, and "rest": the total less the stages."""
    out = {}
    for name in STAGES:
        values = [call.get(name, 0.0) for call in per_call]
        if any(values):
            out[name] = 1e3 * statistics.median(values)
    out["rest"] = 1e3 * statistics.median([t - sum(call.values()) for call, t in zip(per_call, totals)])
    return out


# ---------------------------------------------------------------- torchvision's side


def torchvision_problem(torch, tv):
    """Why torchvision's own operators cannot be timed here, or None.  Its compiled extension
    must be loaded (not stand-ins defined in Python) and RoIAlign must run forward and
    backward, as a training step needs."""
    if not any("torchvision" in str(p) for p in getattr(torch.ops, "loaded_libraries", ())):
        return ("torchvision's compiled operators are not loaded (its _C extension does not load with "
                "this torch, e.g. a CUDA torchvision beside a CPU-only torch)")
    try:
        x = torch.zeros((1, 1, 4, 4), requires_grad=True)
        rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]])
        tv.ops.roi_align(x, rois, (2, 2), 1.0, 2, True).sum().backward()
    except Exception as e:
        return f"torchvision.ops.roi_align does not run forward and backward ({type(e).__name__}: {e})"
    return None


def load_torchvision():
    """(torch, torchvision, problem): both modules, or Nones and the reason."""
    from . import torch_side

    torch, tv, problem = torch_side.load("cpu")
    if tv is not None:
        problem = torchvision_problem(torch, tv)
    return (torch, tv, None) if problem is None else (None, None, problem)


class TorchvisionSide:
    """torchvision's MaskRCNN mirrored from ``cfg`` with ``ours``'s weights, and its steps."""

    def __init__(self, torch, tv, cfg, ours, lr, threads):
        from . import torch_side

        self.torch, self.side = torch, torch_side
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.model = torch_side.build_mirror(torch, tv, cfg)
        torch_side.copy_weights(ours, self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.losses = []

    def inputs(self, images, targets=None):
        return self.side.images_and_targets(self.torch, images, targets, "cpu")

    def step(self, i, images, targets):
        self.torch.manual_seed(i)
        self.model.train()
        total = self.side.train_step(self.torch, self.model, self.opt, images, targets)
        self.losses.append(float(total.detach()))

    def predict(self, image):
        self.model.eval()
        with self.torch.no_grad():
            return len(self.model(image)[0]["boxes"])


# ---------------------------------------------------------------- the run


def _ratio(ours, theirs, key):
    return ours[key] / theirs[key] if theirs else None


def run(config="shapes", repeat=10, overrides=(), json_path=None, with_torch=True, log=print):
    """Time both sides and print the comparison; returns the results (also written to
    ``json_path``).  ``with_torch=False`` times minimask only."""
    from ..engine.parallel import DataParallel
    from ..engine.trainer import train_step
    from ..models import build_model
    from ..models.config import override, preset
    from ..optim import SGD, WarmupMultiStepLR, param_groups_no_decay

    cfg = override(preset(config), list(overrides))
    if cfg.keypoint_on or not cfg.mask_on:
        raise ValueError(f"bench train: --config {config} is not a Mask R-CNN with masks "
                         "(the shapes batches have no keypoints; torchvision's mirror is a MaskRCNN)")
    size = image_size(cfg)
    cfg = dataclasses.replace(cfg, min_size=(min(size),), max_size=max(size))  # no resizing
    threads = thread_counts()
    torch, tv, problem = load_torchvision() if with_torch else (None, None, "not asked for")
    sgemm = sgemm_gflops()
    results = dict(config=config, overrides=list(overrides), cpu=cpu_name(), threads=threads,
                   sgemm_gflops=sgemm, batch=cfg.batch_size, size=list(size), repeat=repeat, warmup=WARMUP,
                   data_parallel=cfg.data_parallel,
                   torchvision=dict(available=torch is not None, problem=problem))
    log(f"minimask bench train --config {config}: {cpu_name()}; BLAS {threads['blas']} thread(s), "
        f"Numba {threads['numba']}; sgemm (float32 1024^2) {sgemm:.1f} GFLOP/s")
    if torch is not None:
        results["torchvision"].update(torch=torch.__version__, torchvision=tv.__version__,
                                      threads=threads["blas"])
        log(f"torch {torch.__version__}, torchvision {tv.__version__} ({threads['blas']} threads), "
            f"its MaskRCNN built to the same config with the same weights, same batches")
    else:
        log(f"no torchvision side: {problem}")

    lr = 1e-4
    ours = build_model(cfg)
    ours.train()
    theirs = TorchvisionSide(torch, tv, cfg, ours, lr, threads["blas"]) if torch is not None else None
    opt = SGD(param_groups_no_decay(ours, cfg.weight_decay), lr=lr, momentum=cfg.momentum)
    constant_lr = WarmupMultiStepLR(opt, (), warmup_iters=0)
    batches = shapes_batches(WARMUP + repeat, cfg.batch_size, size, seed=0)
    t_batches = [theirs.inputs(*b) for b in batches] if theirs else None
    losses = []

    # ---- training steps: the two sides take turns ---------------------------------------------
    ours_clock, theirs_clock, step_macs = Clock(), Clock(), []
    parallel = (DataParallel(ours, cfg.data_parallel, cfg.seed) if cfg.data_parallel > 1
                else contextlib.nullcontext())
    with parallel as dp:
        if dp is not None:
            log(f"minimask: data_parallel={dp.n}, {dp.n} one-thread processes of "
                f"{cfg.batch_size // dp.n} images each")
        for i, (images, targets) in enumerate(batches):
            timed = i >= WARMUP
            ours.reseed(cfg.seed, i)
            step = (lambda *a: train_step(ours, *a)) if dp is None else (lambda *a: dp.step(i, *a))
            with flops.counting() as count:
                values = (ours_clock(step, opt, constant_lr, images, targets) if timed
                          else step(opt, constant_lr, images, targets))
            losses.append(values["total"])
            if timed:
                step_macs.append(count.macs * cfg.data_parallel)  # share 0's count, times the shares
            if theirs is not None:
                with dp.threads_released() if dp is not None else contextlib.nullcontext():
                    if timed:
                        theirs_clock(theirs.step, i, *t_batches[i])
                    else:
                        theirs.step(i, *t_batches[i])
    gflop = flops.step_gflop(statistics.median(step_macs))
    train = dict(minimask=ours_clock.summary(gflop), loss_first=losses[0], loss_last=losses[-1])
    if theirs is not None:
        train["torchvision"] = theirs_clock.summary(gflop)
        train["torchvision"].update(loss_first=theirs.losses[0], loss_last=theirs.losses[-1])
        train["ratio_wall"] = _ratio(train["minimask"], train["torchvision"], "wall_ms")
        train["ratio_cpu"] = _ratio(train["minimask"], train["torchvision"], "cpu_ms")
    results["train"] = train

    # ---- inference, one image at a time ---------------------------------------------------------
    ours.eval()
    images = [im for b in shapes_batches(WARMUP + repeat, 1, size, seed=1) for im in b[0]]
    t_images = [theirs.inputs([im])[0] for im in images] if theirs else None
    ours_clock, theirs_clock, image_macs, found = Clock(), Clock(), [], [[], []]
    stages = [[], []]  # per timed call: {stage: seconds}, minimask's and torchvision's
    for i, image in enumerate(images):
        timed = i >= WARMUP
        with flops.counting() as count, stage_times(ours, {}) as seconds:
            dets = ours_clock(ours.predict, [image]) if timed else ours.predict([image])
        found[0].append(len(dets[0]["boxes"]))
        if timed:
            image_macs.append(count.macs)
            stages[0].append(seconds)
        if theirs is not None:
            predict = theirs_clock if timed else (lambda fn, *args: fn(*args))
            with stage_times(theirs.model, {}) as seconds:
                found[1].append(predict(theirs.predict, t_images[i]))
            if timed:
                stages[1].append(seconds)
    gflop = flops.forward_gflop(statistics.median(image_macs))
    infer = dict(minimask=ours_clock.summary(gflop), detections=found[0])
    infer["minimask"]["stages_ms"] = stage_summary(stages[0], ours_clock.wall)
    if theirs is not None:
        infer["torchvision"] = theirs_clock.summary(gflop)
        infer["torchvision"]["detections"] = found[1]
        infer["torchvision"]["stages_ms"] = stage_summary(stages[1], theirs_clock.wall)
        infer["ratio_wall"] = _ratio(infer["minimask"], infer["torchvision"], "wall_ms")
        infer["ratio_cpu"] = _ratio(infer["minimask"], infer["torchvision"], "cpu_ms")
    results["infer"] = infer

    _print(results, log)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {json_path}")
    return results


def _print(results, log):
    h, w = results["size"]
    rows = [(f"training step, {results['batch']} images {h}x{w}", results["train"]),
            (f"inference, one {h}x{w} image", results["infer"])]
    log(f"median of {results['repeat']} after {results['warmup']} warm-up; ms wall (ms CPU); "
        f"GFLOP counted from the layers that ran, GFLOP/s achieved on them")
    log(f"{'':36s} {'GFLOP':>7s} {'minimask':>18s} {'GFLOP/s':>8s} {'torchvision':>18s} {'GFLOP/s':>8s}"
        f" {'ratio':>6s}")
    for name, r in rows:
        m, t = r["minimask"], r.get("torchvision")
        theirs = (f"{t['wall_ms']:8.1f} ({t['cpu_ms']:7.1f}) {t['gflops_per_s']:8.1f} {r['ratio_wall']:6.2f}"
                  if t else f"{'-':>18s} {'-':>8s} {'-':>6s}")
        log(f"{name:36s} {m['gflop']:7.2f} {m['wall_ms']:8.1f} ({m['cpu_ms']:7.1f}) {m['gflops_per_s']:8.1f} "
            + theirs)
    ours, theirs = results["infer"]["minimask"]["stages_ms"], results["infer"].get("torchvision")
    theirs = theirs["stages_ms"] if theirs else {}
    log("inference by stage, median ms per image (the same submodules on both sides):")
    for name, ms in ours.items():
        t = theirs.get(name)
        log(f"  {name:28s} {ms:8.2f}" + (f" {t:8.2f} {ms / t:6.2f}" if t else ""))
    s = results["sgemm_gflops"]
    m = results["train"]["minimask"]
    log(f"minimask's step runs at {100 * m['gflops_per_s'] / s:.0f}% of the sgemm rate "
        f"(the step's arithmetic alone would take {1e3 * m['gflop'] / s:.0f} ms at it)")


def main(config="shapes", repeat=10, overrides=(), json_path=None):
    """Entry point of ``minimask bench train``."""
    try:
        return run(config, repeat, overrides, json_path)
    except ValueError as e:
        raise SystemExit(f"minimask bench train: {e}") from None


__all__ = ["run", "main", "sgemm_gflops", "cpu_name", "image_size", "shapes_batches", "torchvision_problem"]
