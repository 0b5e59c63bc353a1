"""``quantize_``: turn every Linear/Conv2d of a model into a quantized layer with trainable scales, in place."""

from __future__ import annotations

import fnmatch
from dataclasses import replace

import torch
from torch import nn

from ..errors import TuneQDMError
from ..families import family_of_model
from ..quant.layers import QUANTIZED_CLASSES, QuantizedLayer
from ..quant.runtime import ROUTER
from .config import QuantConfig
from .routing import Router, install_timestep_hook

STATE_ATTR = "_tuneqdm"


class _QuantState:
    """What ``quantize_`` leaves on the model: its config, router and timestep hook."""

    def __init__(self, config: QuantConfig, router: Router, hook):
        self.config, self.router, self.hook = config, router, hook
        self.fingerprint: str | None = None  # of the frozen integers, computed on demand (see serialization)
        self.base_id: str | None = None


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``quantize_`` (or loading a quantized base) made ``model`` a tuneqdm-quantized model."""
    return getattr(model, STATE_ATTR, None) is not None


def quant_state(model: nn.Module) -> _QuantState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise TuneQDMError("this model is not quantized by tuneqdm: call tuneqdm.quantize_(model, QuantConfig(...)) first")
    return state


def layers_to_quantize(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the Linear/Conv2d modules ``config`` selects (include, then exclude; one-line error for a pattern
    that matches nothing or an empty selection): what ``quantize_`` and the PTQ and streaming builds replace. Layers
    whose float weight the model itself reads (its family's ``float_layers``) are never candidates."""
    fam = family_of_model(model)
    kept = fam.float_layers if fam is not None else ()
    candidates = [name for name, m in model.named_modules() if type(m) in QUANTIZED_CLASSES and name
                  and not any(fnmatch.fnmatchcase(name, p) for p in kept)]
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for p in patterns or ():
            if not any(fnmatch.fnmatchcase(n, p) for n in candidates):
                raise TuneQDMError(f"{kind} pattern {p!r} matches no Linear or Conv2d module of the model")
    selected = [n for n in candidates if config.include is None or any(fnmatch.fnmatchcase(n, p) for p in config.include)]
    selected = [n for n in selected if not any(fnmatch.fnmatchcase(n, p) for p in config.exclude or ())]
    if not selected:
        raise TuneQDMError("no Linear or Conv2d module left to quantize: check include/exclude")
    return selected


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (torch's own ``Module.set_submodule`` needs torch 2.5)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def empty_quantized_(model: nn.Module, config: QuantConfig) -> dict[str, QuantizedLayer]:
    """Replace the layers ``config`` selects by empty quantized twins on the meta device, in place; the new layers
    by name. Fill each (``set_packed`` or ``load_state_dict(..., assign=True)``), then ``attach(model, config)``:
    the way to a quantized model that never holds a float weight (streaming, loading, synthetic benchmarks)."""
    layers = {}
    for name in layers_to_quantize(model, config):
        float_module = model.get_submodule(name)
        layers[name] = QUANTIZED_CLASSES[type(float_module)].empty_like(float_module, config.bits, device="meta")
        replace_module(model, name, layers[name])
    return layers


def quantize_(model: nn.Module, config: QuantConfig | None = None, **kwargs) -> nn.Module:
    """Quantize ``model`` in place; afterwards its only trainable parameters are the scales.

    Each selected Linear/Conv2d is replaced by its quantized twin one at a time (its float weight is freed right
    after), the rest of the model is frozen, and a forward pre-hook routes each sample to its expert by the
    ``timestep`` argument when ``model.forward`` has one (diffusers UNets and transformers do).
    """
    if is_quantized(model):
        raise TuneQDMError("model is already quantized; use tuneqdm.configure_ to change its method or experts")
    config = replace(config, **kwargs) if config is not None else QuantConfig(**kwargs)
    for name in layers_to_quantize(model, config):
        float_module = model.get_submodule(name)
        qcls = QUANTIZED_CLASSES[type(float_module)]
        replace_module(model, name, qcls.from_module(float_module, config.bits, config.init))
        del float_module
    attach(model, config)
    return model


def attach(model: nn.Module, config: QuantConfig) -> None:
    """Freeze the model, create the scale sets of ``config`` and install routing (used by quantize_ and loading)."""
    router = Router(config)
    setattr(model, STATE_ATTR, _QuantState(config, router, install_timestep_hook(model, router)))
    configure_(model, config)


def configure_(model: nn.Module, config: QuantConfig | None = None, **kwargs) -> nn.Module:
    """Switch a quantized model to another method/experts (fresh scales from the base); bits and init stay."""
    state = quant_state(model)
    config = replace(config or state.config, **kwargs)
    if (config.bits, config.init) != (state.config.bits, state.config.init):
        raise TuneQDMError(
            f"configure_ cannot change bits/init (model is W{state.config.bits} {state.config.init}): quantize again"
        )
    model.requires_grad_(False)
    for layer in quantized_layers(model).values():
        layer.configure_scales(config.experts, config.train_s_in, config.train_bias)
        layer.runtime.install(ROUTER, state.router)
    state.router.config = config
    state.router.route = None
    state.config = config
    return model


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters tuneqdm adds (all scale sets, plus biases when ``train_bias``)."""
    return [p for p in model.parameters() if p.requires_grad]


def scale_param_groups(model: nn.Module, lr: float = 2e-3) -> list[dict]:
    """AdamW parameter groups with a relative learning rate: each layer's ``s_out`` moves by about
    ``lr x RMS(its original scales)`` per step and every ``s_in`` (which starts at 1) by ``lr``. One absolute rate
    cannot fit all layers: the original scales span four orders of magnitude across layers and bit widths. No weight
    decay: decaying a scale shrinks the weight."""
    groups, s_in, rest = [], [], []
    layer_params = set()
    for layer in quantized_layers(model).values():
        rms = float(layer.scale.float().pow(2).mean().sqrt())
        s_out = [p for p in layer.s_out if p.requires_grad]
        if s_out:
            groups.append({"params": s_out, "lr": lr * (rms if rms > 0 else 1.0), "weight_decay": 0.0})
        s_in += [p for p in layer.s_in if p.requires_grad]
        layer_params.update(id(p) for p in list(layer.s_out) + list(layer.s_in))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in layer_params]
    if s_in or rest:
        groups.append({"params": s_in + rest, "lr": lr, "weight_decay": 0.0})
    return groups


def set_timesteps(model: nn.Module, t) -> None:
    """Route the next forward calls by timesteps ``t`` (for models whose forward has no ``timestep`` argument)."""
    quant_state(model).router.route_timesteps(t)


def set_expert(model: nn.Module, expert: int, batch_size: int = 1) -> None:
    """Run every sample of the next calls with one expert (−1: the original quantization scales)."""
    quant_state(model).router.set_experts([expert] * batch_size)


@torch.no_grad()
def dequantize_(model: nn.Module, expert: int = 0) -> nn.Module:
    """Replace every quantized layer by a float layer holding the weights of one expert (export/merge)."""
    state = quant_state(model)
    if not -1 <= expert < state.config.experts:
        raise TuneQDMError(f"expert {expert} does not exist: the model has experts 0..{state.config.experts - 1}")
    for name, layer in quantized_layers(model).items():
        replace_module(model, name, layer.to_float(expert))
    if state.hook is not None:
        state.hook.remove()
    delattr(model, STATE_ATTR)
    return model


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of frozen quantized weight storage, number of quantized weight elements)."""
    layers = quantized_layers(model).values()
    return sum(l.weight_bytes for l in layers), sum(l.weight_shape.numel() for l in layers)
