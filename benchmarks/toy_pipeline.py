"""Gates of the embedded default pipeline, judged by the independent CLIP-like toy evaluator.

    python benchmarks/toy_pipeline.py                       # the shipped pipeline
    python benchmarks/toy_pipeline.py --pipeline DIR --out /tmp/check   # a checkpoint exported elsewhere

200 prompts from world seeds >= 30,000,000 (never used in training; every prompt names a class and a place,
80 % a colour), one image each, 25 DDIM steps, guidance 7.5. Reports class / place / colour accuracy by zero-shot
classification through the CLIP-like text tower, the same for the quantized W4 pipeline (min-max init, PEQA
scales at their initial values), and the time of one image on this CPU. Writes JSON, markdown and a 4x4 grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GATE_SEED = 30_000_000


def gate_prompts(n: int):
    from tuneqdm.toy.world import caption, sample_scene, seed_entropy

    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(GATE_SEED, "pipeline-gate")))
    scenes = [sample_scene(rng, p_place=1.0, p_material=0.0) for _ in range(n)]
    return scenes, [caption(s) for s in scenes]


def sample_all(pipe, prompts, steps, guidance, batch=8):
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(GATE_SEED + i + j) for j in range(len(chunk))]
        with torch.no_grad():
            images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def judge(images, scenes):
    """Zero-shot accuracy of the CLIP-like judge per attribute, over the scenes that have that attribute."""
    from tuneqdm.eval.encoders import zero_shot_classify
    from tuneqdm.toy.evaluators import class_prompts, colour_prompts, load_toy_clip, place_prompts
    from tuneqdm.toy.world import CLASSES, COLOURS, PLACES

    clip = load_toy_clip()
    out = {}
    for attr, labels, texts in (("noun", list(CLASSES), class_prompts()), ("place", list(PLACES), place_prompts()),
                                ("colour", list(COLOURS), colour_prompts())):
        keep = [i for i, s in enumerate(scenes) if getattr(s, attr) is not None]
        pred = zero_shot_classify(clip, [images[i] for i in keep], texts)
        truth = [labels.index(getattr(scenes[i], attr)) for i in keep]
        out[attr] = float(np.mean([int(p) == t for p, t in zip(pred, truth)]))
    return out


def grid(images, path: Path, cols=4):
    from PIL import Image

    side = images[0].width
    canvas = Image.new("RGB", (cols * side, (len(images) // cols) * side), "white")
    for i, im in enumerate(images):
        canvas.paste(im, ((i % cols) * side, (i // cols) * side))
    canvas.resize((canvas.width * 2, canvas.height * 2), Image.Resampling.NEAREST).save(path)


def main() -> None:
    import tuneqdm
    from tuneqdm.toy.pipeline import default_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", type=Path, default=None, help="a pipeline folder (default: the shipped one)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip_w4", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "toy_pipeline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = default_pipeline(path=args.pipeline)
    scenes, prompts = gate_prompts(args.prompts)

    one = []
    for k in range(3):  # one image, batch 1, as a user would run it
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompts[k], num_inference_steps=args.steps, guidance_scale=args.guidance,
                 generator=torch.Generator().manual_seed(k))
        one.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    images = sample_all(pipe, prompts, args.steps, args.guidance)
    result = {"prompts": len(prompts), "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
              "seconds_per_image_batch1": statistics.median(one), "fp32": judge(images, scenes),
              "fp32_sampling_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(images[:16], args.out.with_name(args.out.name + "_grid.png"))
    if not args.skip_w4:
        float_unet = copy.deepcopy(pipe.unet)
        tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
        images_w4 = sample_all(pipe, prompts, args.steps, args.guidance)
        result["w4_minmax"] = judge(images_w4, scenes)
        grid(images_w4[:16], args.out.with_name(args.out.name + "_grid_w4.png"))
        # what train, quantize and the benchmarks use (information, not a gate)
        pipe.unet = tuneqdm.quantize_(float_unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="mse"))
        result["w4_mse"] = judge(sample_all(pipe, prompts, args.steps, args.guidance), scenes)
    from tuneqdm.toy.pipeline import unet_training_steps

    manifest = json.loads((Path(pipe.config._name_or_path) / "tuneqdm_pretrain.json").read_text())
    result["pipeline_unet_steps"] = unet_training_steps(manifest)
    result["pipeline_vae_refined"] = "refined_from" in manifest
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    rows = [("class", "noun"), ("place", "place"), ("colour", "colour")]
    md = ["# Default pipeline gates", "", f"Command: `python benchmarks/toy_pipeline.py` ({len(prompts)} prompts, "
          f"{args.steps} DDIM steps, guidance {args.guidance}, {args.threads} CPU threads; UNet trained "
          f"{result['pipeline_unet_steps']} steps{', VAE refined' if result['pipeline_vae_refined'] else ''}).", "",
          "| accuracy (CLIP-like judge) | fp32 | W4 min-max | W4 mse (info) | gate |",
          "|---|---|---|---|---|"]
    for name, key in rows:
        w4, w4_mse = (result.get(k, {}).get(key) for k in ("w4_minmax", "w4_mse"))
        gate = ">= 80 %" if name != "colour" else "(info)"
        md.append(f"| {name} | {100 * result['fp32'][key]:.1f} % | "
                  f"{'-' if w4 is None else f'{100 * w4:.1f} %'} | "
                  f"{'-' if w4_mse is None else f'{100 * w4_mse:.1f} %'} "
                  f"| {gate} |")
    gates = {f"{name} >= 80 % (fp32)": result["fp32"][key] >= 0.8 for name, key in rows[:2]}
    if "w4_minmax" in result:
        gates.update({f"{name}: W4 within 10 points of fp32": abs(result["w4_minmax"][key] - result["fp32"][key]) <= 0.1
                      for name, key in rows[:2]})
    gates["one image <= 2 s"] = result["seconds_per_image_batch1"] <= 2.0
    result["gates"] = gates
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md += ["", "Gates: " + "; ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in gates.items()) + ".",
           "", f"One 64 px image, {args.steps} steps, batch 1: {result['seconds_per_image_batch1']:.2f} s "
           "(gate <= 2 s).", "", f"![first 16 samples]({args.out.name}_grid.png)", "",
           "Prompts of the grid, row by row: " + "; ".join(prompts[:16]) + "."]
    if "w4_minmax" in result:
        md += ["", f"The same prompts and seeds, W4 min-max: ![W4 samples]({args.out.name}_grid_w4.png)"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
