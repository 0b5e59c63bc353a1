"""How faithful is an exported LoRA? Toy subjects scored as the fidelity benchmark scores them, paired per subject.

    tuneqdm benchmark fidelity --subjects 0-9 --methods tuneqdm,peqa --bits 4 --out runs/fid10   # the adapters
    python benchmarks/export_fidelity.py runs/fid10 --cell tuneqdm-w4 --subjects 0-9 --out runs/export-fid \\
        --variants switch,merged,dqswitch                                    # the default export, 4 images a prompt
    python benchmarks/export_fidelity.py runs/fid10 --cell tuneqdm-w4 --subjects 0-9 --out runs/export-rank \\
        --variants own,switch --energies 0.5,0.75,0.9,0.99,1 --images_per_prompt 1      # rank vs size vs fidelity

Each trained adapter of ``FID/cells/<cell>/<subject>/run`` is exported with ``tuneqdm export`` (``--to lora
--energy E``; ``--to checkpoint --expert base`` for ``dqswitch``) and sampled by the fidelity benchmark's protocol
(the subject's 25 toy prompts x N images, 25 DDIM steps, guidance 7.5, seed 0, toy DINO-like / CLIP-like
evaluators). Variants:

- ``own``: tuneqdm's own sampling of the adapter (``tuneqdm.load_pipeline(adapter=...)``); with
  ``--images_per_prompt 4`` the fidelity benchmark's own ``eval/metrics.json`` is read instead of sampling again;
- ``switch``: the float base + the expert LoRAs, switched per step (``tuneqdm.export.use_lora_experts``);
- ``merged``: the float base + the one merged LoRA (the time-uniform blend) for tools that cannot switch;
- ``dqswitch``: the dequantized base (``--expert base`` checkpoint) + the switched expert LoRAs (= Ŵ_tuned up to the
  rank: what is left is the LoRA's truncation, not the quantization error);
- ``float``: the untuned float base, for scale.

Writes ``OUT/export_fidelity.json``: per variant and energy the per-subject scores, the paired difference against
``own`` (mean ± standard error over subjects), the LoRA files' bytes and energy kept, and the adapter's bytes. Cells
already scored are read back, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

METRICS = ("dino", "clip_i", "clip_t")


def export(run: Path, folder: Path, *argv: str) -> Path:
    from tuneqdm.cli import main

    if not (folder / "lora_export.json").is_file() and not (folder / "tuneqdm_export.json").is_file():
        if main(["export", "--adapter", str(run), "--out", str(folder), "--quiet", "--force", *argv]) != 0:
            raise SystemExit(f"tuneqdm export failed for {run}")
    return folder


def pipeline(variant: str, run: Path, exports: Path, energy: str):
    import tuneqdm
    from tuneqdm.export import use_lora_experts

    if variant == "own":
        return tuneqdm.load_pipeline(adapter=run)
    pipe = tuneqdm.load_pipeline()
    if variant == "float":
        return pipe
    lora = export(run, exports / f"lora-e{energy}", "--to", "lora", "--energy", energy)
    if variant == "merged":
        pipe.load_lora_weights(str(lora))
        return pipe
    if variant == "dqswitch":
        from diffusers import UNet2DConditionModel

        base = export(run, exports / "dequantized-base", "--to", "checkpoint", "--expert", "base")
        pipe.unet = UNet2DConditionModel.from_pretrained(base)
    use_lora_experts(pipe, lora)
    return pipe


def score(fid: Path, cell: str, subject: str, variant: str, energy: str, out: Path, images: int, encoders) -> dict:
    from tuneqdm.eval.evaluate import evaluate, read_photos
    from tuneqdm.eval.prompts import evaluation_prompts

    run = fid / "cells" / cell / subject / "run"
    if variant == "own" and images == 4:
        return json.loads((fid / "cells" / cell / subject / "eval" / "metrics.json").read_text())
    tag = variant if variant in ("own", "float") else f"{variant}-e{energy}"
    done = out / "cells" / tag / subject / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    meta = json.loads((fid / "subjects" / subject / "subject.json").read_text())
    token = meta["instance_prompt"].split()[1]
    pipe = pipeline(variant, run, out / "exports" / subject, energy)
    return evaluate(pipe, read_photos(fid / "subjects" / subject), evaluation_prompts("toy", token, meta["class"]),
                    images, *encoders, token, done.parent, seed=0, num_inference_steps=25,
                    info={"variant": variant, "energy": energy, "subject": subject})


def sizes(out: Path, fid: Path, cell: str, subjects: list[str], energy: str) -> dict:
    """Mean bytes of the export's files (merged file, all expert files), energy kept, and of the adapter."""
    merged, experts, kept, adapter = [], [], [], []
    for s in subjects:
        record = json.loads((out / "exports" / s / f"lora-e{energy}" / "lora_export.json").read_text())
        files = {k: v for k, v in record["files"].items() if v is not None}
        merged.append(files["pytorch_lora_weights.safetensors"]["bytes"])
        experts.append(sum(v["bytes"] for k, v in files.items() if k.startswith("experts/")))
        kept.append(np.mean([v["energy_kept"] for k, v in files.items() if k.startswith("experts/")] or
                            [files["pytorch_lora_weights.safetensors"]["energy_kept"]]))
        adapter.append((fid / "cells" / cell / s / "run" / "adapter.safetensors").stat().st_size)
    return {"merged_file_bytes": float(np.mean(merged)), "expert_files_bytes": float(np.mean(experts)),
            "energy_kept_per_expert": float(np.mean(kept)), "adapter_bytes": float(np.mean(adapter))}


def paired(rows: dict, variant: str) -> dict:
    out = {}
    for m in METRICS:
        d = np.array([rows[s][variant][m] - rows[s]["own"][m] for s in rows])
        out[m] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                  "max_abs": float(np.abs(d).max())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fid", type=Path, help="a `tuneqdm benchmark fidelity` folder with the trained cells")
    p.add_argument("--cell", default="tuneqdm-w4")
    p.add_argument("--subjects", default="0-9")
    p.add_argument("--variants", default="switch,merged,dqswitch")
    p.add_argument("--energies", default="0.9")
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from tuneqdm.progress import set_quiet
    from tuneqdm.toy.evaluators import load_toy_clip, load_toy_dino
    from tuneqdm.toy.subjects import parse_seeds

    set_quiet(True)
    encoders = (load_toy_dino(), load_toy_clip())
    subjects = [f"s{i}" for i in parse_seeds(args.subjects)]
    variants = ["own"] + [v for v in args.variants.split(",") if v != "own"]
    result = {"command": " ".join(["python", "benchmarks/export_fidelity.py", *(argv or sys.argv[1:])]),
              "cell": args.cell, "images_per_prompt": args.images_per_prompt, "energies": {}}
    for energy in args.energies.split(","):
        rows = {}
        for s in subjects:
            rows[s] = {}
            for v in variants:
                r = score(args.fid, args.cell, s, v, energy, args.out, args.images_per_prompt, encoders)
                rows[s][v] = {m: r[m] for m in METRICS}
                print(f"E={energy} {s} {v}: " + " ".join(f"{m} {r[m]:.4f}" for m in METRICS), flush=True)
        summary = {v: {"mean": {m: float(np.mean([rows[s][v][m] for s in rows])) for m in METRICS},
                       **({"paired_minus_own": paired(rows, v)} if v != "own" else {})} for v in variants}
        exported = [v for v in variants if v not in ("own", "float")]
        result["energies"][energy] = {"per_subject": rows, "summary": summary,
                                      **({"sizes": sizes(args.out, args.fid, args.cell, subjects, energy)}
                                         if exported else {})}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "export_fidelity.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({e: {v: r["summary"][v] for v in variants} for e, r in result["energies"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
