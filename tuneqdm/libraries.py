"""Calls into diffusers and transformers made quiet (no per-component bars) and version-proof (the dtype argument).

One home below both ``tuneqdm.sampling`` and the embedded toy pipeline (``tuneqdm.toy.pipeline``), which load
pipelines the same way. diffusers and transformers are imported on use: they are slow to import and ``tuneqdm
--help`` needs neither.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from importlib.metadata import version

from packaging.version import Version
from torch import nn


def quiet_loading() -> None:
    """No per-component loading bars (they are noise next to tuneqdm's own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


DTYPE_RENAMED_IN = "0.40.0"  # diffusers' from_pretrained takes ``dtype`` from here on, ``torch_dtype`` before


def dtype_kwarg(dtype, diffusers_version: str | None = None) -> dict:
    """``dtype=`` for diffusers that renamed ``torch_dtype`` (0.40+, which warn on the old name), ``torch_dtype=``
    for older ones (which do not know ``dtype``): the installed version, read from its package metadata."""
    installed = Version(diffusers_version or version("diffusers"))
    return {"dtype": dtype} if installed >= Version(DTYPE_RENAMED_IN) else {"torch_dtype": dtype}


def load_lora_weights(pipe, source, adapter_name: str | None = None) -> None:
    """``pipe.load_lora_weights(source, adapter_name=...)``, also where a denoiser's Linear layers hold no float
    weight (tuneqdm's quantized ones): diffusers' Flux loader first reads ``module.weight.data`` of every Linear to
    widen layers for Flux Control LoRAs, and fails on those. There the same public steps run without the widening:
    ``lora_state_dict`` (every LoRA format the loader reads), ``load_lora_into_transformer`` (PEFT wraps the
    quantized Linear as on any other model), ``load_lora_into_text_encoder``. A LoRA that needs the widening (a
    Control LoRA: norm layers, wider input) cannot apply to packed integers and raises ``ValueError``."""
    with _without_notices("diffusers", "No LoRA keys associated"), warnings.catch_warnings():
        # PEFT's multi-line notice that the config it inferred names more modules than the file holds (it does for
        # diffusers' own LoRAs): not tuneqdm's user's concern
        warnings.filterwarnings("ignore", message="While injecting the PEFT adapters", category=RuntimeWarning)
        _load_lora_weights(pipe, source, adapter_name)


def _load_lora_weights(pipe, source, adapter_name: str | None) -> None:
    from diffusers.loaders import FluxLoraLoaderMixin

    transformer = getattr(pipe, "transformer", None)
    weightless = transformer is not None and any(
        isinstance(m, nn.Linear) and m.weight is None for m in transformer.modules())
    if not (isinstance(pipe, FluxLoraLoaderMixin) and weightless):
        pipe.load_lora_weights(source, adapter_name=adapter_name)
        return
    state, alphas, metadata = pipe.lora_state_dict(source, return_alphas=True, return_lora_metadata=True)
    prefix = f"{pipe.transformer_name}."
    if any(k.startswith(prefix) and "lora" not in k for k in state):
        raise ValueError("this LoRA also replaces norm layers (a Flux Control LoRA), which a quantized transformer "
                         "cannot take")
    if not any("lora" in k for k in state):
        raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
    layers = dict(transformer.named_modules())
    for key, value in state.items():  # a LoRA for a wider layer (Control LoRA) would be widened, not loaded
        if key.startswith(prefix) and key.endswith(".lora_A.weight"):
            layer = layers.get(key[len(prefix):-len(".lora_A.weight")])
            if isinstance(layer, nn.Linear) and value.shape[-1] != layer.in_features:
                raise ValueError(f"{key} takes {value.shape[-1]} inputs, the layer {layer.in_features}: a Flux Control "
                                 "LoRA widens layers, which a quantized transformer cannot take")
    pipe.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                    adapter_name=adapter_name, metadata=metadata)
    if any(k.startswith(f"{pipe.text_encoder_name}.") for k in state):
        pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=pipe.text_encoder,
                                         prefix=pipe.text_encoder_name, lora_scale=pipe.lora_scale,
                                         adapter_name=adapter_name, metadata=metadata)


@contextlib.contextmanager
def _without_notices(library: str, start: str):
    """Drop the log records of ``library`` that begin with ``start``: diffusers' multi-line notice that a LoRA has no
    text-encoder part (tuneqdm's LoRAs never do) is noise between tuneqdm's one-line messages."""
    def keep(record) -> bool:
        return not str(record.msg).startswith(start)

    logger = logging.getLogger(library)
    for handler in logger.handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in logger.handlers:
            handler.removeFilter(keep)
