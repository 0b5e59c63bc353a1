"""Stable Diffusion 1.x/2.x and SDXL: a UNet over (B, 4, h, w) latents, CLIP prompts (SDXL: two encoders, a pooled
vector and size micro-conditioning), integer timesteps, epsilon or v targets."""

from __future__ import annotations

import torch

from .base import Family


class StableDiffusion(Family):
    name = "sd"
    label = "SD 1.x/2.x"
    example_model = "stable-diffusion-v1-5"
    pipelines = ("StableDiffusionPipeline",)
    denoisers = ("UNet2DConditionModel",)
    attribute = "unet"
    first_last = ("conv_in", "conv_out")
    single_file = True
    concat_shortcuts = True
    own_attention = True

    def native_size(self, pipe) -> tuple[int, int]:
        """A UNet's ``sample_size`` in pixels; every size a multiple of its downsampling."""
        model, vae = getattr(pipe, self.attribute), self.vae_factor(pipe)
        return model.config.sample_size * vae, vae * 2 ** (len(model.config.block_out_channels) - 1)

    def size_multiple(self, pipe) -> int:
        """The VAE's grid only: a UNet pads a latent its down blocks cannot halve evenly when sampling (diffusers'
        ``forward_upsample_size``); training keeps ``native_size``'s multiple."""
        return self.vae_factor(pipe)

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, _ = pipe.encode_prompt(prompt, device, 1, False)
        return {"encoder_hidden_states": emb[0]}


def _time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped square photo: (original size, crop top-left, target size)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL"
    example_model = "stable-diffusion-xl-base-1.0"
    pipelines = ("StableDiffusionXLPipeline",)

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb[0], "text_embeds": pooled[0], "time_ids": _time_ids(resolution)}

    def batch_kwargs(self, rows, device, context) -> dict:
        stack = super().batch_kwargs(rows, device, context)
        return {"encoder_hidden_states": stack["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": stack["text_embeds"], "time_ids": stack["time_ids"]}}


FAMILIES = (StableDiffusion(), StableDiffusionXL())
