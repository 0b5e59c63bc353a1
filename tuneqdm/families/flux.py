"""FLUX.1: CLIP (pooled) + T5 prompts, 2x2 latent patches packed into tokens with position ids, a guidance embedding
fed the distilled guidance, sigma in [0, 1] as the timestep, rectified flow."""

from __future__ import annotations

import torch

from .base import Family


class Flux(Family):
    name = "flux"
    label = "FLUX.1"
    example_model = "FLUX.1-dev"
    pipelines = ("FluxPipeline",)
    denoisers = ("FluxTransformer2DModel",)
    guidance = 3.5
    distilled_guidance = True
    t5_tokenizer = "tokenizer_2"
    start_token = False
    size_from_vae = True  # its transformer has no size; the pipeline would otherwise assume 1024 px
    first_last = ("x_embedder", "proj_out")
    linspace_sigmas = True

    def timestep_conversion(self, model) -> tuple[float, float]:
        return 0.0, 1000.0  # the pipeline passes t / 1000 = sigma

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        L = self.prompt_limit(pipe, max_sequence_length)
        emb, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=prompt, device=device, max_sequence_length=L)
        return {"encoder_hidden_states": emb[0], "pooled_projections": pooled[0], "txt_ids": text_ids}

    def training_context(self, pipe, resolution: int) -> dict:
        """Image position ids from the pipeline's public ``prepare_latents`` (it returns a given latent as is, with
        the ids); the guidance embedding at the family's default guidance, as sampling uses."""
        model = getattr(pipe, self.attribute)
        channels = model.config.in_channels // 4
        side = 2 * (resolution // (pipe.vae_scale_factor * 2))
        placeholder = torch.zeros(1, channels, side, side)
        _, img_ids = pipe.prepare_latents(1, channels, resolution, resolution, torch.float32, "cpu", None,
                                          latents=placeholder)
        guidance = self.guidance if getattr(model.config, "guidance_embeds", False) else None
        return {"img_ids": img_ids, "guidance": guidance, "pipeline_class": type(pipe)}

    def to_model_layout(self, latents, context):
        """Flux's 2x2-patch tokens (B, h/2·w/2, 4C).

        ``_pack_latents`` is a static helper with a leading underscore; diffusers' own Flux training scripts call it,
        it has no public twin (``prepare_latents`` packs only the noise it draws itself), and copying its reshape
        would fork it. ``tests/test_train_dit.py`` pins it to ``prepare_latents``'s output."""
        B, C, h, w = latents.shape
        return context["pipeline_class"]._pack_latents(latents, B, C, h, w)

    def batch_kwargs(self, rows, device, context) -> dict:
        stack = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0] if k != "txt_ids"}
        out = {**stack, "txt_ids": rows[0]["txt_ids"].to(device), "img_ids": context["img_ids"].to(device)}
        if context.get("guidance") is not None:
            out["guidance"] = torch.full((len(rows),), context["guidance"], device=device)
        return out


FAMILIES = (Flux(),)
