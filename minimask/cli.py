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


def build_parser():
    p = argparse.ArgumentParser(prog="minimask", description="Mask R-CNN from scratch on NumPy and CuPy")
    sub = p.add_subparsers(dest="command", required=True)

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
