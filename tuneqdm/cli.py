"""The ``tuneqdm`` command. Every user-facing failure is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import TuneQDMError


def _demo(args) -> None:
    from .demo import run_demo

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise TuneQDMError(f"output folder {out} is not empty: choose another --out or pass --force")
    print(json.dumps(run_demo(out, steps=args.steps, bits=args.bits, seed=args.seed), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneqdm", description="Quantized diffusion personalization by scale tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a tiny model, train its scales, save, reload and sample")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TuneQDMError as e:
        print(f"tuneqdm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneqdm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
