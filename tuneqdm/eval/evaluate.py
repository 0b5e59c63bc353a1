"""The DreamBooth protocol: N seeded images per prompt, scored against the subject's photos and the prompts.

DINO = mean cosine over all (real, generated) pairs of the subject-fidelity encoder; CLIP-I likewise with the CLIP
image tower; CLIP-T = mean cosine between each image and its prompt (the rare token dropped unless asked: a CLIP
model has never seen it). Every number is kept per prompt; the means weigh prompts equally.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..families import family
from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, atomic_dir
from ..photos import IMAGE_SUFFIXES, read_photo
from ..progress import progress
from ..sampling import generate
from .encoders import ImageEncoder, ImageTextEncoder, clip_i_score, clip_t_score, dino_score

METRICS = "metrics.json"
PHOTOS = "photos"
EVALUATION_FILES = (METRICS, "grid.png", "images", PHOTOS)  # what evaluate (and --metric fid) write into --out


def read_photos(folder) -> list[Image.Image]:
    """The subject's photos (every readable image of ``folder``, sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TuneQDMError(f"--instance_data_dir {folder} is not a folder: pass the folder of the subject's photos")
    photos = [read_photo(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    photos = [p for p in photos if p is not None]
    if not photos:
        raise TuneQDMError(f"--instance_data_dir {folder} has no readable images (png, jpg, webp, bmp, gif, tiff)")
    return photos


def without_token(prompt: str, token: str) -> str:
    return " ".join(w for w in prompt.split() if w != token)


def grid(rows: Sequence[Sequence[Image.Image]], side: int = 64) -> Image.Image:
    """One row per prompt, one column per image."""
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * side, len(rows) * side), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            canvas.paste(im.convert("RGB").resize((side, side)), (x * side, y * side))
    return canvas


def evaluate(pipe, real: Sequence[Image.Image], prompts: Sequence[str], images_per_prompt: int,
             subject_encoder: ImageEncoder, clip_encoder: ImageTextEncoder, token: str, out, *, seed: int = 0,
             num_inference_steps: int = 25, guidance_scale: float | None = None, keep_token: bool = False,
             info: dict | None = None, replace: bool = False, max_sequence_length: int | None = None,
             release_denoiser: bool = False) -> dict:
    """Sample, score and write ``out/`` (``metrics.json``, ``grid.png``, ``images/PPP_I.png``, the reference
    photos as ``photos/NN.png``) atomically;
    ``replace``: an earlier evaluation in ``out`` is removed only then, so a failed or interrupted run keeps it;
    ``guidance_scale`` None: the pipeline family's default (recorded as used); ``max_sequence_length``: T5 prompt
    tokens (None: the pipeline's own); ``release_denoiser``: the caller is done with the pipeline, whose denoiser is
    freed when the last prompt's last batch decodes (``tuneqdm.sampling.generate``)."""
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    if images_per_prompt < 1 or not prompts:
        raise TuneQDMError("need at least one prompt and --images_per_prompt >= 1")
    per_prompt, rows = [], []
    for p, prompt in enumerate(progress(prompts, desc="evaluate: prompts", unit="prompt")):
        s = seed + 1000 * p  # prompt p, image i: seed + 1000 p + i
        images = generate(pipe, prompt, images_per_prompt, num_inference_steps, guidance_scale, seed=s,
                          max_sequence_length=max_sequence_length,
                          release_denoiser=release_denoiser and p == len(prompts) - 1)
        text = prompt if keep_token else without_token(prompt, token)
        per_prompt.append({"prompt": prompt, "clip_t_text": text, "seeds": [s + i for i in range(len(images))],
                           "dino": dino_score(subject_encoder, real, images),
                           "clip_i": clip_i_score(clip_encoder, real, images),
                           "clip_t": clip_t_score(clip_encoder, images, [text] * len(images))})
        rows.append(images)
    metrics = {"format_version": FORMAT_VERSION,
               **{k: sum(r[k] for r in per_prompt) / len(per_prompt) for k in ("dino", "clip_i", "clip_t")},
               "subject_encoder": subject_encoder.name, "clip_encoder": clip_encoder.name,
               "clip_t_keeps_token": keep_token, "token": token, "images_per_prompt": images_per_prompt,
               "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
               "real_images": len(real), **(info or {}), "per_prompt": per_prompt}
    if replace:
        shutil.rmtree(out, ignore_errors=True)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for p, images in enumerate(rows):
            for i, im in enumerate(images):
                im.save(tmp / "images" / f"{p:03d}_{i}.png")
        grid(rows).save(tmp / "grid.png")
        (tmp / PHOTOS).mkdir()  # the reference photos the scores compare with: what `tuneqdm report` shows
        for i, im in enumerate(real):
            im.save(tmp / PHOTOS / f"{i:02d}.png")
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1))
    return metrics
