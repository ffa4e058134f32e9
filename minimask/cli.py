"""The ``minimask`` command: data, train, eval, predict, inspect, bench.

Each sub-command is a small function here that parses its flags and calls the package;
``minimask CMD --help`` lists the flags of each.

    minimask data shapes --out data/shapes
    minimask train --config shapes --iters 300 --out runs/shapes        (makes data/shapes if missing)
    minimask eval --checkpoint runs/shapes/model_0000300.npz --ann data/shapes/val.json
    minimask predict --checkpoint runs/shapes/model_0000300.npz data/shapes/images/val_000000.png
    minimask inspect --checkpoint runs/shapes/model_0000300.npz data/shapes/images/val_00000*.png

Mistakes in the flags (an unknown preset, a bad ``--set``) end with exit code 2 and a message
naming the valid choices; mistakes found while running (a missing file, a malformed JSON, a
NaN loss) with exit code 1 and the message, without a traceback (``MINIMASK_DEBUG=1`` shows it).
Training stopped by Ctrl-C or SIGTERM saves a checkpoint, prints the command that resumes it and
exits with 130 or 143 (128 + the signal).  Anything else is a bug: its traceback is printed
with a request to report it.
"""

import argparse
import os
import shlex
import signal
import sys

# Errors that mean "the input is wrong", reported as one line; anything else is a bug and
# keeps its traceback.  OSError: a file that cannot be read or written (permissions, a full
# disk); its message names the file.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError, FloatingPointError, RuntimeError,
               OSError)


def _preset_name(name):
    """argparse type for --config: the name of a preset (the error lists the valid ones)."""
    from .models.config import PRESETS

    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return name


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _score(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _train(args, parser):
    import dataclasses

    from .engine.trainer import train
    from .models.config import override, preset

    cfg = preset(args.config)
    try:
        cfg = override(cfg, args.set)
        if args.iters is not None:
            cfg = dataclasses.replace(cfg, iters=args.iters)
        if args.backbone_weights is not None:
            cfg = dataclasses.replace(cfg, backbone_weights=args.backbone_weights)
    except ValueError as e:
        parser.error(str(e))
    train_ann, train_images = args.train_ann, args.train_images
    val_ann, val_images = args.val_ann, args.val_images
    if train_ann is None:
        from .data.synthetic import GENERATORS, ensure_synthetic

        if args.config not in GENERATORS:
            parser.error(f"--train-ann is needed for --config {args.config} "
                         f"(only {' and '.join(repr(k) for k in GENERATORS)} make their own data)")
        train_ann, val_ann = ensure_synthetic(args.config, f"data/{args.config}")
        train_images = val_images = None
    out = args.out or os.path.join("runs", args.config)
    args.run_dir = out  # for the message if the run is interrupted
    summary = train(cfg, train_ann, train_images, val_ann, val_images, out_dir=out, device=args.device,
                    resume=args.resume)
    if summary["eval"]:
        for kind, stats in summary["eval"].items():
            print(f"{kind} AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}")


def _eval(args, parser):
    from .data import CocoDataset
    from .engine import Predictor, evaluate

    dataset = CocoDataset(args.ann, args.images, train=False)
    # every file at once, before the model is loaded
    dataset.check_images(hint="\nfix them, or remove them and their entries from the JSON")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    if getattr(getattr(predictor.model, "cfg", None), "mask_on", False) and not dataset.has_masks \
            and any(dataset.anns.values()):  # COCOeval's mask AP would fail on them at the very end
        raise ValueError(f"{dataset.ann_file}: no annotation has a segmentation, so the mask AP of this "
                         f"mask model cannot be computed on it")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   "eval_" + os.path.splitext(os.path.basename(args.checkpoint))[0])
    metrics = evaluate(predictor.model, dataset, out_dir=out, batch_size=args.batch_size, progress=True)
    print(f"wrote {out}/detections.json and {out}/coco_eval.json")
    for kind, stats in metrics.items():
        print(f"{kind} AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}")


def _predict(args, parser):
    from .data.coco import BadImagesError, image_problem
    from .engine import Predictor, predict_files

    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:  # before loading the model: a typo should fail at once
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    bad = [(p, None, what) for p in args.images if (what := image_problem(p)) is not None]
    if bad:  # all of them at once, also before the model
        raise BadImagesError(None, bad)
    if (args.checkpoint is None) == (args.weights is None):
        parser.error("give one of --checkpoint (a training checkpoint) or --weights (converted weights)")
    if args.weights is not None:  # converted torchvision weights (minimask convert-weights)
        from .interop import load_weights_file

        model = load_weights_file(args.weights)
        predictor = Predictor(model, model.cfg.class_names, device=args.device,
                              score_thresh=args.score_thresh)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device,
                                              score_thresh=args.score_thresh)
    predict_files(predictor, args.images, args.out)
    print(f"wrote {len(args.images)} drawings and {args.out}/detections.json")


def _inspect(args, parser):
    from .engine import Predictor
    from .inspect import inspect_files

    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:  # before loading the model: a typo should fail at once
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, score_thresh=args.score_thresh)
    inspect_files(predictor, args.images, args.out, ann=args.ann, top_anchors=args.top_anchors)
    print(f"wrote {len(args.images)} sheets, their summaries and {args.out}/inspect.json")


def _bench(args, parser=None):
    args.device = args.device or ("gpu" if args.what == "gpu" else "cpu")
    if args.what == "gpu":  # minimask beside torchvision, kernels and the whole model
        from .bench.gpu import main as run

        parts = ("kernels", "model") if args.only is None else (args.only,)
        run(device=args.device, repeat=args.repeat, tf32=args.tf32, size=args.size, json_path=args.json,
            parts=parts)
        return
    if args.what == "train":  # a training step and inference beside torchvision's mirror, CPU
        from .bench.train import main as run

        run(config=args.config, repeat=args.repeat, overrides=args.set, json_path=args.json)
        return
    if args.what == "memory":  # shapes only, on the CPU
        from .bench.memory import main as run

        run(batch=args.batch, size=args.size)
        return
    if args.what == "ops":
        from .bench.ops import main as run
    elif args.what == "kernels":
        from .bench.kernels import main as run
    else:
        raise SystemExit(f"minimask bench: unknown benchmark {args.what!r} (expected ops or kernels)")
    run(device=args.device, repeat=args.repeat)


def _size(text):
    """argparse type for --size HxW."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 800x1333, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sides, got {text!r}")
    return h, w


def _data_subset(args, parser=None):
    from .data.subset import make_subset

    path, counts = make_subset(args.ann, args.images, args.n, args.out, name=args.name, seed=args.seed,
                               copy=args.copy, keep_empty=args.keep_empty)
    how = "copied" if args.copy else "linked"
    print(f"wrote {path}: {counts['images']} images ({how} into {os.path.join(args.out, 'images')}/), "
          f"{counts['annotations']} annotations, {counts['categories']} categories")


def _convert_weights(args, parser=None):
    from .interop import convert_backbone, convert_weights

    try:
        summary = (convert_backbone if args.backbone else convert_weights)(args.pth, args.out)
    except ImportError as e:  # no torch to read the .pth: a one-line message, not a traceback
        raise RuntimeError(str(e)) from None
    if args.backbone:
        print(f"wrote {summary['path']}: ImageNet ResNet-{summary['depth']} (width {summary['width']}), "
              f"{summary['tensors']} tensors; dropped {', '.join(summary['dropped']) or 'nothing'}")
        print(f"train from it: minimask train --config r50_fpn --backbone-weights {summary['path']} ...")
        return
    print(f"wrote {summary['path']}: {summary['tensors']} tensors, all in place ({summary['renamed']} "
          f"renamed from torchvision's current names)")
    print(f"run it: minimask predict --weights {summary['path']} IMAGE")


def _data_synthetic(args, parser=None):
    """``minimask data shapes|figures``: draw the synthetic data set and say where it went."""
    import time

    from .data.synthetic import GENERATORS

    make = GENERATORS[args.data_command]
    t = time.perf_counter()
    train_json, val_json = make(args.out, train=args.train, val=args.val, seed=args.seed, size=args.size)
    print(f"wrote {args.train} + {args.val} images of {args.size} px to {args.out}/images/, "
          f"annotations {train_json} and {val_json} ({time.perf_counter() - t:.1f} s)")


def _add_synthetic_parser(dsub, name, help):
    """The options shared by ``data shapes`` and ``data figures`` (the default count of training
    images is the generator's own)."""
    from .data.synthetic import default_train_count

    s = dsub.add_parser(name, help=help)
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.add_argument("--train", type=int, default=default_train_count(name), help="number of training images")
    s.add_argument("--val", type=int, default=200, help="number of validation images")
    s.add_argument("--seed", type=int, default=0, help="same seed, same files byte for byte")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.set_defaults(func=_data_synthetic)


def build_parser():
    p = argparse.ArgumentParser(prog="minimask", description="Mask R-CNN from scratch on NumPy and CuPy")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make data sets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    _add_synthetic_parser(dsub, "shapes", "synthetic shapes in COCO format (train.json, val.json, images/)")
    _add_synthetic_parser(dsub, "figures", "synthetic stick figures with 11 keypoints and distractor shapes, "
                                           "COCO keypoint format (train.json, val.json, images/)")
    u = dsub.add_parser("subset", help="cut N random images (and their annotations) out of a COCO file",
                        description="Write OUT/NAME.json with N randomly drawn images of --ann and their "
                                    "annotations (all categories kept), and link their files into "
                                    "OUT/images/ (the layout train and eval expect).")
    u.add_argument("--ann", required=True, help="COCO instances JSON, e.g. instances_train2017.json")
    u.add_argument("--images", help="its image folder (default: images/ beside the JSON)")
    u.add_argument("--n", type=_positive_int, required=True, help="number of images")
    u.add_argument("--out", required=True, help="output folder (created if missing)")
    u.add_argument("--name", help="output JSON name without .json (default: the --ann file's)")
    u.add_argument("--seed", type=int, default=0, help="same seed, same subset")
    u.add_argument("--copy", action="store_true", help="copy the image files instead of linking them")
    u.add_argument("--keep-empty", action="store_true", help="also draw images without objects")
    u.set_defaults(func=_data_subset)

    b = sub.add_parser("bench", help="time ops and kernels (and compare with torch where installed)")
    b.add_argument("what", choices=["ops", "kernels", "gpu", "memory", "train"],
                   help="ops: conv2d fwd+bwd; kernels: RoIAlign, NMS; gpu: kernels and the r50_fpn model "
                        "beside torchvision on the same device; memory: column and activation sizes of "
                        "an r50_fpn training step (shapes only, CPU); train: a training step and "
                        "inference of --config beside torchvision's MaskRCNN built to it (CPU), with "
                        "counted GFLOP and this machine's sgemm rate")
    b.add_argument("--device", choices=["cpu", "gpu"], help="default: gpu for 'gpu', cpu for the others")
    b.add_argument("--repeat", type=int, default=5, help="timed repetitions (the median is printed)")
    b.add_argument("--tf32", action="store_true", help="gpu: TF32 matrix products on both sides "
                                                       "(sets CUPY_TF32=1); FP32 otherwise")
    b.add_argument("--size", type=_size, default=(800, 1333),
                   help="gpu, memory: image HxW (default 800x1333)")
    b.add_argument("--only", choices=["kernels", "model"], help="gpu: run one part only")
    b.add_argument("--json", help="gpu, train: also write the results to this JSON file")
    b.add_argument("--config", type=_preset_name, default="shapes",
                   help="train: preset name (default shapes)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train: override a config field, e.g. --set batch_size=4 (repeatable)")
    b.add_argument("--batch", type=_positive_int, default=2, help="memory: images per batch")
    b.set_defaults(func=_bench)

    t = sub.add_parser("train", help="train a model (SGD, checkpoints, metrics.jsonl, loss.png, COCO eval)",
                       description="Train on a COCO-format data set. With no data flags and --config shapes "
                                   "(or figures), the synthetic shapes (or stick figures) are generated in "
                                   "data/shapes (data/figures) once and used.")
    t.add_argument("--config", type=_preset_name, default="shapes",
                   help="preset name (shapes, r50_fpn, figures, r50_fpn_keypoints, ...)")
    t.add_argument("--train-ann", help="training annotation JSON (COCO format)")
    t.add_argument("--train-images", help="training image folder (default: images/ beside the JSON)")
    t.add_argument("--val-ann", help="validation annotation JSON (evaluated every eval_period and at "
                                     "the end)")
    t.add_argument("--val-images", help="validation image folder (default: images/ beside the JSON)")
    t.add_argument("--iters", type=_positive_int, help="number of iterations (overrides the preset's)")
    t.add_argument("--out", help="run folder (default: runs/<config>)")
    t.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=0.01 (repeatable)")
    t.add_argument("--backbone-weights", metavar="BACKBONE.npz",
                   help="start the ResNet from ImageNet weights (convert-weights --backbone); fresh runs "
                        "only, a resumed run keeps its checkpoint's (config field backbone_weights)")
    t.set_defaults(func=_train, parser=t)

    e = sub.add_parser("eval", help="COCO AP of a checkpoint on an annotated data set")
    e.add_argument("--checkpoint", required=True, help="a model_*.npz written by train")
    e.add_argument("--ann", required=True, help="annotation JSON (COCO format)")
    e.add_argument("--images", help="image folder (default: images/ beside the JSON)")
    e.add_argument("--out", help="where detections.json and coco_eval.json go "
                                 "(default: eval_<checkpoint name>/ beside the checkpoint)")
    e.add_argument("--batch-size", type=_positive_int, default=2, help="images per predict call")
    e.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    e.set_defaults(func=_eval, parser=e)

    r = sub.add_parser("predict", help="detect objects in image files; draw them and write detections.json")
    r.add_argument("--checkpoint", help="a model_*.npz written by train")
    r.add_argument("--weights", help="weights converted by convert-weights (or any minimask .npz of them)")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    r.add_argument("--out", default="predictions", help="output folder (default: predictions/)")
    r.add_argument("--score-thresh", type=_score, default=0.5, help="keep detections scoring at least this")
    r.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    r.set_defaults(func=_predict, parser=r)

    n = sub.add_parser("inspect", help="one PNG sheet per image of every stage of a trained model",
                       description="Run a checkpoint on image files stage by stage and draw, per image, "
                                   "one sheet: the input, each FPN level, the top anchors (and with --ann "
                                   "each object's positive anchors), the proposals, the RoIs by pooling "
                                   "level, the detections and every class's mask probabilities; plus a "
                                   "text summary of the counts and times of each stage.")
    n.add_argument("--checkpoint", required=True, help="a model_*.npz written by train")
    n.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    n.add_argument("--ann", help="a COCO annotation JSON holding these images (matched by file name): "
                                 "adds each object's positive anchors")
    n.add_argument("--out", default="inspect", help="output folder (default: inspect/)")
    n.add_argument("--score-thresh", type=_score, default=0.5, help="draw detections scoring at least this")
    n.add_argument("--top-anchors", type=_positive_int, default=50, help="anchors drawn by objectness")
    n.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    n.set_defaults(func=_inspect, parser=n)

    c = sub.add_parser("convert-weights", help="torchvision Mask R-CNN weights (.pth) -> minimask .npz",
                       description="Read torchvision's maskrcnn_resnet50_fpn weights (the published COCO "
                                   "checkpoint or any state_dict() of that model; needs torch to read), "
                                   "check that every tensor finds its place in the torchvision_r50_fpn "
                                   "preset, and write a minimask checkpoint for predict and eval. With "
                                   "--backbone: an ImageNet classification ResNet-18/34/50/101 instead "
                                   "(fc dropped), for train --backbone-weights.")
    c.add_argument("--backbone", action="store_true",
                   help="MODEL.pth is torchvision's ImageNet ResNet (e.g. resnet50-0676ba61.pth)")
    c.add_argument("pth", metavar="MODEL.pth", help="e.g. maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    c.add_argument("out", metavar="OUT.npz", help="where to write the minimask checkpoint")
    c.set_defaults(func=_convert_weights, parser=c)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backend import keep_freed_memory

    keep_freed_memory()  # large arrays reuse freed memory instead of fresh pages (backend.py)
    if getattr(args, "tf32", False):
        # CuPy reads CUPY_TF32 when it is imported: set it before anything imports CuPy.
        os.environ["CUPY_TF32"] = "1"
    try:
        if getattr(args, "device", None) == "gpu":  # say so now, not after loading data or a model
            from .backend import require_gpu

            require_gpu("--device gpu")
        args.func(args, getattr(args, "parser", parser))
    except KeyboardInterrupt as e:  # Ctrl-C, or training's TrainingInterrupted (SIGINT or SIGTERM)
        if os.environ.get("MINIMASK_DEBUG"):
            raise
        return _interrupted(args, e, sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as e:
        if os.environ.get("MINIMASK_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its text
        print(f"minimask {args.command}: error: {message}", file=sys.stderr)
        return 1
    except MemoryError:
        if os.environ.get("MINIMASK_DEBUG"):
            raise
        print(f"minimask {args.command}: error: out of memory (try a smaller batch_size or min_size/max_size "
              f"with --set)", file=sys.stderr)
        return 1
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"minimask {args.command}: this is a bug in minimask, not a problem with your input; please "
              f"report it with the command and the traceback above", file=sys.stderr)
        return 1
    return 0


def _interrupted(args, error, argv):
    """One line for an interrupted command (with the ``--resume`` command for training); the
    exit code is 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    from .engine.checkpoint import latest_checkpoint

    signum = getattr(error, "signum", signal.SIGINT)
    words = ["minimask"] + list(argv)
    resume = shlex.join(words + ([] if "--resume" in words else ["--resume"]))
    if args.command != "train":
        print(f"minimask {args.command}: interrupted", file=sys.stderr)
    elif hasattr(error, "signum"):  # TrainingInterrupted: it says what it saved
        print(f"minimask train: {error}; resume with: {resume}", file=sys.stderr)
    else:  # before the first iteration or during the final evaluation: nothing of the loop is lost
        newest = latest_checkpoint(getattr(args, "run_dir", "") or "")
        where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"
        print(f"minimask train: interrupted; {where}; resume with: {resume}", file=sys.stderr)
    return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
