"""Sampling a pipeline reproducibly (one seed per image); loading it is ``tuneqdm.loading``'s."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .families import (call_kwargs, denoiser, family, guidance_defaults, guidance_kwargs, is_flow_matching,
                       t5_overflow, without_truncation_logs)
from .errors import TuneQDMError, TuneQDMWarning
from .files import first_line
from .hooks import on_call
from .memory import trim_heap
from .progress import progress
from .quant import cached_weights
from .quant.kernels import DYNAMIC_BITS, FLOAT_BITS
from .quant.paths import DynamicActivations, sampling_kernels
from .results import read_training_json

SCHEDULERS = {  # CLI name -> diffusers scheduler class name
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
SCHEDULER_CHOICES = tuple(SCHEDULERS)
# the help texts of the sampling flags every sampling command shares
SCHEDULER_HELP = "sampler of a DDPM-family pipeline (default: ddim); flow-matching pipelines keep their own"
GUIDANCE_HELP = ("classifier-free guidance scale; a guidance-distilled model's distilled guidance (default: the "
                 f"pipeline family's: {guidance_defaults()})")
MAX_SEQUENCE_LENGTH_HELP = ("tokens of a prompt for the T5 and language-model encoders (default: the pipeline's "
                            "own); a longer prompt is cut, with a warning")


def trained_activation_bits(adapter) -> int:
    """The activation bits an adapter trained with (``train --activation_bits``): what ``generate``, ``evaluate`` and
    the fidelity benchmark sample it with unless told otherwise. 16 (float) for adapters from before the flag."""
    return read_training_json(adapter).get("activation_bits", FLOAT_BITS) if adapter is not None else FLOAT_BITS


def sample_on_dynamic_activations(pipe, bits: int = DYNAMIC_BITS) -> None:
    """Dynamic int8 activations on ``pipe``'s denoiser, its first and last layers in float, as training with
    ``--activation_bits 8`` ran them."""
    DynamicActivations(bits, exclude=family(pipe).first_last).install(denoiser(pipe))


def set_scheduler(pipe, name: str | None) -> str:
    """Sample with ``name`` (None: ddim, or a flow-matching pipeline's own scheduler: the others solve another ODE);
    returns what it samples with (the CLI name, or the flow-matching scheduler's class)."""
    import diffusers

    own = type(pipe.scheduler).__name__
    if is_flow_matching(pipe.scheduler.config):
        if name is not None:
            raise TuneQDMError(f"--scheduler {name} does not apply to {type(pipe).__name__}, a flow-matching pipeline "
                               f"(it samples with its {own}): drop --scheduler")
        return own
    name = name or "ddim"
    if name not in SCHEDULERS:
        raise TuneQDMError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return name


MAX_SEQUENCE_LENGTH = 512  # T5 tokenizers' model_max_length; diffusers' Flux and SD3 refuse longer


def check_sampling(guidance_scale: float | None = None, num_inference_steps: int = 1, height: int | None = None,
                   width: int | None = None, max_sequence_length: int | None = None) -> None:
    """The sampling settings, refused in one line before any model loads: a non-finite guidance scale samples NaN
    (black images), a size off the VAE's 8-pixel grid or a T5 length outside 1..512 ends in a traceback or a
    many-GB allocation."""
    if guidance_scale is not None and not (isinstance(guidance_scale, (int, float))
                                           and math.isfinite(guidance_scale)):
        raise TuneQDMError(f"--guidance_scale must be a finite number, got {guidance_scale}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise TuneQDMError(f"--num_inference_steps must be at least 1, got {num_inference_steps}")
    for flag, size in (("height", height), ("width", width)):
        if size is not None and (size < 8 or size % 8 or size > MAX_SIZE):
            raise TuneQDMError(f"--{flag} {size}: give a positive multiple of 8 up to {MAX_SIZE} (the VAE's latent "
                               "grid), or leave it out for the model's native size")
    if max_sequence_length is not None and not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise TuneQDMError(f"--max_sequence_length {max_sequence_length}: give 1 to {MAX_SEQUENCE_LENGTH} T5 tokens, "
                           "or leave it out for the pipeline's own")


GROWTH = 1e4  # a latent this many times its initial size: the sampling diverged (guidance), not the weights
MAX_SIZE = 8192  # pixels per side: 64 M pixels, far beyond every supported model's training size


@contextlib.contextmanager
def finite_sampling(pipe):
    """While sampling: a one-line ``TuneQDMError`` naming the cause as soon as the denoiser's output or the VAE's
    decoded image holds NaN or infinite values, instead of black images written with exit status 0. The cause named:
    the denoiser's input latent (what the previous step made of it: guidance times the model's output overflowed),
    its output (its weights, with a LoRA or an adapter), or the VAE."""
    model = denoiser(pipe)
    kind = "UNet" if family(pipe).attribute == "unet" else "transformer"
    loras = bool(getattr(model, "peft_config", None))
    calls = {"n": 0}

    def tensor_of(out):
        out = getattr(out, "sample", out)
        return out[0] if isinstance(out, (tuple, list)) else out

    def check_denoiser(_module, args, kwargs, out):
        calls["n"] += 1
        x = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        size = float(x.detach().abs().max()) if torch.is_tensor(x) and x.numel() else 0.0
        calls.setdefault("first", size)
        y = tensor_of(out)
        if math.isfinite(size) and not (torch.is_tensor(y) and not bool(torch.isfinite(y).all())):
            return
        if not math.isfinite(size) or size > GROWTH * max(calls["first"], 1.0):
            raise TuneQDMError(f"sampling stopped at denoising step {calls['n']}: the latent became NaN, infinite or "
                               f"{GROWTH:.0e} times its initial size (the guidance scale times the model's output "
                               "overflowed): lower --guidance_scale")
        weights = ("its weights with the LoRA: check --lora and lower --lora_scale" if loras else
                   "its weights: check the --adapter and the base")
        raise TuneQDMError(f"sampling stopped at denoising step {calls['n']}: the {kind}'s output is NaN or "
                           f"infinite ({weights})")

    def check_decoder(_module, _args, out):
        y = tensor_of(out)
        if torch.is_tensor(y) and not bool(torch.isfinite(y).all()):
            raise TuneQDMError("sampling stopped: the VAE decoded NaN or infinite pixels (its weights, or a latent "
                               "far outside its range): check the base's VAE")

    handles = [model.register_forward_hook(check_denoiser, with_kwargs=True)]
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        handles.append(decoder.register_forward_hook(check_decoder))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def generator(seed: int) -> torch.Generator:
    """A CPU generator for any integer seed: negative and huge ones wrap modulo 2**64 (as torch does for negatives)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int = 1, num_inference_steps: int = 25, guidance_scale: float | None = None,
             seed: int = 0, batch_size: int = 4, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, weight_cache_bytes: int | None = None, max_sequence_length: int | None = None,
             release_denoiser: bool = False):
    """``num_images`` PIL images of ``prompt``; image ``i`` depends only on ``seed + i``.

    ``release_denoiser``: the caller is done with the pipeline's denoiser after this call, so its weights are freed
    (moved to the meta device) when the last batch starts decoding: decoding at full resolution is a run's peak, and
    then it no longer holds the denoiser as well.

    ``guidance_scale`` None: the pipeline family's default (Flux's is its distilled guidance). ``max_sequence_length``:
    the T5 prompt length of Flux, SD3 and PixArt (None: the pipeline's default); a longer prompt is cut, with one
    warning. A quantized denoiser in ``reference`` kernels keeps up to ``weight_cache_bytes`` (default 256 MiB; 0
    rebuilds every weight at every step) of rebuilt float weights (``tuneqdm.quant.cached_weights``); in ``auto``
    kernels it keeps none unless asked (no float copies by default; see ``tuneqdm.quant.kernels``)."""
    check_sampling(guidance_scale, num_inference_steps, height, width, max_sequence_length)
    model = denoiser(pipe)
    if guidance_scale is None:
        guidance_scale = family(pipe).guidance
    if weight_cache_bytes is None:
        reference = any(getattr(m, "kernels", None) == "reference" for m in model.modules())
        weight_cache_bytes = 256 * 2**20 if reference else 0
    warn_truncation(pipe, prompt, max_sequence_length)
    extra = call_kwargs(pipe, height, width, max_sequence_length)
    images = []
    bar = progress(desc="images", total=num_images, unit="image", leave=False, disable=num_images <= batch_size)
    last_batch = [False]
    with cached_weights(model, weight_cache_bytes), sampling_kernels(model), bar, without_truncation_logs(pipe), \
            _phases(pipe, lambda: release_denoiser and last_batch[0] and _release(model)), finite_sampling(pipe):
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            last_batch[0] = start + n == num_images
            gens = [generator(seed + start + i) for i in range(n)]
            try:
                out = pipe(prompt=[prompt] * n, num_inference_steps=num_inference_steps, generator=gens,
                           output_type="pil", **guidance_kwargs(pipe, guidance_scale, n, negative_prompt), **extra)
            except (RuntimeError, TypeError, AttributeError, IndexError, KeyError, ZeroDivisionError) as e:
                if _out_of_memory(e):  # not the model's files: the size asked for
                    raise TuneQDMError(f"sampling {type(pipe).__name__} ran out of memory ({first_line(e)}): use a "
                                       "smaller --height/--width, or a device with more memory") from None
                # a configuration value of the right type that no model runs with (a padding of [], a token id
                # beyond the vocabulary) fails only here, deep in a component's forward
                raise TuneQDMError(f"sampling {type(pipe).__name__} failed ({type(e).__name__}: "
                                   f"{first_line(e)}): a configuration file of the pipeline may be damaged: download "
                                   "the model again, or restore its configs") from None
            images += out.images
            bar.update(n)
    return images


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation (torch raises RuntimeError on a CPU, its OutOfMemoryError subclass on a GPU)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "not enough memory" in text or "out of memory" in text


@contextlib.contextmanager
def _phases(pipe, release):
    """Between the phases of a pipeline call, what the last one freed goes back to the OS (``tuneqdm.memory.
    trim_heap``): the text encoders' when the denoiser's first step starts, the steps' activations when the VAE's
    decoder starts, after ``release()`` (which frees the denoiser on the last batch, when asked). Each phase then
    holds only its own memory on top of the model."""
    model, decoder = denoiser(pipe), getattr(getattr(pipe, "vae", None), "decoder", None)
    denoising = [False]

    def step(call):
        if not denoising[0]:
            denoising[0] = True
            trim_heap()

    def decoding(call):
        denoising[0] = False
        release()
        trim_heap()

    handles = [on_call(model, step)] + ([on_call(decoder, decoding)] if isinstance(decoder, torch.nn.Module) else [])
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _release(model: torch.nn.Module) -> None:
    """The denoiser's weights freed: every parameter and buffer moved to the meta device (a mapped base unmapped)."""
    if not any(t.is_meta for t in model.parameters()):
        model.to("meta")


def warn_truncation(pipe, prompt: str, max_sequence_length: int | None = None) -> None:
    """One warning when ``prompt`` is longer than what the pipeline's T5 encoder reads (diffusers' own notices, one
    per text encoder, are dropped by ``families.without_truncation_logs``)."""
    overflow = t5_overflow(pipe, prompt, max_sequence_length)
    if overflow is not None:
        tokens, limit, _ = overflow
        warnings.warn(f"the prompt is {tokens} {family(pipe).encoder_word} tokens, longer than max_sequence_length "
                      f"{limit}: the model reads "
                      f"only its first {limit} (shorten it, or raise --max_sequence_length)", TuneQDMWarning,
                      stacklevel=3)
