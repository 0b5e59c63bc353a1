"""SANA: a Gemma 2 encoder read at its last hidden layer behind the pipeline's long default instruction (only the
first token and the prompt's last ``max_sequence_length - 1`` positions are kept, with their mask), a deep-compression
autoencoder (deterministic latents, no shift), a linear-attention transformer taking the raw timestep t in [0, 1000)
times its config's ``timestep_scale``, and a flow-matching DPM-Solver (``prediction_type="flow_prediction"``): the
target is the flow velocity."""

from __future__ import annotations

import inspect

import torch

from .base import Family


class Sana(Family):
    name = "sana"
    label = "SANA"
    example_model = "Sana_1600M_1024px_diffusers"
    pipelines = ("SanaPipeline",)
    denoisers = ("SanaTransformer2DModel",)
    guidance = 4.5
    t5_tokenizer = "tokenizer"
    encoder_word = "Gemma"
    resolution_bins = True
    call = (("clean_caption", False),)
    first_last = ("patch_embed.proj", "proj_out")

    def vae_factor(self, pipe) -> int:
        return 2 ** (len(pipe.vae.config.encoder_block_out_channels) - 1)

    def call_kwargs(self, pipe, height=None, width=None, max_sequence_length=None) -> dict:
        kwargs = super().call_kwargs(pipe, height, width, max_sequence_length)
        native, _ = self.native_size(pipe)  # the pipeline's own default is 1024 px whatever the model
        kwargs["height"], kwargs["width"] = height or native, width or native
        kwargs["use_resolution_binning"] = in_resolution_bins(pipe, kwargs["height"], kwargs["width"])
        return kwargs

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        """As the pipeline's call encodes it: with the call's default instruction (``encode_prompt`` alone uses
        none)."""
        instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
        emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                             clean_caption=False,
                                             max_sequence_length=self.prompt_limit(pipe, max_sequence_length),
                                             complex_human_instruction=instruction)
        return {"encoder_hidden_states": emb[0], "encoder_attention_mask": mask[0]}

    def encode_latents(self, vae, pixels):
        """The deep-compression autoencoder's latent is deterministic: the posterior has no spread."""
        latent = vae.encode(pixels).latent
        return latent, torch.zeros_like(latent)

    def training_context(self, pipe, resolution: int) -> dict:
        model = getattr(pipe, self.attribute)
        return {"learned_variance": model.config.out_channels // 2 == model.config.in_channels}

    def timestep_conversion(self, model) -> tuple[float, float]:
        return 0.0, 1.0 / float(model.config.timestep_scale)  # the pipeline passes t x timestep_scale

    def predict(self, model, x, t, cond, context):
        out = super().predict(model, x, t, cond, context)
        return out.chunk(2, dim=1)[0] if context.get("learned_variance") else out


def in_resolution_bins(pipe, height: int, width: int) -> bool:
    """Whether SANA's aspect-ratio binning keeps this size (defined only for the published sample sizes)."""
    from diffusers.pipelines.sana import pipeline_sana as sana

    bins = {128: sana.ASPECT_RATIO_4096_BIN, 64: sana.ASPECT_RATIO_2048_BIN, 32: sana.ASPECT_RATIO_1024_BIN,
            16: sana.ASPECT_RATIO_512_BIN}.get(pipe.transformer.config.sample_size)
    if bins is None:
        return False
    return any(list(map(float, hw)) == [float(height), float(width)] for hw in bins.values())


FAMILIES = (Sana(),)
