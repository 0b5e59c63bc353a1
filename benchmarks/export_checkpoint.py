"""Does the merged checkpoint reproduce ``tuneqdm generate``? PSNR of its images against tuneqdm's own, per dtype.

    python benchmarks/export_checkpoint.py runs/fid10 --subjects 0-2 --methods peqa,mcsu --bits 8 \\
        --out runs/export-ckpt

For each toy subject (photos from a ``tuneqdm benchmark fidelity`` folder) and one-expert method, an adapter is
trained with ``tuneqdm train``'s defaults at ``--bits`` (kept in ``OUT/runs``), exported with ``tuneqdm export --to
checkpoint --dtype D`` for fp32, bf16 and fp16, and the same prompts and seeds are sampled (25 DDIM steps, guidance
7.5, 64 px) by ``tuneqdm.load_pipeline(adapter=...)`` (the quantized UNet with its scales) and by the float pipeline
whose UNet is the exported folder (``UNet2DConditionModel.from_pretrained``; the pipeline in fp32). Reports the PSNR
of every image against tuneqdm's own (mean and minimum) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROMPTS = ("a sks {} on the beach", "a sks {} in the snow", "a photo of a sks {}", "a sks {} on a table")
DTYPES = ("fp32", "bf16", "fp16")


def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def images(pipe, class_word: str, n: int) -> list:
    from tuneqdm.sampling import generate

    return [im for p in PROMPTS for im in generate(pipe, p.format(class_word), num_images=n, seed=0)]


def trained(fid: Path, subject: str, method: str, bits: int, out: Path) -> Path:
    from tuneqdm.train import TrainConfig, train

    run = out / "runs" / f"{method}-w{bits}-{subject}"
    if not (run / "adapter_config.json").is_file():
        train(TrainConfig(method=method, bits=bits, instance_data_dir=str(fid / "subjects" / subject),
                          output_dir=str(run), quiet=True, force=True, checkpointing_steps=10**9))
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fid", type=Path)
    p.add_argument("--subjects", default="0-2")
    p.add_argument("--methods", default="peqa,mcsu")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import tuneqdm
    from diffusers import UNet2DConditionModel
    from tuneqdm.cli import main as cli
    from tuneqdm.progress import set_quiet
    from tuneqdm.toy.subjects import parse_seeds

    set_quiet(True)
    rows = []
    for subject in [f"s{i}" for i in parse_seeds(args.subjects)]:
        class_word = json.loads((args.fid / "subjects" / subject / "subject.json").read_text())["class"]
        for method in args.methods.split(","):
            run = trained(args.fid, subject, method, args.bits, args.out)
            own = images(tuneqdm.load_pipeline(adapter=run), class_word, args.images_per_prompt)
            for dtype in DTYPES:
                folder = args.out / "exports" / f"{method}-w{args.bits}-{subject}-{dtype}"
                if cli(["export", "--adapter", str(run), "--to", "checkpoint", "--dtype", dtype, "--out",
                        str(folder), "--quiet", "--force"]) != 0:
                    raise SystemExit("export failed")
                pipe = tuneqdm.load_pipeline()
                pipe.unet = UNet2DConditionModel.from_pretrained(folder).float()
                values = [psnr(a, b) for a, b in zip(own, images(pipe, class_word, args.images_per_prompt))]
                rows.append({"subject": subject, "method": method, "bits": args.bits, "dtype": dtype,
                             "psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)),
                             "images": len(values)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {f"{m}/{d}": {"psnr_mean": float(np.mean([r["psnr_mean"] for r in rows if (r["method"], r["dtype"])
                                                         == (m, d)])),
                            "psnr_min": float(np.min([r["psnr_min"] for r in rows if (r["method"], r["dtype"])
                                                      == (m, d)]))}
               for m in args.methods.split(",") for d in DTYPES}
    result = {"command": " ".join(["python", "benchmarks/export_checkpoint.py", *(argv or sys.argv[1:])]),
              "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_checkpoint.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
