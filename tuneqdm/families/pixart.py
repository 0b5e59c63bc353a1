"""PixArt-Σ: T5 prompts with an attention mask, aspect-ratio bins, DDPM timesteps and a learned variance (the first
half of the output channels is the prediction, as in diffusers' PixArt training)."""

from __future__ import annotations

from .base import Family

NO_RESOLUTION = {"resolution": None, "aspect_ratio": None}  # what PixArt-Σ's pipeline passes


class PixArtSigma(Family):
    name = "pixart"
    label = "PixArt-Σ"
    example_model = "PixArt-Sigma-XL-2-1024-MS"
    pipelines = ("PixArtSigmaPipeline",)
    denoisers = ("PixArtTransformer2DModel",)
    guidance = 4.5
    t5_tokenizer = "tokenizer"
    start_token = False
    resolution_bins = True
    # clean_caption rewrites prompts (and needs bs4 + ftfy): the prompt is used as written, as for the others
    call = (("clean_caption", False),)

    def call_kwargs(self, pipe, height=None, width=None, max_sequence_length=None) -> dict:
        kwargs = super().call_kwargs(pipe, height, width, max_sequence_length)
        kwargs["use_resolution_binning"] = in_resolution_bins(pipe, height, width)
        return kwargs

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                             clean_caption=False,
                                             max_sequence_length=self.prompt_limit(pipe, max_sequence_length))
        return {"encoder_hidden_states": emb[0], "encoder_attention_mask": mask[0]}

    def training_context(self, pipe, resolution: int) -> dict:
        model = getattr(pipe, self.attribute)
        return {"learned_variance": model.config.out_channels == 2 * model.config.in_channels}

    def batch_kwargs(self, rows, device, context) -> dict:
        return {**super().batch_kwargs(rows, device, context), "added_cond_kwargs": dict(NO_RESOLUTION)}

    def predict(self, model, x, t, cond, context):
        out = super().predict(model, x, t, cond, context)
        return out.chunk(2, dim=1)[0] if context.get("learned_variance") else out


def in_resolution_bins(pipe, height: int | None, width: int | None) -> bool:
    """Whether PixArt's aspect-ratio binning would keep this size (binning is only meaningful, and only defined, for
    the published sample sizes; elsewhere it raises, and on an off-bin size it would resize the image)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    bins = {256: sigma.ASPECT_RATIO_2048_BIN, 128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN,
            32: alpha.ASPECT_RATIO_256_BIN}.get(pipe.transformer.config.sample_size)
    if bins is None:
        return False
    native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    size = [float(height or native), float(width or native)]
    return any(list(map(float, hw)) == size for hw in bins.values())


FAMILIES = (PixArtSigma(),)
