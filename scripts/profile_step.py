"""Where the time goes: one training step of the ``shapes`` preset, and r50_fpn inference.

    python scripts/profile_step.py                      # CPU
    python scripts/profile_step.py --device gpu --steps 5

Part 1 times one SGD step of the ``shapes`` preset at batch 8 on 128x128 synthetic images
(``minimask.data.shapes``), split by the paper's stages (Sec. 3): input transform, backbone
(ResNet + FPN), RPN (head, proposals, its losses), RoI heads (sampling, RoIAlign, box and mask
heads, Eq. 1 losses), backward through all of it, and the optimizer update.  Part 2 times
``predict`` of the ResNet-50-FPN model (random weights) on one 800x1067 image, the size of a
COCO image after the paper's resize.  Each number is the median over ``--steps`` runs after one
warm-up run (Numba compiles, CuPy builds its kernels, the anchor cache fills), in wall time and
in the process's CPU time (all threads).

For where the time goes inside a stage, sample a run with py-spy (``pip install py-spy``):
``py-spy record -r 200 -f raw -o profile.txt -- python scripts/profile_step.py --skip-r50``.
For the whole step beside torchvision's: ``minimask bench train``.
"""

import argparse
import statistics
import time

import numpy as np

from minimask.backend import is_cupy_array
from minimask.data.shapes import make_image
from minimask.models import LOSS_NAMES, MaskRCNN, preset
from minimask.optim import SGD
from minimask.tensor import Tensor, no_grad


def sync(x=None):
    """Wait for the GPU (CuPy launches kernels asynchronously), so a stage's time is its own."""
    if x is not None and is_cupy_array(getattr(x, "data", x)):
        import cupy

        cupy.cuda.Device().synchronize()


def shapes_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        image, objects = make_image(rng, 128)
        masks = np.stack([o["visible"] for o in objects]).astype(np.uint8)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(image)
        targets.append(dict(boxes=np.array(boxes, np.float32), masks=masks,
                            labels=np.array([o["label"] for o in objects])))
    return images, targets


def timed(times, name, fn, *args):
    """Run fn, recording (wall, CPU) seconds under ``name``.  CPU time is the process's, all its
    threads: steadier than wall time on a shared machine, and above it when threads spin."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    sync(out[0] if isinstance(out, (list, tuple)) and out else out)
    times.setdefault(name, []).append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def train_step(model, opt, images, targets, times):
    batch, sizes, targets = timed(times, "transform", model.transform, images, targets)
    features = timed(times, "backbone", model.backbone, Tensor(batch))
    proposals, rpn_losses = timed(times, "rpn", model.rpn, features, sizes, batch.shape[-2:], targets)
    _, head_losses = timed(times, "roi_heads", model.roi_heads, features, proposals, sizes, targets)
    losses = {**rpn_losses, **head_losses}
    total = losses[LOSS_NAMES[0]]
    for name in LOSS_NAMES[1:]:
        total = total + losses[name]
    opt.zero_grad()
    timed(times, "backward", total.backward)
    sync(next(model.parameters()))
    timed(times, "sgd", opt.step)
    sync(next(model.parameters()))


def predict_stages(model, images, times):
    with no_grad():
        batch, sizes, _ = timed(times, "transform", model.transform, images)
        features = timed(times, "backbone", model.backbone, Tensor(batch))
        proposals, _ = timed(times, "rpn", model.rpn, features, sizes, batch.shape[-2:])
        detections, _ = timed(times, "roi_heads", model.roi_heads, features, proposals, sizes)
        timed(times, "paste", lambda: [model.postprocess(d, s, im.shape[:2])
                                       for d, s, im in zip(detections, sizes, images)])
    return detections


def report(title, times):
    def median(v, i):
        return statistics.median(t[i] for t in (v[1:] if len(v) > 1 else v))

    walls = {k: median(v, 0) for k, v in times.items()}
    cpus = {k: median(v, 1) for k, v in times.items()}
    total = sum(walls.values())
    print(title)
    print(f"  {'':10s} {'wall':>9s}     {'':7s} {'CPU':>9s}")
    for k, v in walls.items():
        print(f"  {k:10s} {v * 1000:9.1f} ms  {100 * v / total:5.1f} % {cpus[k] * 1000:9.1f} ms")
    print(f"  {'total':10s} {total * 1000:9.1f} ms  {'':7s} {sum(cpus.values()) * 1000:9.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-r50", action="store_true", help="only the shapes training step")
    args = parser.parse_args()

    model = MaskRCNN(preset("shapes")).to(args.device)
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    images, targets = shapes_batch(args.batch)
    times = {}
    for _ in range(args.steps + 1):
        train_step(model, opt, images, targets, times)
    report(f"shapes preset, one training step, batch {args.batch} of 128x128, {args.device}:", times)

    if not args.skip_r50:
        model = MaskRCNN(preset("r50_fpn")).to(args.device).eval()
        image = np.random.default_rng(0).integers(0, 256, (800, 1067, 3), dtype=np.uint8)
        times = {}
        for _ in range(args.steps + 1):
            detections = predict_stages(model, [image], times)
        report(f"r50_fpn predict, one 800x1067 image (padded 800x1088), random weights, {args.device} "
               f"({len(detections[0]['scores'])} detections):", times)


if __name__ == "__main__":
    main()
