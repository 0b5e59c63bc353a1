"""A PTQ fidelity metric: Frechet distance of image features, generated vs reference, plus the text score.

``FD = ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2 (Σ_r^½ Σ_g Σ_r^½)^½)`` on an evaluator's image embeddings (FID's formula;
``tr((Σ_r Σ_g)^½)`` is computed as the trace of the square root of the symmetric ``Σ_r^½ Σ_g Σ_r^½`` with
``torch.linalg.eigh`` in float64, so no scipy). On the toy world the prompts are captions of procedural scenes and the
reference images are those scenes' renders, from world seed 50,000,000 (PTQ evaluation seeds [50M, 60M); the
calibration prompts come from [40M, 50M)). The text score is the mean cosine between each generated image and its
caption (CLIP-T); the same score of the reference renders is reported as the ceiling.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from ..families import call_kwargs, family, guidance_kwargs
from ..errors import TuneQDMError
from ..files import atomic_dir
from ..progress import progress, stage
from ..sampling import check_sampling, finite_sampling, generator
from ..toy.world import make_dataset
from .encoders import ImageTextEncoder, cosine_matrix
from .evaluate import grid

EVALUATION_SEED = 50_000_000
METRICS = "metrics.json"


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise TuneQDMError(f"need at least 2 feature rows for a covariance, got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root = sqrtm_psd(sigma1)
    middle = root @ sigma2 @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross)


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between two sets of ``(N, D)`` features."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def toy_reference(n: int, seed: int = EVALUATION_SEED):
    """``n`` toy-world renders (uint8 arrays) and their captions."""
    images, captions, _ = make_dataset(seed, n)
    return list(images), captions


@torch.no_grad()
def sample_captions(pipe, captions: Sequence[str], num_inference_steps: int = 25, guidance_scale: float | None = None,
                    seed: int = 0, batch_size: int = 16):
    """One image per caption; image ``i`` uses seed ``seed + i`` (so any subset reproduces); ``guidance_scale``
    None: the pipeline family's default."""
    check_sampling(guidance_scale, num_inference_steps)
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    images = []
    bar = progress(desc="sampling captions", total=len(captions), unit="image")
    with finite_sampling(pipe):
        for start in range(0, len(captions), batch_size):
            batch = list(captions[start:start + batch_size])
            out = pipe(prompt=batch, num_inference_steps=num_inference_steps,
                       **guidance_kwargs(pipe, guidance_scale, len(batch)),
                       generator=[generator(seed + start + i) for i in range(len(batch))], output_type="pil",
                       **call_kwargs(pipe))
            images += out.images
            bar.update(len(batch))
    bar.close()
    return images


def fid_evaluate(pipe, encoder: ImageTextEncoder, out, num_images: int = 1000, world_seed: int = EVALUATION_SEED,
                 seed: int = 0, num_inference_steps: int = 25, guidance_scale: float | None = None,
                 info: dict | None = None, replace: bool = False) -> dict:
    """Generate one image per toy-world caption, score FD and text score against the renders, write ``out/``
    (``metrics.json``, ``grid.png`` of the first 64 images) atomically (``replace``: as in ``evaluate``)."""
    if num_images < 2:
        raise TuneQDMError(f"--fid_images must be at least 2 (a covariance needs two images), got {num_images}")
    reference, captions = toy_reference(num_images, world_seed)
    t0 = time.perf_counter()
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    generated = sample_captions(pipe, captions, num_inference_steps, guidance_scale, seed)
    sample_s = time.perf_counter() - t0
    with stage(f"encoding {len(generated)} images, {len(reference)} renders and their captions"):
        gen_f, ref_f = encoder.encode_images(generated), encoder.encode_images(reference)
        text_f = encoder.encode_texts(captions)
    metrics = {
        "format_version": 1, "metric": "fid", "fd": feature_distance(gen_f, ref_f),
        "text_score": float(cosine_matrix(gen_f, text_f).diagonal().mean()),
        "reference_text_score": float(cosine_matrix(ref_f, text_f).diagonal().mean()),
        "num_images": num_images, "world_seed": world_seed, "seed": seed, "encoder": encoder.name,
        "feature_dim": gen_f.shape[1], "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "sample_seconds": sample_s, **(info or {}),
    }
    rows = [generated[i:i + 8] for i in range(0, min(64, len(generated)), 8)]
    if replace:
        shutil.rmtree(out, ignore_errors=True)
    with atomic_dir(out) as tmp:
        grid(rows).save(tmp / "grid.png")
        (tmp / METRICS).write_text(json.dumps(metrics, indent=1))
    return metrics


def read_metrics(folder) -> dict:
    return json.loads((Path(folder) / METRICS).read_text())
