"""The memory savers: every photo's VAE latent distribution and every prompt's embeddings computed once, after which
the VAE and the text encoder(s) are released, so that training holds only the denoiser.

With the savers off (the default for the ``fp`` and ``lora`` baselines, as in diffusers' DreamBooth script) the VAE
and text encoders stay loaded and encode each batch; the numbers are the same, only memory and time differ.
"""

from __future__ import annotations

import gc

import torch


def _time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped square photo: (original size, crop top-left, target size)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" and hasattr(pipe, "text_encoder_2")


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int, device) -> dict[str, torch.Tensor]:
    """One prompt's conditioning without a batch dimension: ``encoder_hidden_states`` (+ SDXL's ``text_embeds`` and
    ``time_ids``), exactly as the pipeline computes it at sampling time."""
    if is_sdxl(pipe):
        emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb[0].float(), "text_embeds": pooled[0].float(),
                "time_ids": _time_ids(resolution).to(device)}
    emb, _ = pipe.encode_prompt(prompt, device, 1, False)
    return {"encoder_hidden_states": emb[0].float()}


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, device, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each image, unscaled: (mean, std), each (N, C, h, w) float32."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    for start in range(0, pixels.shape[0], batch_size):
        dist = vae.encode(pixels[start:start + batch_size].to(device, dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class TrainingTensors:
    """Latent distributions of the instance and class photos and the prompt conditionings, by index."""

    def __init__(self, pipe, instance_pixels: torch.Tensor, class_pixels: torch.Tensor | None, prompts: list[str],
                 resolution: int, device, memory_savers: bool = True):
        self.device, self.resolution = device, resolution
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        shift = getattr(pipe.vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.prompts = list(prompts)
        self.memory_savers = memory_savers
        self.sdxl = is_sdxl(pipe)
        self.pixels = {"instance": instance_pixels, "class": class_pixels}
        if memory_savers:
            self.dists = {k: (None if v is None else encode_pixels(pipe.vae, v, device))
                          for k, v in self.pixels.items()}
            self.conds = [encode_prompt(pipe, p, resolution, device) for p in self.prompts]
            self.pipe = None
            self.pixels = {"instance": None, "class": None}
        else:
            self.pipe, self.dists, self.conds = pipe, None, None

    def latent_dist(self, kind: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.dists is not None:
            mean, std = self.dists[kind]
            return mean[idx.to(mean.device)], std[idx.to(std.device)]
        return encode_pixels(self.pipe.vae, self.pixels[kind][idx], self.device)

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A sample of the posterior, scaled as the denoiser sees it (``noise`` is a standard normal draw)."""
        return ((mean + std * noise) - self.shift_factor) * self.scaling_factor

    def conditioning(self, prompt_ids: list[int]) -> dict:
        """The denoiser's keyword arguments for a batch: ``encoder_hidden_states`` (+ ``added_cond_kwargs``)."""
        if self.conds is not None:
            rows = [self.conds[i] for i in prompt_ids]
        else:
            rows = [encode_prompt(self.pipe, self.prompts[i], self.resolution, self.device) for i in prompt_ids]
        out = {"encoder_hidden_states": torch.stack([r["encoder_hidden_states"] for r in rows])}
        if self.sdxl:
            out["added_cond_kwargs"] = {"text_embeds": torch.stack([r["text_embeds"] for r in rows]),
                                        "time_ids": torch.stack([r["time_ids"] for r in rows])}
        return out


def release(pipe) -> None:
    """Drop the pipeline's VAE and text encoders (the caller drops its own references too)."""
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if hasattr(pipe, name):
            setattr(pipe, name, None)
    gc.collect()
