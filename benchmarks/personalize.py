"""Acceptance of personalization on the embedded default: one toy subject, the README's three commands, scored.

    python benchmarks/personalize.py                  # subject seed 5, TuneQDM W4 K=4, 400 steps
    python benchmarks/personalize.py --seed 3 --steps 100 --out /tmp/p3

Runs ``tuneqdm toy subject`` and ``tuneqdm train`` exactly as the README does (timed), then samples the subject's
25 evaluation prompts (``--images`` seeds each, 25 DDIM steps, guidance 7.5) with the trained adapter and with the
untuned quantized model (the same W4 integers, scales at their initial values), and scores both with the toy
evaluators: DINO-like subject fidelity (mean cosine between the real photos and the generated images) and CLIP-like
prompt fidelity (CLIP-T: image vs the prompt without the rare token, which the toy CLIP does not know). For the
beach prompt it also reports how often the CLIP-like judge sees a beach. Writes JSON, markdown and a picture
(real photos / untuned / tuned, "a sks <class> on the beach").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _picture(rows, path: Path, scale=3):
    from PIL import Image

    from tuneqdm.eval.evaluate import grid

    canvas = grid(rows)
    canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST).save(path)


def sample_prompts(pipe, prompts, images_per_prompt, seed=0):
    from tuneqdm.sampling import generate

    return [generate(pipe, p, images_per_prompt, 25, 7.5, seed=seed + 1000 * i, batch_size=images_per_prompt)
            for i, p in enumerate(prompts)]


def score(per_prompt, real, prompts, token, clip, dino):
    from tuneqdm.eval.encoders import clip_t_score, dino_score
    from tuneqdm.eval.evaluate import without_token

    flat = [im for ims in per_prompt for im in ims]
    texts = [without_token(p, token) for p, ims in zip(prompts, per_prompt) for _ in ims]
    return {"dino": dino_score(dino, real, flat), "clip_i": dino_score(clip, real, flat),
            "clip_t": clip_t_score(clip, flat, texts)}


def main() -> None:
    from PIL import Image

    from tuneqdm.cli import main as cli
    from tuneqdm.eval.encoders import zero_shot_classify
    from tuneqdm.loading import load_pipeline, pipeline_from
    from tuneqdm.serialization import read_adapter_config
    from tuneqdm.toy.evaluators import load_toy_clip, load_toy_dino, place_prompts
    from tuneqdm.toy.world import PLACES
    from tuneqdm.tuning import QuantConfig, quantize_

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=5, help="toy subject seed")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--learning_rate", type=float, default=None, help="default: tuneqdm train's (2e-3, relative)")
    ap.add_argument("--images", type=int, default=2, help="images per evaluation prompt")
    ap.add_argument("--work", type=Path, default=None, help="keep the subject and the run here (default: temporary)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "personalize")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    subject, run = work / f"s{args.seed}", work / "out"
    t0 = time.perf_counter()
    assert cli(["toy", "subject", "--seed", str(args.seed), "--out", str(subject), "--force"]) == 0
    t1 = time.perf_counter()
    assert cli(["train", "--method", "tuneqdm", "--bits", "4", "--experts", "4", "--instance_data_dir", str(subject),
                "--instance_prompt", "a sks <class>", "--max_train_steps", str(args.steps), "--output_dir", str(run),
                "--quiet", "--force"]
               + ([] if args.learning_rate is None else ["--learning_rate", str(args.learning_rate)])) == 0
    train_s = time.perf_counter() - t1
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]

    meta = json.loads((subject / "subject.json").read_text())
    token = meta["instance_prompt"].split()[1]
    prompts = meta["prompts"]
    real = [Image.open(subject / p["file"]).convert("RGB") for p in meta["photos"]]

    tuned = load_pipeline(adapter=run)
    cfg = read_adapter_config(run)
    untuned = pipeline_from(None)
    quantize_(untuned.unet, QuantConfig(bits=cfg["bits"], init=cfg["init"], method=cfg["method"],
                                        experts=cfg["experts"], num_train_timesteps=cfg["num_train_timesteps"]))
    untuned.unet.eval()
    clip, dino = load_toy_clip(), load_toy_dino()
    t2 = time.perf_counter()
    samples = {"untuned_w4": sample_prompts(untuned, prompts, args.images),
               "tuneqdm_w4": sample_prompts(tuned, prompts, args.images)}
    sample_s = time.perf_counter() - t2

    beach = prompts.index(f"a {token} {meta['class']} on the beach")
    result = {"subject_seed": args.seed, "class": meta["class"], "steps": args.steps, "learning_rate": args.learning_rate, "prompts": len(prompts),
              "images_per_prompt": args.images, "train_s": train_s, "subject_s": t1 - t0, "sampling_s": sample_s,
              "train_s_per_step": train_s / args.steps, "threads": torch.get_num_threads(),
              "train_peak_gib": round(max(r["peak_mem_mib"] for r in log) / 1024, 3),
              "train_peak_kind": log[-1]["peak_mem"],
              "real_vs_real_dino": None, "scores": {}, "beach": {}}
    from tuneqdm.eval.encoders import cosine_matrix

    emb = dino.encode_images(real)
    off = ~torch.eye(len(real), dtype=torch.bool)
    result["real_vs_real_dino"] = float(cosine_matrix(emb, emb)[off].mean())  # the ceiling of the DINO score
    beach_id = list(PLACES).index("beach")
    for name, per_prompt in samples.items():
        result["scores"][name] = score(per_prompt, real, prompts, token, clip, dino)
        ims = per_prompt[beach]
        seen = zero_shot_classify(clip, ims, place_prompts())
        result["beach"][name] = {"dino": score([ims], real, [prompts[beach]], token, clip, dino)["dino"],
                                 "judged_beach": float((seen == beach_id).float().mean())}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    gen = lambda pipe: sample_prompts(pipe, [prompts[beach]], 4, seed=7)[0]  # noqa: E731
    picture = args.out.with_name(args.out.name + ".png")
    _picture([real[:4], gen(untuned), gen(tuned)], picture)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    s = result["scores"]
    md = ["# Personalization on the embedded default (acceptance)", "",
          f"Command: `python benchmarks/personalize.py --seed {args.seed} --steps {args.steps} --images {args.images}` "
          f"(CPU, {result['threads']} threads). Subject: `tuneqdm toy subject --seed {args.seed}` (a {meta['class']}); "
          f"training: `tuneqdm train --method tuneqdm --bits 4 --experts 4 --instance_prompt \"a sks <class>\" "
          f"--max_train_steps {args.steps}`.", "",
          f"Training took {train_s:.0f} s ({result['train_s_per_step']:.2f} s/step, peak "
          f"{result['train_peak_kind']} {result['train_peak_gib']} GiB); sampling {len(prompts)} prompts x "
          f"{args.images} images x 2 models "
          f"took {sample_s:.0f} s.", "",
          "| model | DINO-like (subject) | CLIP-I-like | CLIP-T-like (prompt) |", "|---|---|---|---|"]
    for name in samples:
        md.append(f"| {name} | {s[name]['dino']:.3f} | {s[name]['clip_i']:.3f} | {s[name]['clip_t']:.3f} |")
    md += ["", f"Real photos against each other (DINO-like): {result['real_vs_real_dino']:.3f}.", "",
           f"\"{prompts[beach]}\": DINO-like {result['beach']['untuned_w4']['dino']:.3f} untuned vs "
           f"{result['beach']['tuneqdm_w4']['dino']:.3f} tuned; the CLIP-like judge sees a beach in "
           f"{100 * result['beach']['untuned_w4']['judged_beach']:.0f} % / "
           f"{100 * result['beach']['tuneqdm_w4']['judged_beach']:.0f} % of the images.", "",
           f"![real photos, untuned W4, TuneQDM W4]({picture.name})", "",
           "Rows: the subject's photos; the untuned quantized model; the TuneQDM W4 adapter "
           f"(\"{prompts[beach]}\", seeds 7-10)."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=1))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
