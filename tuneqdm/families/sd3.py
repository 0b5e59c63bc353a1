"""Stable Diffusion 3/3.5: two CLIP encoders (pooled) + T5, joint attention with the prompt's keys after the image's,
the timestep sigma·1000, rectified flow."""

from __future__ import annotations

from .base import Family


class StableDiffusion3(Family):
    name = "sd3"
    label = "SD3"
    example_model = "stable-diffusion-3.5-medium"
    pipelines = ("StableDiffusion3Pipeline",)
    denoisers = ("SD3Transformer2DModel",)
    guidance = 7.0
    t5_tokenizer = "tokenizer_3"
    text_last = True

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device,
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=self.prompt_limit(pipe, max_sequence_length))
        return {"encoder_hidden_states": emb[0], "pooled_projections": pooled[0]}


FAMILIES = (StableDiffusion3(),)
