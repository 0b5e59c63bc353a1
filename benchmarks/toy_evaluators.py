"""Gates of the toy world's evaluators (tuneqdm.toy.evaluators) on fresh gate-seed images, clean and degraded.

    OMP_NUM_THREADS=1 python benchmarks/toy_evaluators.py            # writes docs/benchmarks/toy_evaluators.{json,md}

All images come from world seeds in [20_000_000, 30_000_000) (the evaluator-gate range; training used
[10_000_000, 20_000_000)):

- zero-shot through the CLIP-like text tower, on ``make_dataset(20_000_000, n)`` (the world's own scene
  distribution). Label prompts (prompt ensembles: the label's text embedding is the normalised mean):
  class: ``"a {noun}"`` and ``"a {noun} {phrase}"`` for the 12 place phrases; place: ``"a {noun} {phrase}"`` over the
  10 nouns (12-way, scenes that have a place); colour: ``"a {colour} {noun}"`` over nouns (8-way, scenes with a named
  colour); material: ``"a {material} {noun}"`` over nouns (3-way, scenes with a material). Also: class accuracy on
  subject photos (patterned instances), and CLIP-T of each image with its own caption vs a caption of another scene.
- instance retrieval with the DINO-like encoder among 100 instances ``make_instance(20_000_000 + i)``: gallery = the
  first of ``subject_photos(instance, 20_000_000 + i, 1)``; queries = 4 new photos per instance, each on a place
  other than the gallery's (the plain background included) in a new pose and size. Top-1 over the 100 gallery photos.

"Degraded" images simulate a tiny diffusion model's decoded output with an implementation independent of the
training augmentations (PIL + numpy): Gaussian blur (radius 1.0), down-sampling to 32 px (box) and back (bicubic),
per-channel colour gain in [0.94, 1.06] and Gaussian noise of std 6/255. "Heavy": radius 1.5, 24 px, gain
[0.9, 1.1], noise 10/255 (reported, not gated). For retrieval the gallery stays clean (real photos) and the queries
are degraded (generated images).

Gates: class >= 95 %, place >= 95 %, retrieval top-1 >= 90 %, on clean and degraded images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneqdm.eval import clip_t_score, cosine_matrix, text_prototypes  # noqa: E402
from tuneqdm.toy import CLASSES, COLOURS, MATERIALS, PLACES, Scene, make_dataset, make_instance, render  # noqa: E402
from tuneqdm.toy.evaluators import (class_prompts, colour_prompts, load_toy_clip, load_toy_dino,  # noqa: E402
                                    material_prompts, place_prompts)
from tuneqdm.toy.subjects import subject_photos  # noqa: E402
from tuneqdm.toy.world import sample_pose, seed_entropy  # noqa: E402

GATE_SEED = 20_000_000
GATES = {"class": 0.95, "place": 0.95, "retrieval_top1": 0.90}
LEVELS = {"degraded": dict(radius=1.0, side=32, gain=0.06, noise=6.0),
          "heavy": dict(radius=1.5, side=24, gain=0.10, noise=10.0)}


def degrade(images: np.ndarray, level: str, seed: int) -> np.ndarray:
    """Blur, down/up-sample, colour gain and noise (see the module docstring); deterministic given ``seed``."""
    p = LEVELS[level]
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "degrade", level)))
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = Image.fromarray(img).filter(ImageFilter.GaussianBlur(p["radius"]))
        pil = pil.resize((p["side"], p["side"]), Image.Resampling.BOX).resize(img.shape[:2][::-1],
                                                                              Image.Resampling.BICUBIC)
        x = np.asarray(pil, np.float32) * rng.uniform(1 - p["gain"], 1 + p["gain"], 3)
        x += rng.normal(0.0, p["noise"], x.shape)
        out[i] = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return out


def zero_shot(clip, n: int) -> dict:
    images, captions, scenes = make_dataset(GATE_SEED, n)
    protos = {"class": text_prototypes(clip, class_prompts()), "place": text_prototypes(clip, place_prompts()),
              "colour": text_prototypes(clip, colour_prompts()), "material": text_prototypes(clip, material_prompts())}
    truth = {
        "class": [CLASSES.index(s.noun) for s in scenes],
        "place": [tuple(PLACES).index(s.place) if s.place else -1 for s in scenes],
        "colour": [tuple(COLOURS).index(s.colour) if s.colour and s.material != "metal" else -1 for s in scenes],
        "material": [MATERIALS.index(s.material) if s.material else -1 for s in scenes],
    }
    # patterned subjects (subject photos of fresh instances), class only
    inst_imgs, inst_nouns = [], []
    for i in range(200):
        inst = make_instance(GATE_SEED + 1000 + i)
        (_, img), = subject_photos(inst, GATE_SEED + 1000 + i, 1)
        inst_imgs.append(img)
        inst_nouns.append(CLASSES.index(inst.noun))
    inst_imgs = np.stack(inst_imgs)
    other = [captions[(i + 1) % n] for i in range(n)]
    res = {"n_scenes": n, "n_subject_photos": len(inst_imgs)}
    for level in ("clean", *LEVELS):
        imgs = images if level == "clean" else degrade(images, level, GATE_SEED)
        emb = clip.encode_images(imgs)
        r = {}
        for key, proto in protos.items():
            t = torch.tensor(truth[key])
            keep = t >= 0
            pred = (emb[keep] @ proto.T).argmax(1)
            r[key] = round(float((pred == t[keep]).float().mean()), 4)
            r[f"{key}_n"] = int(keep.sum())
        si = inst_imgs if level == "clean" else degrade(inst_imgs, level, GATE_SEED + 1)
        pred = (clip.encode_images(si) @ protos["class"].T).argmax(1)
        r["class_subjects"] = round(float((pred == torch.tensor(inst_nouns)).float().mean()), 4)
        r["clip_t_own_caption"] = round(clip_t_score(clip, imgs, captions), 4)
        r["clip_t_other_caption"] = round(clip_t_score(clip, imgs, other), 4)
        res[level] = r
    return res


def retrieval_set(n_instances: int, n_queries: int):
    keys = (None, *PLACES)
    gallery, queries, qlabels, nouns = [], [], [], []
    for i in range(n_instances):
        seed = GATE_SEED + i
        inst = make_instance(seed)
        nouns.append(CLASSES.index(inst.noun))
        (scene, img), = subject_photos(inst, seed, 1)
        gallery.append(img)
        rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "bench-queries")))
        others = [p for p in keys if p != scene.place]
        for j in rng.choice(len(others), n_queries, replace=False):
            size, x, y, angle, flip = sample_pose(rng, inst.noun, size_range=(0.45, 0.7))
            queries.append(render(Scene(inst.noun, None, None, others[int(j)], x, y, size, angle, flip, inst), rng))
            qlabels.append(i)
    return np.stack(gallery), np.stack(queries), torch.tensor(qlabels), torch.tensor(nouns)


def retrieval(dino, clip, n_instances: int, n_queries: int) -> dict:
    gallery, queries, labels, nouns = retrieval_set(n_instances, n_queries)
    res = {"n_instances": n_instances, "n_queries": len(labels)}
    same_noun = nouns[labels][:, None] == nouns[None, :]
    for level in ("clean", *LEVELS):
        q = queries if level == "clean" else degrade(queries, level, GATE_SEED + 2)
        r = {}
        for name, enc in (("dino", dino), ("clip_image", clip)):
            sim = cosine_matrix(enc.encode_images(q), enc.encode_images(gallery))
            top = sim.topk(5, dim=1).indices
            key = "retrieval" if name == "dino" else "clip_image_retrieval"
            r[f"{key}_top1"] = round(float((top[:, 0] == labels).float().mean()), 4)
            r[f"{key}_top5"] = round(float((top == labels[:, None]).any(1).float().mean()), 4)
            if name == "dino":
                pos = sim[torch.arange(len(labels)), labels]
                neg_mask = torch.ones_like(sim, dtype=torch.bool)
                neg_mask[torch.arange(len(labels)), labels] = False
                r["dino_cos_same_instance"] = round(float(pos.mean()), 4)
                r["dino_cos_other_same_noun"] = round(float(sim[neg_mask & same_noun].mean()), 4)
                r["dino_cos_other_noun"] = round(float(sim[~same_noun].mean()), 4)
        res[level] = r
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default=None, help="CLIP-like weights (default: the shipped ones)")
    ap.add_argument("--dino", default=None, help="DINO-like weights (default: the shipped ones)")
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--no-write", action="store_true", help="print the JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    clip, dino = load_toy_clip(args.clip), load_toy_dino(args.dino)
    zs = zero_shot(clip, args.scenes)
    rt = retrieval(dino, clip, args.instances, args.queries)
    gates = {}
    for level in ("clean", "degraded"):
        gates[f"class_{level}"] = [zs[level]["class"], GATES["class"], zs[level]["class"] >= GATES["class"]]
        gates[f"place_{level}"] = [zs[level]["place"], GATES["place"], zs[level]["place"] >= GATES["place"]]
        top1 = rt[level]["retrieval_top1"]
        gates[f"retrieval_top1_{level}"] = [top1, GATES["retrieval_top1"], top1 >= GATES["retrieval_top1"]]
    cmd = "OMP_NUM_THREADS=1 python benchmarks/toy_evaluators.py" + "".join(f" {a}" for a in sys.argv[1:])
    weights = {}
    for enc in (clip, dino):
        t = enc.train_config.get("training", {})
        weights[enc.name] = {"params": sum(p.numel() for p in enc.parameters()), "training": t}
    files = sorted((ROOT / "tuneqdm" / "toy" / "weights").glob("*.safetensors"))
    result = {"command": cmd, "gates": gates, "all_pass": all(g[2] for g in gates.values()), "zero_shot": zs,
              "retrieval": rt, "degradations": LEVELS, "weights": weights,
              "weight_bytes": {f.name: f.stat().st_size for f in files},
              "device": f"cpu, 1 thread, {platform.processor() or platform.machine()}",
              "wall_s": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "toy_evaluators.json").write_text(text + "\n")
        (args.out / "toy_evaluators.md").write_text(markdown(result))
    return 0 if result["all_pass"] else 1


def _pct(x):
    return f"{100 * x:.1f}"


def markdown(r: dict) -> str:
    zs, rt = r["zero_shot"], r["retrieval"]
    lines = [
        "# Toy-world evaluators: zero-shot (CLIP-like) and instance retrieval (DINO-like)", "",
        f"Produced by `{r['command']}` ({r['device']}, {r['wall_s']} s). Raw numbers: `toy_evaluators.json`. "
        "Images: fresh gate seeds (>= 20,000,000; the evaluators were trained on seeds in [10,000,000, 20,000,000)). "
        "Label prompts and query construction are described in the script's docstring. Degraded images (a tiny "
        "diffusion model's decoded output, simulated with PIL/numpy, independently of the training augmentations): "
        + "; ".join(f"{k}: Gaussian blur radius {v['radius']}, down to {v['side']} px and back, per-channel gain "
                    f"+-{v['gain']}, noise std {v['noise']}/255" for k, v in r["degradations"].items())
        + " (gates on clean and degraded; heavy for information).", "",
        f"## Gates: {'all pass' if r['all_pass'] else 'FAIL'}", "",
        "| gate | value (%) | threshold (%) | pass |", "|---|---|---|---|",
    ]
    for k, (v, t, ok) in r["gates"].items():
        lines.append(f"| {k} | {_pct(v)} | {_pct(t)} | {'yes' if ok else 'NO'} |")
    lines += ["", f"## Zero-shot through the text tower ({zs['n_scenes']} scenes of `make_dataset(20_000_000, "
              f"{zs['n_scenes']})`, {zs['n_subject_photos']} subject photos)", "",
              "| images | class | place | colour | material | class (subject photos) | CLIP-T own caption | "
              "CLIP-T other caption |", "|---|---|---|---|---|---|---|---|"]
    for level in ("clean", *LEVELS):
        z = zs[level]
        lines.append(f"| {level} | {_pct(z['class'])} | {_pct(z['place'])} (n={z['place_n']}) | {_pct(z['colour'])} "
                     f"(n={z['colour_n']}) | {_pct(z['material'])} (n={z['material_n']}) | "
                     f"{_pct(z['class_subjects'])} | {z['clip_t_own_caption']:.3f} | "
                     f"{z['clip_t_other_caption']:.3f} |")
    lines += ["", f"## Instance retrieval among {rt['n_instances']} instances ({rt['n_queries']} queries, new pose and "
              "place; gallery clean, queries clean or degraded)", "",
              "| queries | DINO-like top-1 | top-5 | cos same instance | cos other instance, same noun | "
              "cos other noun | CLIP-like image top-1 |", "|---|---|---|---|---|---|---|"]
    for level in ("clean", *LEVELS):
        x = rt[level]
        lines.append(f"| {level} | {_pct(x['retrieval_top1'])} | {_pct(x['retrieval_top5'])} | "
                     f"{x['dino_cos_same_instance']:.3f} | {x['dino_cos_other_same_noun']:.3f} | "
                     f"{x['dino_cos_other_noun']:.3f} | {_pct(x['clip_image_retrieval_top1'])} |")
    lines += ["", "## Weights", "", "| file | bytes |", "|---|---|"]
    for k, v in r["weight_bytes"].items():
        lines.append(f"| `tuneqdm/toy/weights/{k}` | {v:,} |")
    lines += ["", "| model | params | training command | steps | wall time (s, 1 thread) |", "|---|---|---|---|---|"]
    for k, w in r["weights"].items():
        t = w["training"]
        lines.append(f"| {k} | {w['params']:,} | `{t.get('command', '?')}` | {t.get('steps', '?')} | "
                     f"{t.get('wall_s', '?')} |")
    lines += ["", "The DINO-like run starts from the CLIP-like image tower found in its `--out` (`--dino-init auto`), so "
              "the CLIP-like one trains first (`--which both` does both in order). The CLIP-like image tower is not "
              "trained to tell instances apart (its retrieval top-1 above): CLIP-I with it is a class-level score.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
