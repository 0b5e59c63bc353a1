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


def _toy_subject(args) -> None:
    from .toy.subjects import write_subject

    out = Path(args.out)
    meta = write_subject(args.seed, out, n_photos=args.photos, force=args.force)
    print(f"toy subject {args.seed}: class {meta['class']}, {len(meta['photos'])} photos, "
          f"instance prompt '{meta['instance_prompt']}', in {out}")


def _toy_scenes(args) -> None:
    import numpy as np
    from PIL import Image

    from .toy.world import make_dataset

    if args.num < 1:
        raise TuneQDMError(f"--num must be at least 1, got {args.num}")
    if args.scale < 1 or args.scale > 8:
        raise TuneQDMError(f"--scale must be between 1 and 8, got {args.scale}")
    if args.cols is not None and args.cols < 1:
        raise TuneQDMError(f"--cols must be at least 1, got {args.cols}")
    out = Path(args.out)
    if out.is_dir():
        raise TuneQDMError(f"--out {out} is a folder: give a .png file name")
    images, captions, _ = make_dataset(args.seed, args.num)
    cols = args.cols or int(np.ceil(np.sqrt(args.num)))
    rows = -(-args.num // cols)
    side, pad = images.shape[1], 2
    grid = np.full((rows * (side + pad) + pad, cols * (side + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = (pad + k * (side + pad) for k in divmod(i, cols))
        grid[y:y + side, x:x + side] = img
    picture = Image.fromarray(grid)
    if args.scale > 1:
        picture = picture.resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    for text in captions:
        print(text)


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

    toy = sub.add_parser("toy", help="the procedural toy world: personal subjects and captioned scenes")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    subject = toy_sub.add_parser("subject", help="write a personal subject: 4-6 photos and subject.json")
    subject.add_argument("--seed", type=int, required=True, help="which subject (any integer)")
    subject.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    subject.add_argument("--photos", type=int, default=None, help="number of photos (default: 4-6, from the seed)")
    subject.add_argument("--force", action="store_true", help="replace an existing subject folder")
    subject.set_defaults(func=_toy_subject)
    scenes = toy_sub.add_parser("scenes", help="write a grid of random scenes; prints their captions, row by row")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--num", type=int, default=16)
    scenes.add_argument("--out", required=True, help="output .png file")
    scenes.add_argument("--cols", type=int, default=None, help="columns (default: about the square root of --num)")
    scenes.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid (default: 2)")
    scenes.set_defaults(func=_toy_scenes)
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
