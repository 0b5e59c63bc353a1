"""The pipelines tuneqdm personalizes, each family's behaviour in its own module.

A family (``base.Family``) answers everything that differs between pipelines: how prompts are encoded, how latents
are laid out, how the denoiser is called and what timestep it takes, its default guidance, native size, LoRA targets
and full-precision layers. Everything above this package asks here instead of naming a pipeline or a model class;
adding a family is one module listed in ``MODULES`` (and one tiny test pipeline).
"""

from __future__ import annotations

import contextlib
import importlib
import logging

from torch import nn

from ..errors import TuneQDMError
from .base import Family

# one module per family (or group sharing a layout), in the order messages list them
MODULES = ("sd", "flux", "sd3", "pixart", "chroma", "sana", "zimage", "qwenimage", "flux2")


def _registry() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module in MODULES:
        for fam in importlib.import_module(f"{__name__}.{module}").FAMILIES:
            found.update(dict.fromkeys(fam.pipelines, fam))
    return found


PIPELINES: dict[str, Family] = _registry()  # pipeline class name -> its family
FAMILIES: tuple[Family, ...] = tuple(dict.fromkeys(PIPELINES.values()))
# families that share a denoiser class (FLUX.2 [klein] and [dev]) give the same answers about the model itself
# (timestep conversion, layers kept in float): any of them can answer for it
_BY_DENOISER = {name: fam for fam in FAMILIES for name in fam.denoisers}


def supported() -> str:
    """The supported pipeline classes, as messages list them."""
    return ", ".join(PIPELINES)


def guidance_defaults() -> str:
    """Each family's default guidance scale, as help texts list them (``distilled``: fed to a guidance embedding)."""
    return ", ".join(f"{f.guidance:g} for {f.label}" + (" (distilled)" if f.distilled_guidance else "")
                     for f in FAMILIES)


def example_commands() -> list[str]:
    """One ``tuneqdm train`` command per supported pipeline class, the class in a comment: the README lists these."""
    return [f"tuneqdm train --pretrained_model_name_or_path {fam.example_model} --instance_data_dir dog "
            f'--instance_prompt "a sks dog" --output_dir {fam.name}-dog  # {cls}' for cls, fam in PIPELINES.items()]


def family_named(name: str) -> Family:
    """The family of the pipeline class ``name``, or one line naming the supported pipeline classes."""
    if name not in PIPELINES:
        raise TuneQDMError(f"{name} is not supported: tuneqdm personalizes {supported()} "
                           "(pass a folder or hub id of one of them)")
    return PIPELINES[name]


def family(pipe) -> Family:
    """The family of ``pipe``'s class, or one line naming the supported pipeline classes."""
    return family_named(type(pipe).__name__)


def family_of_model(model: nn.Module) -> Family | None:
    """The family a denoiser model belongs to, by its class (None: not one of theirs, e.g. a test's own UNet)."""
    return _BY_DENOISER.get(type(model).__name__)


def family_of_denoiser_class(name) -> Family | None:
    """The family whose denoiser model class is named ``name`` (a model folder's ``_class_name``), or None."""
    return _BY_DENOISER.get(name) if isinstance(name, str) else None


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser (its UNet or transformer)."""
    return getattr(pipe, family(pipe).attribute)


def attribute_word(attribute: str) -> str:
    """How messages name the denoiser kept in the pipeline attribute ``attribute``: "UNet" or "transformer"."""
    return "UNet" if attribute == "unet" else attribute


def denoiser_word(pipe) -> str:
    """How messages name the denoiser: "UNet" or "transformer"."""
    return attribute_word(family(pipe).attribute)


def denoiser_component(pipe) -> str:
    """The name of the denoiser's component, for ``DiffusionPipeline.from_pretrained(..., <name>=model)``."""
    return family(pipe).attribute


def native_size(pipe) -> tuple[int, int]:
    """(the image size the model was made for, the multiple every image size must be): the one rule for training and
    sampling."""
    return family(pipe).native_size(pipe)


def check_size(pipe, size: int | None, flag: str, multiple: int | None = None) -> None:
    """One line when an image side of ``size`` pixels (None: the native one) does not fit the pipeline's denoiser:
    not a multiple of what its latent grid and patches need (diffusers would resize it silently, or fail), or beyond
    what its positional embedding covers (a traceback deep in the model). The one rule of every command's sizes;
    ``multiple`` (None: the family's sampling multiple) is training's stricter one."""
    if size is None:
        return
    fam = family(pipe)
    native, need = fam.native_size(pipe)[0], multiple or fam.size_multiple(pipe)
    if size % need:
        raise TuneQDMError(f"{flag} {size} does not fit this model: it must be a multiple of {need} (its native size "
                           f"is {native})")
    bound = fam.max_size(pipe)
    if bound is not None and size > bound[0]:
        model = type(getattr(pipe, fam.attribute)).__name__
        raise TuneQDMError(f"{flag} {size} does not fit this model: the positional embedding of its {model} covers "
                           f"at most {bound[0]} px ({bound[1]}): give {bound[0]} or less (its native size is "
                           f"{native})")


def call_kwargs(pipe, height: int | None = None, width: int | None = None,
                max_sequence_length: int | None = None) -> dict:
    """The keyword arguments of ``pipe(...)`` that differ by family (see ``Family.call_kwargs``), the sizes checked
    (``check_size``)."""
    check_size(pipe, height, "--height")
    check_size(pipe, width, "--width")
    return family(pipe).call_kwargs(pipe, height, width, max_sequence_length)


def guidance_kwargs(pipe, scale: float | None, n: int, negative_prompt: str | None = None) -> dict:
    """How ``pipe(...)`` takes guidance ``scale`` (None: the family's default) for ``n`` prompts: classifier-free,
    distilled, or (Qwen-Image) a true CFG scale with a negative prompt."""
    fam = family(pipe)
    return fam.guidance_kwargs(pipe, fam.guidance if scale is None else scale, n, negative_prompt)


def is_flow_matching(scheduler_config) -> bool:
    """Whether a scheduler (by its configuration) solves a flow-matching ODE: training then uses rectified flow and
    sampling keeps it (the DDPM-family samplers solve another). Read from the configuration, not the class: SANA's
    ``DPMSolverMultistepScheduler`` is one when it predicts flow (``prediction_type="flow_prediction"``,
    ``use_flow_sigmas``); the ``FlowMatch*`` schedulers have no noise betas at all."""
    config = dict(scheduler_config)
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        return True
    return "beta_schedule" not in config and "trained_betas" not in config and "shift" in config


def timestep_conversion(model: nn.Module) -> tuple[float, float]:
    """(offset, scale): ``model``'s ``timestep`` argument ``t`` is ``offset + scale·t`` training timesteps ((0, 1) for
    a model of no family); ``training_timesteps`` applies it."""
    fam = family_of_model(model)
    return (0.0, 1.0) if fam is None else fam.timestep_conversion(model)


def timestep_argument(model: nn.Module) -> str:
    """The name of ``model.forward``'s timestep parameter (``timestep`` unless its family says otherwise)."""
    fam = family_of_model(model)
    return "timestep" if fam is None else fam.timestep_argument


def training_timesteps(model: nn.Module, t):
    """``model``'s ``timestep`` argument in units of the scheduler's training timesteps 0..T (routing reads it)."""
    fam = family_of_model(model)
    return t if fam is None else fam.from_model_timestep(model, t)


def model_timesteps(model: nn.Module, t):
    """Training timesteps ``t`` (units of 0..T) as ``model``'s ``timestep`` argument: the inverse of
    ``training_timesteps``."""
    fam = family_of_model(model)
    return t if fam is None else fam.to_model_timestep(model, t)


# ---- prompt length limits (T5 and language-model encoders) -------------------------------------------------------
def t5_limit(pipe, max_sequence_length: int | None = None) -> int | None:
    """The number of tokens the pipeline encodes (None: no limit of its own)."""
    return family(pipe).prompt_limit(pipe, max_sequence_length)


def t5_overflow(pipe, prompt: str, max_sequence_length: int | None = None) -> tuple[int, int, str] | None:
    """(tokens, limit, the text the encoder will not see) when ``prompt`` is longer than the pipeline's limit; None
    when it fits or the pipeline has none."""
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
    those notices are dropped while ``pipe`` encodes (pipelines with a prompt limit only)."""
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


__all__ = ["FAMILIES", "Family", "PIPELINES", "attribute_word", "call_kwargs", "check_size", "denoiser",
           "denoiser_component", "denoiser_word", "example_commands", "family", "family_named",
           "family_of_denoiser_class", "family_of_model", "guidance_defaults", "guidance_kwargs", "is_flow_matching",
           "model_timesteps", "native_size", "supported", "t5_limit", "t5_overflow", "timestep_argument",
           "timestep_conversion", "training_timesteps", "without_truncation_logs"]
