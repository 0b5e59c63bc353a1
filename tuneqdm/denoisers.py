"""The pipelines tuneqdm personalizes, and where each keeps its denoiser.

UNet pipelines (SD 1.x/2.x, SDXL) keep it in ``pipe.unet``; diffusion-transformer pipelines (FLUX.1, SD3/3.5,
PixArt-Σ) in ``pipe.transformer``. Everything above this module asks here instead of naming an attribute, so that a
new pipeline is one entry in ``PIPELINES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import TuneQDMError


@dataclass(frozen=True)
class Family:
    """What differs between supported pipelines: a short name and the pipeline attribute holding the denoiser."""

    name: str
    attribute: str


PIPELINES = {
    "StableDiffusionPipeline": Family("sd", "unet"),
    "StableDiffusionXLPipeline": Family("sdxl", "unet"),
    "FluxPipeline": Family("flux", "transformer"),
    "StableDiffusion3Pipeline": Family("sd3", "transformer"),
    "PixArtSigmaPipeline": Family("pixart", "transformer"),
}


def family(pipe) -> Family:
    """The family of ``pipe``'s class, or one line naming the supported pipeline classes."""
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise TuneQDMError(f"{name} is not supported: tuneqdm personalizes {', '.join(PIPELINES)} "
                           "(pass a folder or hub id of one of them)")
    return PIPELINES[name]


def denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser (its UNet or transformer)."""
    return getattr(pipe, family(pipe).attribute)


def denoiser_component(pipe) -> str:
    """The name of the denoiser's component, for ``DiffusionPipeline.from_pretrained(..., <name>=model)``."""
    return family(pipe).attribute


# The denoiser's ``timestep`` argument in units of the scheduler's training timesteps 0..T is ``timestep x scale``:
# FLUX.1's pipeline passes t/1000 (= sigma) where SD3 passes sigma·1000 and the UNets and PixArt integer timesteps.
# Routing (tuning/routing.py) and training read this one table, so both map a step onto the same expert.
TIMESTEP_SCALES = {"FluxTransformer2DModel": 1000.0}


def timestep_scale(model: nn.Module) -> float:
    """How many training timesteps one unit of ``model``'s ``timestep`` argument is (1 unless registered)."""
    return TIMESTEP_SCALES.get(type(model).__name__, 1.0)
