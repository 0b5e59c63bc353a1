"""Qwen-Image: a Qwen2.5-VL encoder read at its last hidden layer on the prompt in the pipeline's template (the
template's first 34 tokens dropped, each prompt kept at its own length: a batch is zero-padded with a mask, none when
nothing is padded), a video VAE normalised per channel (``latents_mean``/``latents_std``) over one frame, 2x2 patches
packed into tokens with their grid sizes (``img_shapes``), sigma as the timestep, rectified flow. Guidance is
classifier-free only with a negative prompt and ``true_cfg_scale`` (``guidance_scale`` feeds a guidance embedding
that only distilled checkpoints have)."""

from __future__ import annotations

import torch

from .base import Family


class QwenImage(Family):
    name = "qwenimage"
    label = "Qwen-Image"
    example_model = "Qwen-Image"
    pipelines = ("QwenImagePipeline",)
    denoisers = ("QwenImageTransformer2DModel",)
    guidance = 4.0
    t5_tokenizer = "tokenizer"
    encoder_word = "Qwen2.5-VL"
    start_token = False
    first_last = ("img_in", "proj_out")
    # transformers 5 renames a Qwen2.5-VL checkpoint's tensors on load (``visual.*`` -> ``model.visual.*``, ...), which
    # the streamed encoder's one-to-one name match cannot follow yet: the encoder is loaded whole by transformers
    streams_encoders = False
    adaround_blocked = "takes each prompt at its own length (so do its blocks' text tokens and rotary embeddings)"
    linspace_sigmas = True

    def vae_factor(self, pipe) -> int:
        return 2 ** len(pipe.vae.temperal_downsample)

    def native_size(self, pipe) -> tuple[int, int]:
        """The pipeline's own default size (its transformer has no size): ``default_sample_size`` latents."""
        vae = self.vae_factor(pipe)
        return pipe.default_sample_size * vae, vae * 2

    def call_kwargs(self, pipe, height=None, width=None, max_sequence_length=None) -> dict:
        kwargs = super().call_kwargs(pipe, height, width, max_sequence_length)
        native, _ = self.native_size(pipe)
        kwargs["height"], kwargs["width"] = height or native, width or native
        return kwargs

    def guidance_kwargs(self, pipe, scale, n, negative_prompt=None) -> dict:
        """Real guidance needs a negative prompt: the empty one (a space, as diffusers' examples write it) unless one
        is given; a guidance-distilled checkpoint's embedding gets the same scale."""
        distilled = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        if distilled:
            return {"guidance_scale": scale, "true_cfg_scale": 1.0}
        if scale <= 1:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": scale, "negative_prompt": [" " if negative_prompt is None else negative_prompt] * n}

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, _ = pipe.encode_prompt(prompt, device=device,
                                    max_sequence_length=self.prompt_limit(pipe, max_sequence_length))
        return {"encoder_hidden_states": emb[0]}

    def encode_latents(self, vae, pixels):
        """One frame through the video VAE."""
        dist = vae.encode(pixels[:, :, None]).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def latent_scaling(self, vae):
        """Per channel: the denoiser's latent is ``(latent - mean) / std`` (the pipeline decodes ``x·std + mean``)."""
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(-1, 1, 1)
        return mean, 1 / std

    def training_context(self, pipe, resolution: int) -> dict:
        side = resolution // self.vae_factor(pipe) // 2
        model = getattr(pipe, self.attribute)
        guidance = self.guidance if getattr(model.config, "guidance_embeds", False) else None
        return {"img_shape": (1, side, side), "guidance": guidance, "pipeline_class": type(pipe)}

    def to_model_layout(self, latents, context):
        """2x2-patch tokens by the pipeline's static ``_pack_latents`` (no public twin; see the FLUX family)."""
        B, C, h, w = latents.shape
        return context["pipeline_class"]._pack_latents(latents, B, C, h, w)

    def batch_kwargs(self, rows, device, context) -> dict:
        """Prompts of several lengths zero-padded to the longest, with a mask (None when nothing is padded, as the
        pipeline passes it)."""
        embs = [r["encoder_hidden_states"] for r in rows]
        longest = max(e.shape[0] for e in embs)
        hidden = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embs])
        mask = torch.stack([torch.arange(longest) < e.shape[0] for e in embs]).long()
        out = {"encoder_hidden_states": hidden.to(device), "img_shapes": [[context["img_shape"]]] * len(rows),
               "encoder_hidden_states_mask": None if bool(mask.all()) else mask.to(device)}
        if context.get("guidance") is not None:
            out["guidance"] = torch.full((len(rows),), context["guidance"], device=device)
        return out

    def timestep_conversion(self, model) -> tuple[float, float]:
        return 0.0, 1000.0  # the pipeline passes t / 1000 = sigma


FAMILIES = (QwenImage(),)
