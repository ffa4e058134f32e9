"""The ``minimask`` command: data, train, eval, predict, bench.

Each sub-command is a small function here that parses its flags and calls the package;
``minimask CMD --help`` lists the flags of each.
"""

import argparse
import sys


def _bench(args):
    if args.what == "ops":
        from .bench.ops import main as run
    elif args.what == "kernels":
        from .bench.kernels import main as run
    else:
        raise SystemExit(f"minimask bench: unknown benchmark {args.what!r} (expected ops or kernels)")
    run(device=args.device, repeat=args.repeat)


def _data_shapes(args):
    import time

    from .data.shapes import make_shapes

    t = time.perf_counter()
    train_json, val_json = make_shapes(args.out, train=args.train, val=args.val, seed=args.seed,
                                       size=args.size)
    print(f"wrote {args.train} + {args.val} images of {args.size} px to {args.out}/images/, "
          f"annotations {train_json} and {val_json} ({time.perf_counter() - t:.1f} s)")


def build_parser():
    p = argparse.ArgumentParser(prog="minimask", description="Mask R-CNN from scratch on NumPy and CuPy")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make data sets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="synthetic shapes in COCO format (train.json, val.json, images/)")
    s.add_argument("--out", required=True, help="output folder (created if missing)")
    s.add_argument("--train", type=int, default=1000, help="number of training images")
    s.add_argument("--val", type=int, default=200, help="number of validation images")
    s.add_argument("--seed", type=int, default=0, help="same seed, same files byte for byte")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.set_defaults(func=_data_shapes)

    b = sub.add_parser("bench", help="time ops and kernels (and compare with torch where installed)")
    b.add_argument("what", choices=["ops", "kernels"], help="ops: conv2d fwd+bwd; kernels: RoIAlign, NMS")
    b.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    b.add_argument("--repeat", type=int, default=5, help="timed repetitions (the median is printed)")
    b.set_defaults(func=_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
