"""Timestep-aware calibration data (Q-Diffusion): the denoiser's inputs, collected uniformly across sampling steps.

The full-precision pipeline samples each calibration prompt (DDIM by default, classifier-free guidance) and a forward
pre-hook on its UNet records what the UNet receives at ``steps`` uniformly spaced sampling steps: the latent, the
timestep and the text embeddings, both halves of the guidance batch (unconditional and conditional). As in
Q-Diffusion, ``samples_per_step`` (its ``cali_n``) trajectories each contribute at every recorded step (its
``cali_st``), so every recorded timestep is equally represented. The result is a small :class:`CalibrationSet` of
tensors that weight and activation calibration both consume (``unet(**calib.unet_kwargs(rows))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import TuneQDMError
from ..hooks import CallArguments, on_timestep
from ..progress import progress
from ..sampling import generator

CALIBRATION_SEED = 40_000_000  # toy-world seeds [40M, 50M) are PTQ calibration prompts ([50M, 60M): PTQ evaluation)


@dataclass
class CalibrationSet:
    """One row per denoiser input: ``latents (N, C, H, W)``, ``timesteps (N,)``, ``encoder_hidden_states (N, L, D)``,
    the sampling step index ``steps (N,)`` and whether the row is the unconditional half of the guidance batch
    (``unconditional (N,) bool``); ``added_cond_kwargs`` holds SDXL's extra inputs (``{}`` otherwise)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    steps: torch.Tensor
    unconditional: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        n = self.latents.shape[0]
        for name in ("timesteps", "encoder_hidden_states", "steps", "unconditional"):
            if getattr(self, name).shape[0] != n:
                raise TuneQDMError(f"calibration set: {name} has {getattr(self, name).shape[0]} rows, latents {n}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def unet_kwargs(self, rows: slice | torch.Tensor = slice(None)) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for the given rows."""
        kwargs = {"sample": self.latents[rows], "timestep": self.timesteps[rows],
                  "encoder_hidden_states": self.encoder_hidden_states[rows]}
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = {k: v[rows] for k, v in self.added_cond_kwargs.items()}
        return kwargs

    def batches(self, batch_size: int):
        """Row slices of at most ``batch_size`` rows, in order."""
        return [slice(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise TuneQDMError(f"--calib_prompts {path}: no such file; write one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise TuneQDMError(f"--calib_prompts {path} has no prompts: write one prompt per line")
    return prompts


def toy_calibration_prompts(n: int, seed: int = CALIBRATION_SEED) -> list[str]:
    """Captions of ``n`` toy-world scenes from a seed in the PTQ calibration range [40M, 50M)."""
    if not 40_000_000 <= seed < 50_000_000:
        raise TuneQDMError(f"toy calibration prompts use world seeds in [40000000, 50000000), got {seed}")
    from ..toy.world import make_dataset  # on use: the CLI's parser imports this module, the toy world draws (PIL)

    return make_dataset(seed, n)[1]


def recorded_steps(num_inference_steps: int, steps: int) -> list[int]:
    """``steps`` sampling-step indices spread uniformly over ``0 .. num_inference_steps - 1`` (first and last kept)."""
    if not 1 <= steps <= num_inference_steps:
        raise TuneQDMError(f"calibration steps must be between 1 and --num_inference_steps ({num_inference_steps}), "
                           f"got {steps}")
    if steps == 1:
        return [num_inference_steps - 1]
    return sorted({round(i * (num_inference_steps - 1) / (steps - 1)) for i in range(steps)})


@torch.no_grad()
def collect_calibration_set(pipe, prompts: Sequence[str], samples_per_step: int, num_inference_steps: int = 25,
                            steps: int | None = None, guidance_scale: float = 7.5, seed: int = 0,
                            batch_size: int = 8) -> CalibrationSet:
    """Sample ``samples_per_step`` images with the full-precision ``pipe`` (prompt ``i mod len(prompts)``, seed
    ``seed + i``) and keep the UNet's inputs at ``steps`` uniformly spaced sampling steps (default: all of them).

    Rows per recorded call: the whole guidance batch (unconditional then conditional half), so the set holds
    ``samples_per_step x steps x 2`` rows with guidance (``x 1`` without).
    """
    if not prompts:
        raise TuneQDMError("no calibration prompts: pass at least one")
    if samples_per_step < 1:
        raise TuneQDMError(f"--calib_samples must be at least 1, got {samples_per_step}")
    keep = set(recorded_steps(num_inference_steps, steps or num_inference_steps))
    unet = pipe.unet
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("latents", "timesteps", "emb", "steps", "uncond")}
    added: dict[str, list[torch.Tensor]] = {}
    state = {"step": 0}

    def record(timestep, call: CallArguments) -> None:
        step = state["step"]
        state["step"] += 1
        if step not in keep:
            return
        sample = call.get("sample")
        t = torch.as_tensor(timestep).reshape(-1).float()
        emb = call.get("encoder_hidden_states")
        n = sample.shape[0]
        rows["latents"].append(sample.detach().float().cpu())
        rows["timesteps"].append(t.expand(n).cpu() if t.numel() == 1 else t.cpu())
        rows["emb"].append(emb.detach().float().cpu())
        rows["steps"].append(torch.full((n,), step, dtype=torch.long))
        half = n // 2 if getattr(pipe, "do_classifier_free_guidance", guidance_scale > 1) else 0
        rows["uncond"].append(torch.arange(n) < half)
        for k, v in (call.get("added_cond_kwargs") or {}).items():
            added.setdefault(k, []).append(v.detach().float().cpu())

    handle = on_timestep(unet, record)
    if handle is None:
        raise TuneQDMError(f"{type(unet).__name__}.forward takes no timestep: calibration records one per step")
    try:
        for start in progress(range(0, samples_per_step, batch_size), desc="calibration inputs", unit="batch"):
            n = min(batch_size, samples_per_step - start)
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
            state["step"] = 0
            pipe(batch_prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=[generator(seed + start + i) for i in range(n)], output_type="latent")
    finally:
        handle.remove()
    return CalibrationSet(latents=torch.cat(rows["latents"]), timesteps=torch.cat(rows["timesteps"]),
                          encoder_hidden_states=torch.cat(rows["emb"]), steps=torch.cat(rows["steps"]),
                          unconditional=torch.cat(rows["uncond"]),
                          added_cond_kwargs={k: torch.cat(v) for k, v in added.items()})
