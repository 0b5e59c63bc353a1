"""Do the kohya-format and diffusers-format exports give the same images through diffusers' own loaders?

    python benchmarks/export_formats_psnr.py runs/fid10/cells/tuneqdm-w4/s0/run runs/fid10/cells/peqa-w4/s0/run \\
        --out runs/export-formats.json

Each adapter is exported twice (``tuneqdm export --to lora``, default rank rule, ``--format diffusers`` and
``--format kohya``); the merged file of each is loaded into the float base by ``pipe.load_lora_weights`` (diffusers'
own PEFT and kohya readers) and the same prompts and seeds are sampled (25 DDIM steps, guidance 7.5). Reports the
PSNR of the kohya images against the diffusers ones (mean, minimum) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPTS = ("a sks {} on the beach", "a sks {} in the snow", "a photo of a sks {}", "a sks {} on a table")


def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapters", type=Path, nargs="+")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import tuneqdm
    from tuneqdm.cli import main as cli
    from tuneqdm.progress import set_quiet
    from tuneqdm.results import read_training_json
    from tuneqdm.sampling import generate

    set_quiet(True)
    rows = []
    for adapter in args.adapters:
        class_word = read_training_json(adapter)["classes"][0]
        images = {}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("diffusers", "kohya"):
                if cli(["export", "--adapter", str(adapter), "--to", "lora", "--format", fmt, "--out",
                        f"{tmp}/{fmt}", "--quiet"]) != 0:
                    raise SystemExit("export failed")
                pipe = tuneqdm.load_pipeline()
                pipe.load_lora_weights(f"{tmp}/{fmt}")
                images[fmt] = [im for q in PROMPTS for im in generate(pipe, q.format(class_word),
                                                                      num_images=args.images_per_prompt, seed=0)]
        values = [psnr(a, b) for a, b in zip(images["diffusers"], images["kohya"])]
        rows.append({"adapter": str(adapter), "psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)),
                     "images": len(values)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": " ".join(["python", "benchmarks/export_formats_psnr.py", *(argv or sys.argv[1:])]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
