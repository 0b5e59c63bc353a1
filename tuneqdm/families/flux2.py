"""FLUX.2: [klein] and [dev] share the transformer class, the VAE and the latent layout (latents patchified 2x2 into
channels and normalised by the VAE batch norm's running statistics, then packed into tokens with 4-axis position ids;
sigma as the timestep). They differ in the prompt encoder and in guidance:

- [klein] (``Flux2KleinPipeline``): a Qwen3 encoder read in the tokenizer's chat template (thinking off) at hidden
  layers 9, 18 and 27, stacked along the features; classifier-free guidance by two calls (4.0), none for a
  step-distilled checkpoint (``is_distilled``).
- [dev] (``Flux2Pipeline``): a Mistral Small 3.1 encoder (``Mistral3ForConditionalGeneration``, its language model)
  read behind the pipeline's system message in the tokenizer's chat template at hidden layers 10, 20 and 30;
  guidance-distilled: the scale (4.0) feeds the transformer's guidance embedding, one call per step.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import TuneQDMError
from .base import Family
from .zimage import check_chat_template


class Flux2Klein(Family):
    name = "flux2klein"
    label = "FLUX.2 [klein]"
    example_model = "FLUX.2-klein-4B"
    pipelines = ("Flux2KleinPipeline",)
    denoisers = ("Flux2Transformer2DModel",)
    guidance = 4.0
    t5_tokenizer = "tokenizer"
    encoder_word = "Qwen3"
    start_token = False
    size_from_vae = True  # the pipeline's own default (128 latents) is its VAE's sample size, 1024 px
    first_last = ("x_embedder", "proj_out")
    linspace_sigmas = True

    def check(self, pipe) -> None:
        """The chat template its prompts are read in, and an encoder at least as deep as the layers it taps."""
        check_chat_template(pipe)
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None:
            return
        # a multimodal encoder (FLUX.2 [dev]'s Mistral 3) is read through its language model
        layers, depth = tapped_layers(pipe), getattr(encoder.config, "text_config", encoder.config).num_hidden_layers
        if max(layers) > depth:
            raise TuneQDMError(f"the text encoder of this {type(pipe).__name__} has {depth} layers, but its prompts "
                               f"are read at hidden layers {', '.join(map(str, layers))}: use the encoder the model "
                               "was published with")

    def guidance_kwargs(self, pipe, scale, n, negative_prompt=None) -> dict:
        """A step-distilled checkpoint has no guidance: its scale is left at 1 (the pipeline warns otherwise)."""
        if getattr(pipe.config, "is_distilled", False):
            scale = 1.0
        return super().guidance_kwargs(pipe, scale, n, negative_prompt)

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, text_ids = pipe.encode_prompt(prompt, device=device, text_encoder_out_layers=tapped_layers(pipe),
                                           max_sequence_length=self.prompt_limit(pipe, max_sequence_length))
        return {"encoder_hidden_states": emb[0], "txt_ids": text_ids[0]}

    def encode_latents(self, vae, pixels):
        """The posterior, patchified 2x2 into channels by the pipeline's static ``_patchify_latents`` (a reshape,
        no public twin; the normalisation's statistics are per patchified channel)."""
        from diffusers import Flux2KleinPipeline

        dist = vae.encode(pixels).latent_dist
        return Flux2KleinPipeline._patchify_latents(dist.mean), Flux2KleinPipeline._patchify_latents(dist.std)

    def latent_scaling(self, vae):
        """The batch norm's running statistics: the denoiser's latent is ``(latent - mean) / sqrt(var + eps)``."""
        mean = vae.bn.running_mean.detach().float().view(-1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.detach().float() + vae.config.batch_norm_eps).view(-1, 1, 1)
        return mean, 1 / std

    def training_context(self, pipe, resolution: int) -> dict:
        """Image position ids from the pipeline's public ``prepare_latents`` (a given latent is packed as is)."""
        model = getattr(pipe, self.attribute)
        side = resolution // (pipe.vae_scale_factor * 2)
        placeholder = torch.zeros(1, model.config.in_channels, side, side)
        _, img_ids = pipe.prepare_latents(1, model.config.in_channels // 4, resolution, resolution, torch.float32,
                                          "cpu", None, latents=placeholder)
        guidance = self.guidance if getattr(model.config, "guidance_embeds", False) else None  # [dev]: distilled
        return {"img_ids": img_ids[0], "guidance": guidance, "pipeline_class": type(pipe)}

    def to_model_layout(self, latents, context):
        """(B, C, h, w) patchified latents as tokens (B, h·w, C), by the pipeline's static ``_pack_latents``."""
        return context["pipeline_class"]._pack_latents(latents)

    def batch_kwargs(self, rows, device, context) -> dict:
        hidden = torch.stack([r["encoder_hidden_states"] for r in rows]).to(device)
        txt_ids = torch.stack([r["txt_ids"] for r in rows]).to(device)
        img_ids = context["img_ids"].to(device).expand(len(rows), -1, -1)
        out = {"encoder_hidden_states": hidden, "txt_ids": txt_ids, "img_ids": img_ids}
        if context.get("guidance") is not None:  # the guidance embedding at the family's default, as sampling uses
            out["guidance"] = torch.full((len(rows),), context["guidance"], device=device)
        return out

    def timestep_conversion(self, model) -> tuple[float, float]:
        return 0.0, 1000.0  # the pipeline passes t / 1000 = sigma


def tapped_layers(pipe) -> tuple[int, ...]:
    """The encoder's hidden layers the pipeline's call reads (its ``text_encoder_out_layers`` default)."""
    return tuple(inspect.signature(pipe.__call__).parameters["text_encoder_out_layers"].default)


class Flux2Dev(Flux2Klein):
    """[klein]'s layout and calls (``encode_prompt`` has the same arguments), a Mistral encoder, distilled guidance."""

    name = "flux2dev"
    label = "FLUX.2 [dev]"
    example_model = "FLUX.2-dev"
    pipelines = ("Flux2Pipeline",)
    distilled_guidance = True
    encoder_word = "Mistral"
    # transformers 5 renames a Mistral 3 checkpoint's tensors on load (``vision_tower.*`` -> ``model.vision_tower.*``,
    # ``language_model.model.*`` -> ``model.language_model.*``), which the streamed encoder's one-to-one name match
    # cannot follow yet (as Qwen-Image's): the encoder is loaded whole by transformers
    streams_encoders = False


FAMILIES = (Flux2Klein(), Flux2Dev())
