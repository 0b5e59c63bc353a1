"""Choose each method's learning rate (and, with --steps, its step count) on held-out toy subjects, by a rule fixed
in advance.

The benchmark's subjects are toy seeds 0-9; this sweep uses other seeds (default 100, 101) so that the comparison
is not tuned on its own subjects. Every method gets a 3-point grid around its default (fp: diffusers' SD lr 5e-6,
x10, x100; lora and qlora: diffusers' LoRA lr 1e-4, x10, x100; scale methods: 2e-3, x3, x10). Rule: the lr with the highest DINO-like score among those whose CLIP-T-like
score is at most 0.01 below the untuned W4 floor's (subject fidelity without losing the prompt). With several --steps
the same rule picks among every (lr, steps) pair; where two pairs reach the same DINO-like score (to 3 decimals)
the one with fewer steps wins (it costs less).

    python benchmarks/fidelity_lr_sweep.py --out runs/sweep      # resumable; ~25 min on 2 cores
    python benchmarks/fidelity_lr_sweep.py --methods tuneqdm --steps 400 800 1600 --out runs/steps
    -> OUT/lr_sweep.json, printed as a markdown table
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tuneqdm.train.config import DEFAULT_STEPS  # the folder without a steps suffix

GRID = {"fp": [5e-6, 5e-5, 5e-4], "lora": [1e-4, 1e-3, 1e-2], "qlora": [1e-4, 1e-3, 1e-2],
        "peqa": [2e-3, 6e-3, 2e-2], "tuneqdm": [2e-3, 6e-3, 2e-2]}
CLIP_T_SLACK = 0.01


def folder(out: Path, i: int, steps: int) -> Path:
    """One benchmark folder per (lr index, steps): cells are named by method and bits only."""
    return out / (f"lr{i}" if steps == DEFAULT_STEPS else f"lr{i}-steps{steps}")


def run(out: Path, subjects: str, images: int, methods: list[str], extra: list[str], steps: list[int]) -> None:
    from tuneqdm.cli import main

    for n, count in enumerate(steps):
        for i in range(len(GRID["fp"])):
            names = ",".join(methods) + (",floor" if i == 0 and n == 0 else "")
            lrs = [f"{m}={GRID[m][i]:g}" for m in methods]
            rc = main(["benchmark", "fidelity", "--subjects", subjects, "--methods", names, "--images_per_prompt",
                       str(images), "--learning_rate", *lrs, "--max_train_steps", str(count),
                       "--out", str(folder(out, i, count)), *extra])
            if rc:
                raise SystemExit(rc)


def summarise(out: Path) -> dict:
    cells: dict[tuple[str, float | None, int | None], list[dict]] = {}
    for f in sorted(out.glob("lr*/cells/*/*/eval/metrics.json")):
        m = json.loads(f.read_text())
        key = (m["method"], m["settings"].get("learning_rate"), m["settings"].get("max_train_steps"))
        cells.setdefault(key, []).append(m)
    rows = [{"method": m, "learning_rate": lr, "steps": n, "subjects": len(ms),
             **{k: statistics.fmean(x[k] for x in ms) for k in ("dino", "clip_i", "clip_t")}}
            for (m, lr, n), ms in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0, kv[0][1] or 0))]
    floor = next(r for r in rows if r["method"] == "floor")
    chosen, chosen_steps = {}, {}
    for method in GRID:
        ok = [r for r in rows if r["method"] == method and r["clip_t"] >= floor["clip_t"] - CLIP_T_SLACK]
        best = max(ok, key=lambda r: (round(r["dino"], 3), -r["steps"])) if ok else None
        chosen[method] = best and best["learning_rate"]
        chosen_steps[method] = best and best["steps"]
    return {"rule": f"max DINO-like with CLIP-T-like >= floor - {CLIP_T_SLACK} (ties: fewer steps)", "rows": rows,
            "chosen": chosen, "chosen_steps": chosen_steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--subjects", default="100,101", help="held-out toy subject seeds (not 0-9)")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--methods", default=",".join(GRID), help=f"a subset of {','.join(GRID)}")
    p.add_argument("--steps", type=int, nargs="+", default=[DEFAULT_STEPS],
                   help="training steps to sweep with every lr (the rule picks among all pairs)")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the embedded toy pipeline")
    p.add_argument("--shard", default="0/1", help="i/n, passed to each benchmark run (one process per shard; "
                                                  "summarise after all have finished)")
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(GRID))
    if unknown:
        raise SystemExit(f"--methods: {unknown[0]!r} has no grid; choose from {', '.join(GRID)}")
    extra = ["--shard", args.shard] + (["--pretrained_model_name_or_path", args.pretrained_model_name_or_path]
                                       if args.pretrained_model_name_or_path else [])
    if any(n <= 0 for n in args.steps):
        raise SystemExit(f"--steps {args.steps}: give positive step counts")
    run(args.out, args.subjects, args.images_per_prompt, methods, extra, args.steps)
    result = summarise(args.out)
    (args.out / "lr_sweep.json").write_text(json.dumps(result, indent=1))
    print("| method | lr | steps | subjects | DINO | CLIP-I | CLIP-T | chosen |\n|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:g}"
        pick = (result["chosen"].get(r["method"]), result["chosen_steps"].get(r["method"]))
        mark = "yes" if r["method"] in GRID and pick == (r["learning_rate"], r["steps"]) else ""
        print(f"| {r['method']} | {lr} | {r['steps'] or '-'} | {r['subjects']} | {r['dino']:.3f} | {r['clip_i']:.3f} "
              f"| {r['clip_t']:.3f} | {mark} |")


if __name__ == "__main__":
    main()
