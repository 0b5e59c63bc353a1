"""One picture from a `tuneqdm benchmark fidelity` folder: per subject, its photos and each method's images for one
evaluation prompt, side by side — the README's "can a person see the subject" check, drawn from the very images the
table scored (same seeds across methods), so nothing is sampled again.

    python benchmarks/fidelity_picture.py runs/fid --subjects 0-3 --prompt 1 --methods floor-w4,tuneqdm-w4 \\
        --out docs/benchmarks/fidelity_picture.png

Rows: per subject, its photos, then one row per method (the cell folder names: ``floor-w4``, ``tuneqdm-w4``, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def picture(run: Path, subjects: list[int], prompt: int, methods: list[str], columns: int):
    """``(image, prompts)``: the grid and the prompt shown for each subject."""
    from PIL import Image

    from tuneqdm.eval.evaluate import grid

    rows, prompts = [], []
    for s in subjects:
        folder = run / "subjects" / f"s{s}"
        meta = json.loads((folder / "subject.json").read_text())
        prompts.append(meta["prompts"][prompt])
        rows.append([Image.open(p) for p in sorted(folder.glob("[0-9][0-9].png"))[:columns]])
        for m in methods:
            images = run / "cells" / m / f"s{s}" / "eval" / "images"
            found = sorted(images.glob(f"{prompt:03d}_*.png"), key=lambda p: int(p.stem.split("_")[1]))
            if not found:
                raise SystemExit(f"no images for prompt {prompt} in {images}: is the cell finished?")
            rows.append([Image.open(p) for p in found[:columns]])
    return grid(rows), prompts


def main() -> None:
    from PIL import Image

    from tuneqdm.toy.subjects import parse_seeds

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a tuneqdm benchmark fidelity --out folder")
    ap.add_argument("--subjects", default="0-3")
    ap.add_argument("--prompt", type=int, default=1, help="index into each subject's evaluation prompts")
    ap.add_argument("--methods", default="floor-w4,tuneqdm-w4", help="cell folder names, one row each")
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    image, prompts = picture(args.run, parse_seeds(args.subjects), args.prompt, args.methods.split(","), args.columns)
    image.resize((image.width * args.scale, image.height * args.scale), Image.Resampling.NEAREST).save(args.out)
    print(json.dumps({"out": str(args.out), "prompts": prompts}))


if __name__ == "__main__":
    main()
