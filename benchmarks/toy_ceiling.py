"""The ceiling of the toy fidelity benchmark's DINO-like score: what a perfect personalization would get.

    python benchmarks/toy_ceiling.py                          # the shipped pipeline, toy subjects 0-9
    python benchmarks/toy_ceiling.py --pipeline DIR --subjects 0-9

For each subject, the subject itself is rendered by the toy world for every one of its 25 evaluation prompts (the
asked place, colour or material; 4 random poses each) — the images a flawless model would draw — and scored against
the subject's photos with the shipped DINO-like evaluator, as `tuneqdm benchmark fidelity` scores generated images:
raw, and after a round trip through the pipeline's VAE (which every generated image also passes through). Also the
same on the 12 place-only prompts, where the subject's colours are not asked to change. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) images as the VAE's input in [-1, 1], as recipes/pretrain.py trained it."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def ceiling(pipe, dino, seed: int, poses: int = 4) -> dict:
    from PIL import Image

    from tuneqdm.eval.encoders import cosine_matrix
    from tuneqdm.toy.subjects import eval_prompt_targets, make_instance, photo_count, subject_photos
    from tuneqdm.toy.world import Scene, render, sample_pose

    instance = make_instance(seed)
    photos = [im for _, im in subject_photos(instance, seed, photo_count(seed))]
    rng = np.random.default_rng(seed)
    images, place_only = [], []
    for target in eval_prompt_targets():
        for _ in range(poses):
            size, x, y, angle, flip = sample_pose(rng, instance.noun)
            scene = Scene(instance.noun, target["colour"], target["material"], target["place"], x, y, size, angle,
                          flip, instance)
            if target["colour"] is None and target["material"] is None:
                place_only.append(len(images))
            images.append(render(scene, rng))
    with torch.no_grad():
        latents = pipe.vae.encode(to_pixels(np.stack(images))).latent_dist.mode()
        decoded = pipe.vae.decode(latents).sample.clamp(-1, 1)
    round_trip = list(((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())

    def encode(arrays):
        return dino.encode_images([Image.fromarray(a) for a in arrays])

    real = encode(photos)
    raw, vae = cosine_matrix(real, encode(images)), cosine_matrix(real, encode(round_trip))
    return {"raw": float(raw.mean()), "vae": float(vae.mean()), "raw_place_only": float(raw[:, place_only].mean()),
            "vae_place_only": float(vae[:, place_only].mean())}


def main() -> None:
    from tuneqdm.toy.evaluators import load_toy_dino
    from tuneqdm.toy.pipeline import default_pipeline
    from tuneqdm.toy.subjects import parse_seeds

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", type=Path, default=None, help="a pipeline folder (default: the shipped one)")
    ap.add_argument("--subjects", default="0-9")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe, dino = default_pipeline(path=args.pipeline), load_toy_dino()
    per_subject = {s: ceiling(pipe, dino, s) for s in parse_seeds(args.subjects)}
    keys = next(iter(per_subject.values())).keys()
    print(json.dumps({"pipeline": str(args.pipeline or "shipped"),
                      "mean": {k: round(statistics.fmean(v[k] for v in per_subject.values()), 4) for k in keys},
                      "per_subject": {s: {k: round(v, 4) for k, v in d.items()} for s, d in per_subject.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
