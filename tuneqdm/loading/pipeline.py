"""A diffusers pipeline assembled from a :class:`~tuneqdm.loading.source.Source`, each component built the lean way.

The one place a pipeline is put together, for every command: text encoders streamed from their files module by
module (``text_encoders="stream"``, the default: a T5-XXL in float32 would be 19 GB, streamed it is one Linear at a
time) or resident; the VAE resident in the compute dtype (it is small and runs on every image); the denoiser as the
caller built it (packed integers, a float model, or a meta-device skeleton while only prompts and photos are
encoded); a VAE stored in bfloat16 decodes in bfloat16 (``components.resident_vae``); other models a text-to-image
call does not need (safety checkers, image encoders) left out. diffusers then loads only what is left: tokenizers and
the scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings

import torch
from torch import nn

from ..errors import TuneQDMError, TuneQDMWarning
from ..files import first_line
from ..libraries import dtype_kwarg, quiet_loading
from ..families import check_size
from ..progress import pipeline_progress, stage
from ..shards import content_fingerprint
from .components import resident, resident_vae, skeleton, streamed
from .denoiser import float_denoiser
from .resolver import resolve
from .source import Source

TEXT_ENCODER_MODES = ("stream", "resident")


def check_text_encoders(mode: str) -> str:
    if mode not in TEXT_ENCODER_MODES:
        raise TuneQDMError(f"unknown --text_encoders {mode!r}: choose stream (read module by module as they run, the "
                           "least memory) or resident (loaded whole: faster when many prompts are encoded)")
    return mode


def assemble(source: Source, denoiser: nn.Module | None, device="cpu", dtype: torch.dtype = torch.float32,
             text_encoders: str = "stream", vae_encoder: bool = True):
    """The source's pipeline with ``denoiser`` as its UNet or transformer (None: none), text encoders streamed or
    resident, the VAE resident (``vae_encoder`` False: its decoder only, for pipelines that only sample)."""
    from diffusers import DiffusionPipeline

    check_text_encoders(text_encoders)
    quiet_loading()
    parts: dict[str, object] = {source.denoiser: denoiser}
    for name in source.components():
        if name == source.denoiser or not source.has_weights(name):
            continue  # components without safetensors weights (tokenizers, schedulers, .bin-only models): diffusers'
        if name.startswith("text_encoder"):
            build = streamed if text_encoders == "stream" and source.family.streams_encoders else resident
            parts[name] = build(source, name, device, dtype)
        elif name == "vae":
            parts[name] = resident_vae(source, device, dtype, vae_encoder)
        else:  # safety checker, image encoder: not used to draw from a prompt
            parts[name] = None
    try:
        with _without_logged_errors("diffusers"), stage(f"loading {source.title}"):
            pipe = DiffusionPipeline.from_pretrained(str(source.folder), local_files_only=True, **dtype_kwarg(dtype),
                                                     **({"variant": source.variant} if source.variant else {}),
                                                     **parts)
    except (OSError, ValueError) as e:
        raise TuneQDMError(f"cannot load the pipeline {source.name or source.folder}: {first_line(e, None)} (check "
                           "--pretrained_model_name_or_path, and --variant for a folder saved in one)") from None
    except (TypeError, KeyError, AttributeError, IndexError, NotImplementedError, RuntimeError) as e:
        # a damaged configuration fails inside a component's constructor (a scheduler's beta_schedule, a count)
        raise TuneQDMError(f"cannot build the pipeline {source.name or source.folder} from its configuration files "
                           f"({type(e).__name__}: {first_line(e)}): download the model again, or restore its "
                           "configs") from None
    source.family.check(pipe)
    if "safety_checker" in source.model_components():  # a model with weights that tuneqdm leaves out
        warnings.warn("the pipeline's safety checker is not run: tuneqdm samples without it, as diffusers does with "
                      "safety_checker=None (check images yourself before sharing them)", TuneQDMWarning, stacklevel=2)
    pipeline_progress(pipe)
    return pipe


def check_sizes(source: Source, height: int | None = None, width: int | None = None) -> None:
    """``--height``/``--width`` checked against the source's models before any weight is read (``families.check_size``
    on the pipeline with every model a meta-device skeleton: its configs, tokenizers and scheduler only)."""
    if height is None and width is None:
        return
    from diffusers import DiffusionPipeline

    used = source.used_components()  # the others (a safety checker) are left out, as ``assemble`` leaves them
    parts = {name: skeleton(source, name) if name in used else None for name in source.model_components()}

    quiet_loading()
    with _without_logged_errors("diffusers"):
        pipe = DiffusionPipeline.from_pretrained(str(source.folder), local_files_only=True, **parts,
                                                 **({"variant": source.variant} if source.variant else {}))
    check_size(pipe, height, "--height")
    check_size(pipe, width, "--width")


def pipeline_from(base=None, device="cpu", dtype: torch.dtype = torch.float32, *, revision: str | None = None,
                  variant: str | None = None, single_file_config: str | None = None, denoiser_model: nn.Module | None = None, text_encoders: str = "stream",
                  source: Source | None = None):
    """The base pipeline (at ``revision``, in ``variant``) with ``denoiser_model`` as its denoiser, or its own float
    denoiser loaded resident: what sampling the float base, validation and the tests use."""
    source = source or resolve(base, revision, variant, single_file_config)
    model = denoiser_model if denoiser_model is not None else float_denoiser(source, device, dtype)
    return assemble(source, model, device, dtype, text_encoders)


def check_base(base, revision: str | None = None, variant: str | None = None,
               single_file_config: str | None = None) -> Source | None:
    """The checked source of a base named by the user (None for the embedded one): commands call it before work
    that does not need the model (evaluators, calibration prompts), so a bad base is the first error."""
    return resolve(base, revision, variant, single_file_config) if base is not None else None


def float_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a float model's parameter names, shapes and first 4096 values of each: cheap even
    for SD-size UNets, and different for any two trained bases (used to match LoRA results to their base)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pipeline_fingerprint(source: Source) -> str:
    """The content fingerprint of every model of a pipeline (denoiser, VAE, text encoders), from their files: two
    pipelines that differ only in their VAE differ here."""
    h = hashlib.sha256()
    for name in sorted(source.used_components()):
        h.update(f"{name}={content_fingerprint(source.weight_files(name))};".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _without_logged_errors(library: str):
    """diffusers logs a failed load at ERROR level before raising; the exception becomes tuneqdm's one line, so the
    logged copy is dropped (warnings still show). Its multi-line notice that the safety checker is off is dropped
    too (tuneqdm never builds one: ``assemble`` says so in one line where a pipeline has one)."""
    handlers = logging.getLogger(library).handlers

    def kept(record) -> bool:
        return record.levelno < logging.ERROR and not record.getMessage().startswith(
            "You have disabled the safety checker")

    for handler in handlers:
        handler.addFilter(kept)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(kept)
