"""The `debias` command line."""

from __future__ import annotations

import argparse
import json
import sys

from debias.weighting import WEIGHTINGS


def _demo(args: argparse.Namespace) -> int:
    from debias.pipeline.demo import run_demo

    summary = run_demo(args.out, args.steps, args.batch_size, args.weighting, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/: " + ", ".join(summary["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="debias", description="Unbiased diffusion training: fused loss kernels and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="noising, the fused weighted loss and a short training run on the bundled digits",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    demo.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    demo.add_argument(
        "--weighting", default="debias", choices=WEIGHTINGS, help="loss weighting (default: debias)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"debias {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
