"""The memory savers: every photo's VAE latent distribution and every prompt's embeddings (all encoders: CLIP, T5,
pooled ones) computed once, after which the VAE and every text encoder are released, so that training holds only the
denoiser.

With the savers off (the default for the ``fp`` and ``lora`` baselines, as in diffusers' DreamBooth script) the VAE
and text encoders stay loaded and encode each batch; the numbers are the same, only memory and time differ.
"""

from __future__ import annotations

import contextlib
import gc

import torch

from ..families import family, t5_overflow, without_truncation_logs
from .data import warn
from .objective import Denoising, encode_prompt


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, device, batch_size: int = 1, family=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each image, unscaled: (mean, std), each (N, C, h, w) float32 (``family``: how its VAE
    encodes; None: a KL VAE's ``latent_dist``). One image at a time by default: the encoder's activations of one
    1024 px image are 0.5 GB per tensor in float32, so a batch of photos would make encoding the peak of a whole
    training run."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start:start + batch_size].to(device, dtype)
        if family is None:
            dist = vae.encode(chunk).latent_dist
            mean, std = dist.mean, dist.std
        else:
            mean, std = family.encode_latents(vae, chunk)
        means.append(mean.float())
        stds.append(std.float())
    return torch.cat(means), torch.cat(stds)


class TrainingTensors:
    """Latent distributions of the instance and class photos and the prompt conditionings, by index."""

    def __init__(self, pipe, instance_pixels: torch.Tensor, class_pixels: torch.Tensor | None, prompts: list[str],
                 resolution: int, device, memory_savers: bool = True, max_sequence_length: int | None = None):
        self.device, self.resolution, self.max_sequence_length = device, resolution, max_sequence_length
        self.denoising = Denoising(pipe, resolution)
        self.shift_factor, self.scaling_factor = self.denoising.family.latent_scaling(pipe.vae)
        self.prompts = list(prompts)
        self.memory_savers = memory_savers
        self._warn_truncated(pipe)
        self.pixels = {"instance": instance_pixels, "class": class_pixels}
        if memory_savers:
            self.dists = {k: (None if v is None else encode_pixels(pipe.vae, v, device, family=self.denoising.family))
                          for k, v in self.pixels.items()}
            self.conds = [self._encode(pipe, p) for p in self.prompts]
            self.pipe = None
            self.pixels = {"instance": None, "class": None}
        else:
            self.pipe, self.dists, self.conds = pipe, None, None

    def _warn_truncated(self, pipe):
        """One warning per prompt longer than the T5 limit, naming what the encoder will not see."""
        self.truncated = set()
        for prompt in self.prompts:
            overflow = t5_overflow(pipe, prompt, self.max_sequence_length)
            if overflow is not None:
                _, limit, cut = overflow
                warn(f"the prompt {prompt!r} is longer than the {family(pipe).encoder_word} limit of {limit} tokens "
                     "(--max_sequence_length): "
                     f"it is truncated, the encoder does not see {cut!r}")
                self.truncated.add(prompt)

    def _encode(self, pipe, prompt: str) -> dict:
        with without_truncation_logs(pipe) if prompt in self.truncated else contextlib.nullcontext():
            cond = encode_prompt(pipe, prompt, self.resolution, self.device, self.max_sequence_length)
        return {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}

    def latent_dist(self, kind: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.dists is not None:
            mean, std = self.dists[kind]
            return mean[idx.to(mean.device)], std[idx.to(std.device)]
        return encode_pixels(self.pipe.vae, self.pixels[kind][idx], self.device, family=self.denoising.family)

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A sample of the posterior, scaled as the denoiser sees it (``noise`` is a standard normal draw)."""
        shift, scale = (v.to(mean.device) if torch.is_tensor(v) else v for v in (self.shift_factor, self.scaling_factor))
        return ((mean + std * noise) - shift) * scale  # per channel where the VAE normalises so (Qwen-Image)

    def conditioning(self, prompt_ids: list[int]) -> dict:
        """The denoiser's keyword arguments for a batch (``encoder_hidden_states`` and the family's others)."""
        if self.conds is not None:
            rows = [self.conds[i] for i in prompt_ids]
        else:
            rows = [self._encode(self.pipe, self.prompts[i]) for i in prompt_ids]
        return self.denoising.kwargs(rows, self.device)


def release(pipe) -> None:
    """Drop the pipeline's VAE, text encoders and tokenizers (the caller drops its own references too)."""
    for name in list(pipe.components):
        if name == "vae" or name.startswith(("text_encoder", "tokenizer")):
            setattr(pipe, name, None)
    gc.collect()
