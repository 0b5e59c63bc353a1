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

from ..families import call_kwargs, denoiser, family, guidance_kwargs
from ..errors import TuneQDMError
from ..files import read_prompt_file
from ..hooks import CallArguments, forward_signature, on_call
from ..progress import progress
from ..sampling import generator

CALIBRATION_SEED = 40_000_000  # toy-world seeds [40M, 50M) are PTQ calibration prompts ([50M, 60M): PTQ evaluation)


@dataclass
class CalibrationSet:
    """One row per denoiser input: ``latents (N, ...)`` (a UNet's ``sample``, a transformer's ``hidden_states``),
    ``timesteps (N,)``, ``encoder_hidden_states (N, L, D)``, the sampling step index ``steps (N,)`` and whether the row
    is the unconditional half of the guidance batch (``unconditional (N,) bool``). ``extra`` holds every other per-row
    argument under its name (SDXL's ``added_cond_kwargs`` dict, Flux's ``pooled_projections`` and
    ``guidance``, a T5 ``encoder_attention_mask``; ``{}`` for SD), ``constants`` the arguments shared by every row
    (Flux's ``img_ids``/``txt_ids``, PixArt's empty ``added_cond_kwargs``), ``sample_name`` the name of the latent
    argument."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    steps: torch.Tensor
    unconditional: torch.Tensor
    extra: dict = field(default_factory=dict)
    constants: dict = field(default_factory=dict)
    sample_name: str = "sample"

    def __post_init__(self):
        n = self.latents.shape[0]
        for name in ("timesteps", "encoder_hidden_states", "steps", "unconditional"):
            if getattr(self, name).shape[0] != n:
                raise TuneQDMError(f"calibration set: {name} has {getattr(self, name).shape[0]} rows, latents {n}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def unet_kwargs(self, rows: slice | torch.Tensor = slice(None)) -> dict:
        """Keyword arguments of the denoiser's ``forward`` for the given rows."""
        kwargs = {self.sample_name: self.latents[rows], "timestep": self.timesteps[rows],
                  "encoder_hidden_states": self.encoder_hidden_states[rows], **self.constants}
        for name, value in self.extra.items():
            kwargs[name] = {k: _rows(v, rows) for k, v in value.items()} if isinstance(value, dict) else value[rows]
        return kwargs

    def batches(self, batch_size: int):
        """Row slices of at most ``batch_size`` rows, in order."""
        return [slice(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]


def _rows(value, rows):
    return value[rows] if torch.is_tensor(value) else value


def _split_arguments(bound: dict, n: int, recorded: tuple[str, ...]) -> tuple[dict, dict]:
    """(per-row tensors, shared tensors) among a denoiser call's other arguments: a tensor (or a dict's tensor) whose
    first dimension is the batch is per row; flags such as ``return_dict`` are left out."""
    per_row, shared = {}, {}
    for name, value in bound.items():
        if name in recorded:
            continue
        if isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
            per_row[name] = {k: v.detach().float().cpu() if torch.is_tensor(v) else v for k, v in value.items()}
        elif isinstance(value, dict):  # e.g. PixArt's added_cond_kwargs without resolution conditioning
            shared[name] = value
        elif torch.is_tensor(value):
            (per_row if value.dim() > 0 and value.shape[0] == n else shared)[name] = value.detach().cpu()
    return per_row, shared


def _concat(chunks: list):
    first = chunks[0]
    if isinstance(first, dict):
        return {k: torch.cat([c[k] for c in chunks]) if torch.is_tensor(first[k]) else first[k] for k in first}
    return torch.cat(chunks)


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise TuneQDMError(f"--calib_prompts {path}: no such file; write one prompt per line")
    return read_prompt_file(path, "--calib_prompts")


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


class _InputRecorder:
    """An ``on_call`` callback keeping the denoiser's inputs at the sampling steps ``keep`` (see ``CalibrationSet``)."""

    def __init__(self, model, keep: set[int]):
        signature = forward_signature(model)
        self.keep = keep
        self.sample_name = "sample" if signature is not None and "sample" in signature.parameters else "hidden_states"
        self.rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("latents", "timesteps", "emb", "steps", "uncond")}
        self.extra: dict[str, list] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.step, self.prompts, self.last_t = -1, 0, None

    def start(self, prompts: int) -> None:
        """A new pipeline call of ``prompts`` prompts: its first denoiser call is step 0."""
        self.step, self.prompts, self.last_t = -1, prompts, None

    def __call__(self, call: CallArguments) -> None:
        bound = call.named()
        t = torch.as_tensor(bound["timestep"]).reshape(-1).float()
        # a sampling step is a timestep: pipelines that guide by two calls (Chroma, Qwen-Image, FLUX.2 [klein]) make
        # both at the same one
        if self.last_t is None or not torch.equal(t[:1], self.last_t):
            self.step, self.last_t = self.step + 1, t[:1].clone()
        step = self.step
        if step not in self.keep:
            return
        sample = bound[self.sample_name]
        n = sample.shape[0]
        self.rows["latents"].append(sample.detach().float().cpu())
        self.rows["timesteps"].append(t.expand(n).cpu() if t.numel() == 1 else t.cpu())
        self.rows["emb"].append(bound["encoder_hidden_states"].detach().float().cpu())
        self.rows["steps"].append(torch.full((n,), step, dtype=torch.long))
        half = n - self.prompts if n == 2 * self.prompts else 0  # a guidance batch: unconditional first
        self.rows["uncond"].append(torch.arange(n) < half)
        per_row, shared = _split_arguments(bound, n, (self.sample_name, "timestep", "encoder_hidden_states"))
        for k, v in per_row.items():
            self.extra.setdefault(k, []).append(v)
        self.constants.update(shared)

    def result(self) -> CalibrationSet:
        rows = {k: torch.cat(v) for k, v in self.rows.items()}
        return CalibrationSet(latents=rows["latents"], timesteps=rows["timesteps"], encoder_hidden_states=rows["emb"],
                              steps=rows["steps"], unconditional=rows["uncond"],
                              extra={k: _concat(v) for k, v in self.extra.items()}, constants=self.constants,
                              sample_name=self.sample_name)


@torch.no_grad()
def collect_calibration_set(pipe, prompts: Sequence[str], samples_per_step: int, num_inference_steps: int = 25,
                            steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                            batch_size: int = 8, max_sequence_length: int | None = None) -> CalibrationSet:
    """Sample ``samples_per_step`` images with the full-precision ``pipe`` (prompt ``i mod len(prompts)``, seed
    ``seed + i``) and keep the denoiser's inputs at ``steps`` uniformly spaced sampling steps (default: all of them).

    Rows per recorded call: the whole guidance batch (unconditional then conditional half), so the set holds
    ``samples_per_step x steps x 2`` rows with guidance (``x 1`` without, e.g. Flux's distilled guidance).
    """
    if not prompts:
        raise TuneQDMError("no calibration prompts: pass at least one")
    if samples_per_step < 1:
        raise TuneQDMError(f"--calib_samples must be at least 1, got {samples_per_step}")
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    model = denoiser(pipe)
    recorder = _InputRecorder(model, set(recorded_steps(num_inference_steps, steps or num_inference_steps)))
    handle = on_call(model, recorder)
    try:
        for start in progress(range(0, samples_per_step, batch_size), desc="calibration inputs", unit="batch"):
            n = min(batch_size, samples_per_step - start)
            recorder.start(n)
            pipe(prompt=[prompts[(start + i) % len(prompts)] for i in range(n)],
                 num_inference_steps=num_inference_steps,
                 generator=[generator(seed + start + i) for i in range(n)], output_type="latent",
                 **guidance_kwargs(pipe, guidance_scale, n),
                 **call_kwargs(pipe, max_sequence_length=max_sequence_length))
    finally:
        handle.remove()
    return recorder.result()
