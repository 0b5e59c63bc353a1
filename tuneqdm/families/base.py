"""What every family answers, with the answers most pipelines share; a family module overrides what it does its own
way. Families are stateless: whatever depends on one pipeline (its sizes, ids, the guidance it trains with) is
computed from the pipeline and handed back as a ``context`` dict, resolved once by the caller and passed along."""

from __future__ import annotations

import inspect

import numpy as np
import torch

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' DreamBooth-LoRA scripts


class Family:
    """One pipeline layout.

    ``pipelines``: the diffusers pipeline classes of the family (by name). ``denoisers``: its denoiser model classes
    (by name): routing and export see only the model, and find its timestep convention through them. ``attribute``:
    the pipeline attribute holding the denoiser. ``guidance``: the pipeline's own default guidance scale;
    ``distilled_guidance``: it is fed to a guidance embedding (one denoiser call per step) rather than used for
    classifier-free guidance. ``t5_tokenizer``: the tokenizer whose prompts the pipeline's ``max_sequence_length``
    limits (None: no such limit), ``encoder_word`` how messages name that encoder. ``start_token``: the prompt's
    attention keys begin with CLIP's ``<start>``; ``text_last``: in joint attention the prompt's keys follow the
    image's (DGQ keeps ``<start>`` exact). ``size_from_vae``: the native size is the VAE's ``sample_size``.
    ``resolution_bins``: the pipeline snaps sizes to aspect-ratio bins. ``call``: fixed keyword arguments of every
    pipeline call. ``first_last``: the input and output layers, whose activations stay in full precision.
    ``lora_targets``: the modules LoRA wraps by default.
    """

    name = ""
    label = ""  # how help texts and docs name it
    example_model = ""  # the folder name of a published model of the family, for the README's example commands
    pipelines: tuple[str, ...] = ()
    denoisers: tuple[str, ...] = ()
    attribute = "transformer"
    guidance = 7.5
    distilled_guidance = False
    t5_tokenizer: str | None = None
    encoder_word = "T5"
    start_token = True
    text_last = False
    size_from_vae = False
    resolution_bins = False
    call: tuple[tuple[str, object], ...] = ()
    first_last: tuple[str, ...] = ("pos_embed.proj", "proj_out")
    lora_targets: tuple[str, ...] = LORA_TARGETS
    streams_encoders = True  # its text encoders can run streamed from their files (qwenimage.py: one that cannot)
    float_layers: tuple[str, ...] = ()  # never quantized (fnmatch patterns): the model reads their float weight
    own_attention = False  # DGQ replaces its attention processors by its own (a UNet's); else wraps them
    concat_shortcuts = False  # up blocks read concat(hidden, skip): PTQ gives each slice its own quantizer
    single_file = False  # ``tuneqdm export --single_file`` writes its denoiser in the original (LDM) layout
    # why AdaRound's block-by-block reconstruction, which batches recorded denoiser inputs, cannot take this denoiser's
    # (None: it can); ``quantize --calibrate adaround`` is then refused in one line
    adaround_blocked: str | None = None

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def check(self, pipe) -> None:
        """One line when the assembled pipeline lacks something the family reads (a chat template, deep enough
        encoder layers); every command's pipeline passes here before any work."""

    # ---- sizes and the pipeline call -------------------------------------------------------------------------------
    def vae_factor(self, pipe) -> int:
        """How many pixels one latent cell spans."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def native_size(self, pipe) -> tuple[int, int]:
        """(the image size the model was made for, the multiple every size must be): a transformer's
        ``sample_size`` latents (its patches) in pixels."""
        model, vae = getattr(pipe, self.attribute), self.vae_factor(pipe)
        if self.size_from_vae:
            return pipe.vae.config.sample_size, vae * 2
        return model.config.sample_size * vae, vae * model.config.patch_size

    def size_multiple(self, pipe) -> int:
        """The multiple every sampled image side must be (the latent grid times the patches): ``native_size``'s."""
        return self.native_size(pipe)[1]

    def max_size(self, pipe) -> tuple[int, str] | None:
        """(the largest image side, in pixels, the denoiser's positional embedding covers; what bounds it), or None
        when nothing does (rotary or interpolated positions): a learned table of ``pos_embed_max_size`` patches per
        side (SD3, AuraFlow) is cropped to the image and cannot grow."""
        config = getattr(pipe, self.attribute).config
        cells = getattr(config, "pos_embed_max_size", None)
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            return None
        patch = getattr(config, "patch_size", 1)
        patch = patch if isinstance(patch, int) and patch >= 1 else 1
        return cells * patch * self.vae_factor(pipe), f"pos_embed_max_size {cells} patches of {patch}x{patch} latents"

    def call_kwargs(self, pipe, height: int | None = None, width: int | None = None,
                    max_sequence_length: int | None = None) -> dict:
        """The keyword arguments of ``pipe(...)`` that differ by family: image size (None: the native one), the
        prompt length (None: the pipeline's default) and the family's fixed ones."""
        if self.size_from_vae:
            native, _ = self.native_size(pipe)
            height, width = height or native, width or native
        kwargs = {**dict(self.call), "height": height, "width": width}
        if self.t5_tokenizer is not None and max_sequence_length is not None:
            kwargs["max_sequence_length"] = max_sequence_length
        return kwargs

    def guidance_kwargs(self, pipe, scale: float, n: int, negative_prompt: str | None = None) -> dict:
        """The keyword arguments of ``pipe(...)`` for a batch of ``n`` prompts at guidance ``scale`` (with
        ``negative_prompt``, when one is given)."""
        negative = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * n}
        return {"guidance_scale": scale, **negative}

    def prompt_limit(self, pipe, max_sequence_length: int | None = None) -> int | None:
        """The tokens of a prompt the pipeline encodes (None: no limit of its own): ``max_sequence_length``, else
        the default of the pipeline's call."""
        if self.t5_tokenizer is None:
            return None
        if max_sequence_length is not None:
            return max_sequence_length
        default = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
        return default.default if default is not None else None

    # ---- training: conditioning, latents, the denoiser's call -----------------------------------------------------
    def encode_prompt(self, pipe, prompt: str, resolution: int, device, max_sequence_length: int | None) -> dict:
        """One prompt's conditioning without a batch dimension, as the pipeline computes it at sampling time."""
        raise NotImplementedError

    def encode_latents(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of a batch of images, unscaled: (mean, std)."""
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def latent_scaling(self, vae) -> tuple[float, float]:
        """(shift, scale) of the latents the denoiser sees: ``(latent - shift) * scale``."""
        shift = getattr(vae.config, "shift_factor", None)
        return (float(shift) if shift is not None else 0.0), float(vae.config.scaling_factor)

    def training_context(self, pipe, resolution: int) -> dict:
        """What every training call of this pipeline at ``resolution`` shares (ids, guidance, output layout)."""
        return {}

    def to_model_layout(self, latents: torch.Tensor, context: dict):
        """Latents (B, C, h, w) as the denoiser reads them (and its output is compared)."""
        return latents

    def batch_kwargs(self, rows: list[dict], device, context: dict) -> dict:
        """The denoiser's keyword arguments for a batch of prompt conditionings (one dict per sample)."""
        return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}

    # ---- timesteps ------------------------------------------------------------------------------------------------
    linspace_sigmas = False  # its call hands the scheduler sigmas linspace(1, 1/N, N) (FLUX.1's way), not N alone

    def sampling_sigmas(self, pipe, steps: int):
        """The ``sigmas`` the pipeline's call hands its scheduler for ``steps`` steps (None: it passes the step count
        alone), so that the timesteps of its sampling can be listed without sampling."""
        if not self.linspace_sigmas or pipe.scheduler.config.get("use_flow_sigmas"):
            return None
        return np.linspace(1.0, 1 / steps, steps)

    timestep_argument = "timestep"  # the name of the denoiser's forward parameter that takes it

    def timestep_conversion(self, model) -> tuple[float, float]:
        """(offset, scale): the denoiser's ``timestep`` argument ``t`` is ``offset + scale·t`` training timesteps
        (FLUX.1: (0, 1000), it takes sigma; Z-Image: (1000, -1000), it takes 1 - sigma). The one conversion routing,
        training and exported schedules all use."""
        return 0.0, 1.0

    def to_model_timestep(self, model, t: torch.Tensor) -> torch.Tensor:
        """Training timesteps (units of 0..T, T = the scheduler's training timesteps) as the denoiser takes them."""
        offset, scale = self.timestep_conversion(model)
        if scale < 0:  # as the pipeline writes it (Z-Image: (1000 - t) / 1000, which keeps t = 1000 at +0)
            return (offset - t) / -scale
        if offset:
            t = t - offset
        return t / scale if scale != 1 else t

    def from_model_timestep(self, model, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's ``timestep`` argument in training timesteps: the inverse of ``to_model_timestep``, what
        routing reads in sampling and training alike."""
        offset, scale = self.timestep_conversion(model)
        t = t * scale if scale != 1 else t
        return t + offset if offset else t

    def predict(self, model, x, t: torch.Tensor, cond: dict, context: dict) -> torch.Tensor:
        """The denoiser's prediction (in the training target's sign and channels) at training timesteps ``t``."""
        return model(x, timestep=self.to_model_timestep(model, t), **cond, return_dict=False)[0]
