"""AP at equal work: minimask against torchvision's MaskRCNN built to the same config (issue 17, item 6).

Both sides train the ``shapes`` preset (or another, with ``--config``) on the same synthetic
shapes data, with the same batches (minimask's ``DataLoader``: same shuffle, same flips), the
same schedule (SGD, momentum, warm-up and step drops) and the same number of iterations, then
both are scored by minimask's COCOeval wrapper on the same val split.  What differs is each
side's own policy, which is the point of the comparison:

- weights: each side's own initialisation (torchvision's module defaults; minimask's
  ``nn/init.py``), from ``torch.manual_seed(seed)`` / ``init.manual_seed(seed)``;
- weight decay: torchvision's reference recipe decays every parameter; minimask none on norms
  and biases (``optim.param_groups_no_decay``);
- sampling draws: each side's own generator.

The model itself is ``bench.torch_side.build_mirror``: same widths, anchors, RoI counts, heads,
RoIAlign ``aligned`` and mask targets as the config (the interop tests prove it computes the
same losses and gradients as minimask's from the same weights).

One run is one side and one seed; it writes ``OUT/result.json``.  Run as::

    python scripts/ap_parity.py --side minimask --seed 0 --out runs/parity/mm_s0
    python scripts/ap_parity.py --side torchvision --seed 0 --out runs/parity/tv_s0
    python scripts/ap_parity.py --table runs/parity          # mean and spread per group

``--set KEY=VALUE`` changes the config (both sides where the mirror follows it), e.g.
``--set mask_predictor_init=normal_0.001``.  Defaults: 700 iterations, drops at 75% and 92.5%.
On 2 cores, two runs side by side with one thread each (``OMP_NUM_THREADS=1
NUMBA_NUM_THREADS=1``) finish sooner than one after the other with two threads.
"""

import argparse
import glob
import json
import os
import sys
import time


def config(name, iters, overrides, seed):
    from minimask.models import preset
    from minimask.models.config import override

    milestones = (round(0.75 * iters), int(0.925 * iters))
    return override(preset(name), [f"iters={iters}", f"milestones=({milestones[0]}, {milestones[1]})",
                                   f"seed={seed}", "checkpoint_period=0"] + list(overrides))


def run_minimask(cfg, train_ann, val_ann, out):
    from minimask.engine.trainer import train

    summary = train(cfg, train_ann, val_ann=val_ann, out_dir=out, progress=False, log=lambda *a: None)
    return summary["eval"], summary["s_per_iter"]


def schedule(optimizer, cfg):
    """minimask's WarmupMultiStepLR for ``cfg`` on ``optimizer`` (anything with ``param_groups``
    of dicts with "lr", a torch optimizer too): the same lr at every iteration on both sides."""
    from minimask.optim import WarmupMultiStepLR

    return WarmupMultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma, warmup_iters=cfg.warmup_iters,
                             warmup_factor=cfg.warmup_factor)


def run_torchvision(cfg, train_ann, val_ann, out):
    import numpy as np
    import torch

    from minimask.bench import torch_side
    from minimask.data import CocoDataset, DataLoader, RandomHorizontalFlip
    from minimask.engine.evaluator import coco_eval, to_coco_results

    _, tv, problem = torch_side.load("cpu")
    if problem:
        raise SystemExit(f"ap_parity: {problem}")
    torch.manual_seed(cfg.seed)
    model = torch_side.build_mirror(torch, tv, cfg)
    model.train()
    # torchvision's reference recipe (references/detection/train.py): SGD on every trainable
    # parameter, weight decay on all of them (its --norm-weight-decay is off by default).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dataset = CocoDataset(train_ann, train=True, masks=True)
    val_set = CocoDataset(val_ann, train=False, masks=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                        train_transform=RandomHorizontalFlip(cfg.hflip_prob), drop_last=True)
    scheduler = schedule(optimizer, cfg)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for it, (images, targets) in enumerate(loader.batches(0, cfg.iters)):
            timages, ttargets = torch_side.images_and_targets(torch, images, targets, "cpu")
            losses = model(timages, ttargets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise SystemExit(f"ap_parity: torchvision loss is {float(total)} at iteration {it}")
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            scheduler.step()
            f.write(json.dumps({"iter": it, **{k: float(v) for k, v in losses.items()},
                                "total": float(total)}) + "\n")
    seconds = time.perf_counter() - t0
    model.eval()
    results = []
    to_cat = dict(val_set.label_to_cat_id)
    with torch.no_grad():
        for image_id in val_set.image_ids:
            image = val_set.load_image(image_id)
            timage, _ = torch_side.images_and_targets(torch, [image], None, "cpu")
            pred = model(timage)[0]
            pred = {"boxes": pred["boxes"].numpy(), "scores": pred["scores"].numpy(),
                    "labels": pred["labels"].numpy(),
                    "masks": (pred["masks"][:, 0] > cfg.mask_threshold).numpy().astype(np.uint8)}
            results += to_coco_results(pred, image_id, to_cat)
    quiet = lambda *a: None  # noqa: E731
    metrics = {t: coco_eval(val_set.coco, results, t, log=quiet) for t in ("bbox", "segm")}
    return metrics, seconds / cfg.iters


def table(folder):
    import numpy as np

    groups = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "result.json"))):
        with open(path) as f:
            r = json.load(f)
        groups.setdefault(r["group"], []).append(r)
    print(f"{'group':44s} {'seeds':>5s} {'bbox AP':>17s} {'segm AP':>17s} {'s/iter':>7s}")
    for name, rs in groups.items():
        b = np.array([r["bbox"] for r in rs])
        s = np.array([r["segm"] for r in rs])
        spread = lambda a: f"{a.mean():.3f} ({a.min():.3f}-{a.max():.3f})"  # noqa: E731
        print(f"{name:44s} {len(rs):5d} {spread(b):>17s} {spread(s):>17s} "
              f"{np.mean([r['s_per_iter'] for r in rs]):7.3f}")
        print(" " * 50 + "seeds " + ", ".join(f"{r['seed']}: {r['bbox']:.3f}/{r['segm']:.3f}" for r in rs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["minimask", "torchvision"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="shapes")
    p.add_argument("--iters", type=int, default=700)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", default="data/shapes", help="synthetic shapes folder (drawn if missing)")
    p.add_argument("--out", help="run folder (result.json goes there)")
    p.add_argument("--table", metavar="FOLDER", help="print mean and spread of the runs under FOLDER")
    args = p.parse_args(argv)
    if args.table:
        return table(args.table)
    if not (args.side and args.out):
        p.error("--side and --out are required (or --table)")
    from minimask.data.synthetic import ensure_synthetic

    train_ann, val_ann = ensure_synthetic("shapes", args.data)
    cfg = config(args.config, args.iters, args.set, args.seed)
    run = run_minimask if args.side == "minimask" else run_torchvision
    metrics, s_per_iter = run(cfg, train_ann, val_ann, args.out)
    group = " ".join([args.side] + sorted(args.set))
    result = {"group": group, "side": args.side, "seed": args.seed, "iters": args.iters, "set": args.set,
              "bbox": metrics["bbox"]["AP"], "segm": metrics["segm"]["AP"], "metrics": metrics,
              "s_per_iter": s_per_iter, "threads": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{group} seed {args.seed}: bbox AP {result['bbox']:.3f}, segm AP {result['segm']:.3f}, "
          f"{s_per_iter:.3f} s/iter")


if __name__ == "__main__":
    sys.exit(main())
