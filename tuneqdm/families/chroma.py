"""Chroma: FLUX.1's layout (packed 2x2 patches, position ids, sigma as the timestep, rectified flow) without CLIP and
without a guidance embedding: one T5 encoder read with its attention mask, classifier-free guidance by two denoiser
calls, and the text mask (every prompt token and the first padding token) extended over the image tokens."""

from __future__ import annotations

import torch

from .flux import Flux


class Chroma(Flux):
    name = "chroma"
    label = "Chroma"
    example_model = "Chroma1-HD"
    pipelines = ("ChromaPipeline",)
    denoisers = ("ChromaTransformer2DModel",)
    guidance = 5.0
    distilled_guidance = False
    t5_tokenizer = "tokenizer"

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, text_ids, mask, _, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                                          max_sequence_length=self.prompt_limit(pipe,
                                                                                                max_sequence_length))
        return {"encoder_hidden_states": emb[0], "text_mask": mask[0], "txt_ids": text_ids}

    def batch_kwargs(self, rows, device, context) -> dict:
        """The pipeline's call: the text mask followed by ones over the image tokens, as ``attention_mask``."""
        hidden = torch.stack([r["encoder_hidden_states"] for r in rows]).to(device)
        text_mask = torch.stack([r["text_mask"] for r in rows]).to(device)
        image = torch.ones(len(rows), context["img_ids"].shape[0], device=device, dtype=text_mask.dtype)
        return {"encoder_hidden_states": hidden, "txt_ids": rows[0]["txt_ids"].to(device),
                "img_ids": context["img_ids"].to(device), "attention_mask": torch.cat([text_mask, image], dim=1)}


FAMILIES = (Chroma(),)
