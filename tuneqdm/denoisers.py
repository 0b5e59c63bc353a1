"""The pipelines tuneqdm personalizes, where each keeps its denoiser, and how each is called.

UNet pipelines (SD 1.x/2.x, SDXL) keep the denoiser in ``pipe.unet``; diffusion-transformer pipelines (FLUX.1,
SD3/3.5, PixArt-Σ) in ``pipe.transformer``. Everything above this module asks here instead of naming an attribute or
a pipeline, so that a new pipeline is one entry in ``PIPELINES`` and per-family differences live in its ``Family``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

from torch import nn

from .errors import TuneQDMError


@dataclass(frozen=True)
class Family:
    """What differs between supported pipelines.

    ``attribute``: the pipeline attribute holding the denoiser. ``guidance``: the pipeline's own default guidance
    scale (Flux's is its distilled guidance, fed to the guidance embedding). ``t5_tokenizer``: the tokenizer whose
    prompts a T5 encoder reads (their limit is the pipeline's ``max_sequence_length``). ``start_token``: the prompt's
    attention keys begin with CLIP's ``<start>`` (T5 prompts have none). ``text_last``: in joint attention the prompt's
    keys follow the image's (SD3) rather than precede them (Flux). ``size_from_vae``: the native image size is the
    VAE's ``sample_size`` (Flux's pipeline otherwise assumes 1024 px). ``resolution_bins``: the pipeline snaps sizes
    to aspect-ratio bins (PixArt). ``call``: fixed keyword arguments of every pipeline call. ``first_last``: the
    denoiser's input and output layers, whose activations stay in full precision (Q-Diffusion, DGQ).
    """

    name: str
    attribute: str
    guidance: float = 7.5
    t5_tokenizer: str | None = None
    start_token: bool = True
    text_last: bool = False
    size_from_vae: bool = False
    resolution_bins: bool = False
    call: tuple[tuple[str, object], ...] = ()
    first_last: tuple[str, ...] = ("conv_in", "conv_out")


PIPELINES = {
    "StableDiffusionPipeline": Family("sd", "unet"),
    "StableDiffusionXLPipeline": Family("sdxl", "unet"),
    "FluxPipeline": Family("flux", "transformer", guidance=3.5, t5_tokenizer="tokenizer_2", start_token=False,
                           size_from_vae=True, first_last=("x_embedder", "proj_out")),
    "StableDiffusion3Pipeline": Family("sd3", "transformer", guidance=7.0, t5_tokenizer="tokenizer_3",
                                       text_last=True, first_last=("pos_embed.proj", "proj_out")),
    # clean_caption rewrites prompts (and needs bs4 + ftfy): the prompt is used as written, as for the others
    "PixArtSigmaPipeline": Family("pixart", "transformer", guidance=4.5, t5_tokenizer="tokenizer", start_token=False,
                                  resolution_bins=True, call=(("clean_caption", False),),
                                  first_last=("pos_embed.proj", "proj_out")),
}


def is_flow_matching(scheduler_class: str) -> bool:
    """Whether a scheduler class (by name) is a flow-matching one (Flux, SD3): training uses rectified flow for it, and
    sampling keeps it (the DDPM-family samplers solve another ODE)."""
    return scheduler_class.startswith("FlowMatch")


def family_named(name: str) -> Family:
    """The family of the pipeline class ``name``, or one line naming the supported pipeline classes."""
    if name not in PIPELINES:
        raise TuneQDMError(f"{name} is not supported: tuneqdm personalizes {', '.join(PIPELINES)} "
                           "(pass a folder or hub id of one of them)")
    return PIPELINES[name]


def family(pipe) -> Family:
    """The family of ``pipe``'s class, or one line naming the supported pipeline classes."""
    return family_named(type(pipe).__name__)


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser (its UNet or transformer)."""
    return getattr(pipe, family(pipe).attribute)


def denoiser_word(pipe) -> str:
    """How messages name the denoiser: "UNet" or "transformer"."""
    return attribute_word(family(pipe).attribute)


def attribute_word(attribute: str) -> str:
    """How messages name the denoiser kept in the pipeline attribute ``attribute``: "UNet" or "transformer"."""
    return "UNet" if attribute == "unet" else attribute


def denoiser_component(pipe) -> str:
    """The name of the denoiser's component, for ``DiffusionPipeline.from_pretrained(..., <name>=model)``."""
    return family(pipe).attribute


def native_size(pipe) -> tuple[int, int]:
    """(the image size the model was made for, the multiple every image size must be), the one rule for training
    and sampling: a UNet's or transformer's ``sample_size`` in pixels; Flux's VAE ``sample_size`` (Flux's pipeline
    would otherwise assume 1024 px, its transformer has no size)."""
    model, vae_factor = denoiser(pipe), 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if family(pipe).attribute == "unet":
        return model.config.sample_size * vae_factor, vae_factor * 2 ** (len(model.config.block_out_channels) - 1)
    if family(pipe).size_from_vae:
        return pipe.vae.config.sample_size, vae_factor * 2
    return model.config.sample_size * vae_factor, vae_factor * model.config.patch_size


def call_kwargs(pipe, height: int | None = None, width: int | None = None,
                max_sequence_length: int | None = None) -> dict:
    """The keyword arguments of ``pipe(...)`` that differ by family: image size (None: the model's native size),
    ``max_sequence_length`` (T5 pipelines; None: the pipeline's default) and the family's fixed ones."""
    f = family(pipe)
    if f.size_from_vae:
        native, _ = native_size(pipe)
        height, width = height or native, width or native
    kwargs = {**dict(f.call), "height": height, "width": width}
    if f.t5_tokenizer is not None and max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    if f.resolution_bins:
        kwargs["use_resolution_binning"] = _in_resolution_bins(pipe, height, width)
    return kwargs


def _in_resolution_bins(pipe, height: int | None, width: int | None) -> bool:
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


# The denoiser's ``timestep`` argument in units of the scheduler's training timesteps 0..T is ``timestep x scale``:
# FLUX.1's pipeline passes t/1000 (= sigma) where SD3 passes sigma·1000 and the UNets and PixArt integer timesteps.
# Routing (tuning/routing.py) and training read this one table, so both map a step onto the same expert.
TIMESTEP_SCALES = {"FluxTransformer2DModel": 1000.0}


def timestep_scale(model: nn.Module) -> float:
    """How many training timesteps one unit of ``model``'s ``timestep`` argument is (1 unless registered)."""
    return TIMESTEP_SCALES.get(type(model).__name__, 1.0)


# ---- T5 prompts: their length limit and what a longer prompt loses ---------------------------------------------------
def t5_limit(pipe, max_sequence_length: int | None = None) -> int | None:
    """The number of T5 tokens the pipeline encodes (None: no T5 encoder): ``max_sequence_length``, else the
    pipeline's own default (Flux 512, SD3 256, PixArt-Σ 300)."""
    if family(pipe).t5_tokenizer is None:
        return None
    if max_sequence_length is not None:
        return max_sequence_length
    default = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    return default.default if default is not None else None


def t5_overflow(pipe, prompt: str, max_sequence_length: int | None = None) -> tuple[int, int, str] | None:
    """(tokens, limit, the text the encoder will not see) when ``prompt`` is longer than the pipeline's T5 limit;
    None when it fits or the pipeline has no T5 encoder."""
    limit = t5_limit(pipe, max_sequence_length)
    if limit is None:
        return None
    tok = getattr(pipe, family(pipe).t5_tokenizer)
    ids = tok(prompt, truncation=False, add_special_tokens=True, verbose=False).input_ids
    if len(ids) <= limit:
        return None
    return len(ids), limit, tok.decode(ids[limit - 1:], skip_special_tokens=True)


@contextlib.contextmanager
def without_truncation_logs(pipe):
    """diffusers logs a multi-line notice per text encoder for a cut prompt; tuneqdm says it once, in one line, so
    those notices are dropped while ``pipe`` encodes (T5 pipelines only)."""
    handlers = logging.getLogger("diffusers").handlers if family(pipe).t5_tokenizer is not None else []

    def not_truncation(record) -> bool:
        return "was truncated" not in record.getMessage()

    for handler in handlers:
        handler.addFilter(not_truncation)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(not_truncation)
