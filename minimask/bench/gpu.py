"""minimask beside torchvision on the same GPU, in one run: kernels and the whole R50-FPN model.

``minimask bench gpu [--tf32] [--repeat 5] [--size 800x1333] [--json out.json]`` prints, for
each item, minimask's median time, torch/torchvision's on the same device in the same process,
and the ratio ours / theirs, with the targets of the project:

    conv2d forward+backward        at the shapes of R50-FPN on an 800x1333 batch of 2
    RoIAlign forward+backward      512 boxes over P2-P5, 7x7, sampling 2   (target: <= 1.5x)
    NMS                            2,000 and 10,000 boxes at IoU 0.5
    r50_fpn inference              ms per 800x1333 image    (targets: <= 2x and < 100 ms;
                                                             the paper: 195 ms on a Tesla M40)
    r50_fpn training step          ms at 2 images per batch                (target: <= 3x)
    peak memory                    CuPy's memory pool beside torch's caching allocator

How the comparison is kept fair:
- FP32 on both sides by default.  CuPy uses TF32 in matrix products only with CUPY_TF32=1
  (read when CuPy is imported), while PyTorch's cuDNN convolutions use TF32 unless
  ``torch.backends.cudnn.allow_tf32`` is False: we set it (and the matmul flag) False.  With
  ``--tf32`` both sides use TF32 (``minimask`` sets CUPY_TF32=1 before importing CuPy).
- The same network: torchvision's Mask R-CNN is built as for fine-tuning (frozen batch norm,
  3 trainable ResNet stages, like the ``r50_fpn`` preset) and its random weights are copied
  into minimask's model (same parameter names), so both compute the same thing on the same
  inputs; the number of detections of each side is printed as a check.
- Inputs already on the device for both, a warm-up call before timing (CUDA kernels compile,
  caches fill), the device synchronized before every clock reading, medians of ``repeat``.

It runs on the CPU too (``--device cpu``, slowly; ``--size 320x480`` for a quick look), which
is how its plumbing is tested where there is no GPU.  torch and torchvision are optional: the
PyTorch side lives in ``torch_side.py`` and is skipped, with the reason, when it cannot load.
"""

import dataclasses
import json
import os
import sys

import numpy as np

from ..backend import gpu_name, require_gpu, to_device
from .timing import median_ms

GB = 2**30


def _timer(sync, repeat, warmup=1):
    """``measure(step)``: the median ms of ``step`` over ``repeat`` runs (``timing.median_ms``)."""
    return lambda step: median_ms(step, repeat, sync, warmup)


def padded(size, divisor=32):
    """The batch size of images of ``size`` after padding to a multiple of 32 (800x1333 ->
    800x1344).  The models are set to take images of ``size`` as they are (min_size = the
    shorter side, max_size = the longer), so 800x1333 is the paper's setting exactly and a
    smaller size scales everything down for a quick run."""
    return -(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor


def conv_cases(size):
    """(label, N, C, H, W, O, k, stride, padding) of R50-FPN's convolutions on a batch of 2."""
    hp, wp = padded(size)
    p2, p4 = (hp // 4, wp // 4), (hp // 16, wp // 16)
    return [
        ("stem 7x7/2", 2, 3, hp, wp, 64, 7, 2, 3),
        ("res2 3x3", 2, 64, *p2, 64, 3, 1, 1),
        ("res3 3x3/2", 2, 128, *p2, 128, 3, 2, 1),
        ("res4 3x3", 2, 256, *p4, 256, 3, 1, 1),
        ("res4 1x1 256->1024", 2, 256, *p4, 1024, 1, 1, 0),
        ("FPN/RPN 3x3 on P2", 2, 256, *p2, 256, 3, 1, 1),
    ]


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if a.size else 0.0


class Report:
    """Rows of (name, ours, theirs, unit, target ratio) printed as a table and kept for JSON."""

    def __init__(self):
        self.rows = []

    def add(self, name, ours, theirs=None, unit="ms", target=None, note=""):
        ratio = ours / theirs if theirs else None
        verdict = None if target is None or ratio is None else ("PASS" if ratio <= target else "FAIL")
        row = dict(name=name, minimask=ours, torch=theirs, unit=unit, ratio=ratio, target=target,
                   verdict=verdict, note=note)
        self.rows.append(row)
        theirs_s = f"{theirs:10.2f}" if theirs is not None else f"{'-':>10s}"
        ratio_s = f"{ratio:7.2f}" if ratio is not None else f"{'-':>7s}"
        target_s = f"<= {target:g}x {verdict}" if verdict else ""
        print(f"{name:50s} {ours:10.2f} {theirs_s} {unit:3s} {ratio_s}  {target_s} {note}".rstrip())
        sys.stdout.flush()
        return row


def _kernels(report, device, measure, sync_ours, torch, tv, size, repeat):
    from ..functional.conv import Conv2dFn
    from ..functional.roi import roi_align
    from ..ops import nms
    from ..tensor import Tensor
    from . import torch_side
    from .kernels import fpn_levels, random_boxes

    rng = np.random.default_rng(0)
    dev = torch_side.torch_device(device)
    torch_measure = None
    if torch is not None:
        torch_measure = _timer(lambda: torch_side.sync(torch, device), repeat)

    # ---- conv2d forward + backward ---------------------------------------------------------
    for label, n, c, h, w, o, k, s, p in conv_cases(size):
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        arrays = [rng.standard_normal(shape).astype(np.float32) * scale for shape, scale in
                  (((n, c, h, w), 1.0), ((o, c, k, k), 0.05), ((o,), 1.0), ((n, o, ho, wo), 1.0))]
        x, wt, b, gy = (to_device(a, device) for a in arrays)

        def ours():
            ts = [Tensor(a, requires_grad=True) for a in (x, wt, b)]
            Conv2dFn(s, p)(*ts).backward(gy)

        t_ours = measure(ours)
        t_torch, note = None, ""
        if torch is not None:
            tx, tw, tb, tgy = (torch.from_numpy(a).to(dev) for a in arrays)

            def theirs():
                ts = [t.detach().requires_grad_() for t in (tx, tw, tb)]
                torch.nn.functional.conv2d(*ts, stride=s, padding=p).backward(tgy)

            t_torch = torch_measure(theirs)
            y_ours = to_device(Conv2dFn(s, p)(Tensor(x), Tensor(wt), Tensor(b)).data, "cpu")
            with torch.no_grad():
                y_torch = torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p).cpu().numpy()
            note = f"(max rel. diff {_rel_err(y_ours, y_torch):.1e})"
        report.add(f"conv2d fwd+bwd {label} {n}x{c}x{h}x{w}->{o}", t_ours, t_torch, note=note)

    # ---- RoIAlign forward + backward over the FPN levels ------------------------------------
    hp, wp = padded(size)
    boxes = random_boxes(rng, 512, hp, wp, min_size=16, max_size=min(800, hp))
    levels = fpn_levels(boxes)
    maps, rois, grads = {}, {}, {}
    for lv in range(2, 6):
        stride = 2 ** lv
        maps[lv] = rng.standard_normal((2, 256, -(-hp // stride), -(-wp // stride))).astype(np.float32)
        rois[lv] = boxes[levels == lv].astype(np.float32)
        grads[lv] = rng.standard_normal((len(rois[lv]), 256, 7, 7)).astype(np.float32)
    d_maps = {lv: to_device(a, device) for lv, a in maps.items()}
    d_rois = {lv: to_device(a, device) for lv, a in rois.items()}
    d_grads = {lv: to_device(a, device) for lv, a in grads.items()}

    def ours_roi():
        for lv in maps:
            if len(rois[lv]):
                x = Tensor(d_maps[lv], requires_grad=True)
                roi_align(x, d_rois[lv], (7, 7), 1 / 2 ** lv, 2, aligned=False).backward(d_grads[lv])

    t_ours = measure(ours_roi)
    t_torch, note = None, ""
    if tv is not None:
        t_maps = {lv: torch.from_numpy(a).to(dev) for lv, a in maps.items()}
        t_rois = {lv: torch.from_numpy(a).to(dev) for lv, a in rois.items()}
        t_grads = {lv: torch.from_numpy(a).to(dev) for lv, a in grads.items()}

        def theirs_roi():
            for lv in maps:
                if len(rois[lv]):
                    x = t_maps[lv].detach().requires_grad_()
                    tv.ops.roi_align(x, t_rois[lv], (7, 7), 1 / 2 ** lv, 2, False).backward(t_grads[lv])

        t_torch = torch_measure(theirs_roi)
        errs = []
        for lv in maps:
            if len(rois[lv]):
                a = to_device(roi_align(Tensor(d_maps[lv]), d_rois[lv], (7, 7), 1 / 2 ** lv, 2,
                                        aligned=False).data, "cpu")
                with torch.no_grad():
                    b = tv.ops.roi_align(t_maps[lv], t_rois[lv], (7, 7), 1 / 2 ** lv, 2, False).cpu().numpy()
                errs.append(_rel_err(a, b))
        note = f"(max rel. diff {max(errs):.1e})"
    counts = "/".join(str(len(rois[lv])) for lv in maps)
    report.add(f"RoIAlign fwd+bwd 512 boxes P2-P5 ({counts})", t_ours, t_torch, target=1.5, note=note)

    # ---- NMS --------------------------------------------------------------------------------
    for count in (2000, 10000):
        b = random_boxes(rng, count, hp, wp, min_size=8, max_size=300)[:, 1:].astype(np.float32)
        sc = rng.uniform(0, 1, count).astype(np.float32)
        db, ds = to_device(b, device), to_device(sc, device)
        t_ours = measure(lambda: nms(db, ds, 0.5))
        t_torch, note = None, ""
        if tv is not None:
            tb, ts = torch.from_numpy(b).to(dev), torch.from_numpy(sc).to(dev)
            t_torch = torch_measure(lambda: tv.ops.nms(tb, ts, 0.5))
            kept_ours = to_device(nms(db, ds, 0.5), "cpu")
            kept_torch = tv.ops.nms(tb, ts, 0.5).cpu().numpy()
            same = len(kept_ours) == len(kept_torch) and bool((kept_ours == kept_torch).all())
            note = f"({len(kept_ours)} kept, {'same' if same else 'DIFFERENT'} as torchvision)"
        report.add(f"NMS {count} boxes IoU 0.5", t_ours, t_torch, note=note)


def _model(report, device, measure, sync_ours, torch, tv, size, repeat, results, config="r50_fpn"):
    from ..engine.trainer import train_step
    from ..models import MaskRCNN, preset
    from ..optim import SGD, WarmupMultiStepLR, param_groups_no_decay
    from . import torch_side
    from .memory import synthetic_batch

    cfg = dataclasses.replace(preset(config), min_size=(min(size),), max_size=max(size))
    ours = MaskRCNN(cfg)
    theirs = None
    if tv is not None and config != "r50_fpn":
        print(f"no torchvision model for --config {config} (only r50_fpn has a torchvision twin)")
        tv = None
    if tv is not None:
        torch.manual_seed(0)
        theirs = torch_side.build_maskrcnn(torch, tv, cfg.num_classes, min(size), max(size))
        missing, unexpected = ours.load_state_dict(torch_side.state_dict_numpy(theirs), strict=False)
        same = not missing and not unexpected
        results["same_weights"] = same
        print("weights: torchvision's random initialisation copied into minimask's model"
              + ("" if same else f" (BUT {len(missing)} missing, {len(unexpected)} unexpected names)"))
        theirs.to(torch_side.torch_device(device))
    ours.to(device)
    images, targets = synthetic_batch(2, *size, num_classes=cfg.num_classes)
    d_images = [to_device(im, device) for im in images]
    d_targets = [{k: to_device(v, device) for k, v in t.items()} for t in targets]
    if theirs is not None:
        t_images, t_targets = torch_side.images_and_targets(torch, images, targets, device)
    h, w = size
    pool = None
    if device == "gpu":
        import cupy

        pool = cupy.get_default_memory_pool()

    def pool_reset():
        if pool is not None:
            sync_ours()
            pool.free_all_blocks()

    def pool_peak():  # the pool keeps freed blocks: what it holds is the high-water mark
        return pool.total_bytes() if pool is not None else None

    # ---- inference, one image ------------------------------------------------------------------
    ours.eval()
    pool_reset()
    t_ours = measure(lambda: ours.predict(d_images[:1]), )
    mem_ours = pool_peak()
    n_ours = len(ours.predict(d_images[:1])[0]["boxes"])
    t_torch, mem_torch, note = None, None, f"({n_ours} detections"
    if theirs is not None:
        theirs.eval()
        torch_side.reset_memory(torch, device)
        torch_measure = _timer(lambda: torch_side.sync(torch, device), repeat, warmup=2)

        def infer():
            with torch.no_grad():
                return theirs(t_images[:1])

        t_torch = torch_measure(infer)
        mem_torch = torch_side.peak_memory(torch, device)[1]
        note += f" vs {len(infer()[0]['boxes'])}"
    note += ")"
    row = report.add(f"{config} inference, one {h}x{w} image", t_ours, t_torch, target=2.0, note=note)
    row["under_100_ms"] = t_ours < 100
    print(f"{'':50s} minimask {'under' if t_ours < 100 else 'OVER'} 100 ms per image "
          f"(the paper: 195 ms on a Tesla M40)")
    if mem_ours is not None:
        report.add("peak memory, inference", mem_ours / GB, mem_torch / GB if mem_torch else None, unit="GB",
                   note="(CuPy pool total vs torch max reserved)")

    # ---- training step, 2 images ----------------------------------------------------------------
    ours.train()
    opt = SGD(param_groups_no_decay(ours, cfg.weight_decay), lr=1e-5, momentum=cfg.momentum)
    constant_lr = WarmupMultiStepLR(opt, (), warmup_iters=0)
    losses_seen = []

    def ours_step():  # the trainer's own step: forward, the NaN guard, backward, update
        losses_seen.append(train_step(ours, opt, constant_lr, d_images, d_targets)["total"])

    pool_reset()
    t_ours = measure(ours_step)
    mem_ours = pool_peak()
    note = f"(loss {losses_seen[-1]:.3f}"
    t_torch, mem_torch = None, None
    if theirs is not None:
        theirs.train()
        params = [p for p in theirs.parameters() if p.requires_grad]
        topt = torch.optim.SGD(params, lr=1e-5, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        torch_side.reset_memory(torch, device)
        last = []
        t_torch = _timer(lambda: torch_side.sync(torch, device), repeat, warmup=2)(
            lambda: last.append(torch_side.train_step(torch, theirs, topt, t_images, t_targets)))
        mem_torch = torch_side.peak_memory(torch, device)[1]
        note += f" vs {float(last[-1]):.3f}"
    note += ")"
    report.add(f"{config} training step, 2 images", t_ours, t_torch, target=3.0, note=note)
    if mem_ours is not None:
        report.add("peak memory, training step", mem_ours / GB, mem_torch / GB if mem_torch else None,
                   unit="GB", note="(CuPy pool total vs torch max reserved)")


def main(device="gpu", repeat=5, tf32=False, size=(800, 1333), json_path=None, parts=("kernels", "model"),
         config="r50_fpn"):
    """Run the comparison and print it; return the results (also written to ``json_path``).
    ``config`` other than r50_fpn (e.g. "shapes", for a quick check of the plumbing) has no
    torchvision twin: only minimask's numbers are printed for it."""
    if device == "gpu":
        if tf32 and os.environ.get("CUPY_TF32") != "1":
            if "cupy" in sys.modules:
                raise RuntimeError("--tf32: CuPy was imported before CUPY_TF32=1 was set; run "
                                   "'CUPY_TF32=1 minimask bench gpu --tf32' or set it before importing cupy")
            os.environ["CUPY_TF32"] = "1"
        require_gpu("minimask bench gpu")
        import cupy

        def sync_ours():
            cupy.cuda.get_current_stream().synchronize()
        where = f"GPU {gpu_name()}, CuPy {cupy.__version__}"
    else:
        def sync_ours():
            pass
        where = "CPU (this benchmark is meant for the GPU: --device gpu)"
    from . import torch_side

    torch, tv, problem = torch_side.load(device, tf32)
    if tv is None:
        torch = None
    precision = "TF32 on both sides" if tf32 else "FP32 on both sides (TF32 off in CuPy and torch)"
    print(f"minimask bench gpu: {where}; {precision}; median of {repeat}")
    if torch is not None:
        print(f"torch {torch.__version__}, torchvision {tv.__version__}, same device, same process")
    else:
        print(f"no PyTorch side: {problem}")
    print(f"{'':50s} {'minimask':>10s} {'torch':>10s}     {'ratio':>7s}")
    report = Report()
    results = dict(device=where, tf32=bool(tf32), repeat=repeat, size=list(size), config=config)
    measure = _timer(sync_ours, repeat)
    if "kernels" in parts:
        _kernels(report, device, measure, sync_ours, torch, tv, size, repeat)
    if "model" in parts:
        _model(report, device, _timer(sync_ours, repeat, warmup=2), sync_ours, torch, tv, size, repeat,
               results, config)
    results["rows"] = report.rows
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {json_path}")
    return results
