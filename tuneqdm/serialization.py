"""Files on disk: the quantized base (packed integers) and adapters (scales only). Safetensors + JSON, no pickle.

Quantized base folder::

    quantization.json      format version, base id, QuantConfig, the quantized layers, the fingerprint
                           (+ "splits": {conv: channel} for shortcut-split convs, see tuneqdm.quant.split,
                           + "calibration" when written by `tuneqdm quantize`)
    config.json            the diffusers model config (when the model is a diffusers model)
    quantized.safetensors  packed integers, zero-points and original scales per layer + every other tensor

Adapter folder::

    adapter_config.json    method, bits, experts, T, init, intervals, base id and base fingerprint (+ extras)
    adapter.safetensors    one tensor per quantized layer, shape (K, out + in): row k = [s_out[k] | s_in[k]]
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import TuneQDMError
from .files import FORMAT_VERSION, atomic_dir, check_version, load_tensors, read_json
from .quant.layers import QUANTIZED_CLASSES
from .quant.split import SplitConv2d, split_convs
from .tuning.config import QuantConfig
from .tuning.model import _set_submodule, attach, configure_, quant_state, quantized_layers

QUANT_MAP, QUANT_WEIGHTS = "quantization.json", "quantized.safetensors"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
_SCALE_KEYS = (".s_out.", ".s_in.")


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the frozen base: every layer's packed integers, zero-points and scales."""
    state = quant_state(model)
    if state.fingerprint is None:
        h = hashlib.sha256()
        for name, layer in sorted(quantized_layers(model).items()):
            h.update(f"{name}:{layer.bits}:{tuple(layer.weight_shape)};".encode())
            for t in (layer.qweight, layer.zero_point, layer.scale):
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
        state.fingerprint = h.hexdigest()[:16]
    return state.fingerprint


# ---- quantized base ------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, directory, base_id: str | None = None, extra: dict | None = None) -> Path:
    """Write the frozen quantized base (no trainable scales: those go to adapters). ``extra``: more JSON entries for
    quantization.json (e.g. how the weights were calibrated)."""
    state = quant_state(model)
    if base_id is not None:
        state.base_id = base_id
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not any(s in k for s in _SCALE_KEYS)
    }
    layers = {
        name: {"type": type(layer).__name__, "bits": layer.bits, "shape": list(layer.weight_shape)}
        for name, layer in quantized_layers(model).items()
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "base_id": state.base_id,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "quant_config": state.config.to_dict(),
        "fingerprint": fingerprint(model),
        "layers": layers,
    }
    if split_convs(model):  # shortcut splitting (tuneqdm.quant.split): convs stored as two quantized layers
        meta["splits"] = split_convs(model)
    meta = {**(extra or {}), **meta}  # extra entries never replace the format's own
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / QUANT_WEIGHTS, metadata={"format": "pt"})
        if hasattr(model, "save_config"):
            model.save_config(tmp)
        (tmp / QUANT_MAP).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def _build_skeleton(meta: dict, directory: Path) -> nn.Module:
    from accelerate import init_empty_weights

    module_name, _, cls_name = meta["model_class"].rpartition(".")
    if not module_name.startswith("diffusers"):
        raise TuneQDMError(
            f"{directory} holds a {meta['model_class']}: pass an empty instance with load_quantized(dir, model=...)"
        )
    cls = getattr(importlib.import_module(module_name), cls_name)
    with init_empty_weights():
        return cls.from_config(cls.load_config(directory))


def load_quantized(directory, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model without ever materialising its float weights.

    The architecture is built on the meta device (diffusers models from their config.json, others from ``model``,
    an empty float instance), its Linear/Conv2d become empty quantized layers, and the saved tensors are assigned.
    """
    directory = Path(directory)
    meta = read_json(directory / QUANT_MAP, "quantized base")
    check_version(meta, directory / QUANT_MAP)
    config = QuantConfig.from_dict(meta["quant_config"])
    tensors = load_tensors(directory / QUANT_WEIGHTS, "quantized base")
    if model is None:
        model = _build_skeleton(meta, directory)
    for name, split in (meta.get("splits") or {}).items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise TuneQDMError(f"{directory}: split conv {name!r} of quantization.json is not in the model") from None
        _set_submodule(model, name, SplitConv2d.from_conv(conv, split))
    float_classes = {q.__name__: f for f, q in QUANTIZED_CLASSES.items()}
    for name, info in meta["layers"].items():
        try:
            float_module = model.get_submodule(name)
        except AttributeError:
            raise TuneQDMError(f"{directory}: layer {name!r} of quantization.json is not in the model") from None
        qcls = QUANTIZED_CLASSES[float_classes[info["type"]]]
        _set_submodule(model, name, qcls.empty_like(float_module, info["bits"]))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not any(s in k for s in _SCALE_KEYS)]
    if missing or result.unexpected_keys:
        raise TuneQDMError(
            f"{directory} does not match its quantization.json: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {result.unexpected_keys[:3]}"
        )
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise TuneQDMError(f"{directory} lacks tensors for {still_meta[:3]}: save the quantized base again")
    model.to(device)
    attach(model, config)
    state = quant_state(model)
    state.base_id = meta.get("base_id")
    if fingerprint(model) != meta["fingerprint"]:
        raise TuneQDMError(
            f"{directory}: weights have fingerprint {fingerprint(model)} but quantization.json says "
            f"{meta['fingerprint']}: the files do not belong together, save the quantized base again"
        )
    return model


# ---- adapters --------------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The scales (and trained biases) as adapter tensors: ``{layer: (K, out + in)}``."""
    tensors = {}
    for name, layer in quantized_layers(model).items():
        rows = [p.detach().float().cpu() for p in layer.s_out]
        if layer.trains_s_in:
            rows = [torch.cat([o, i.detach().float().cpu()]) for o, i in zip(rows, layer.s_in)]
        tensors[name] = torch.stack(rows)
        if layer.bias is not None and layer.bias.requires_grad:
            tensors[f"{name}.bias"] = layer.bias.detach().float().cpu()
    return tensors


def save_adapter(model: nn.Module, directory, extra: dict | None = None) -> Path:
    """Write only the trained scales + a JSON config naming the base by id and fingerprint."""
    state = quant_state(model)
    c = state.config
    config = {
        "format_version": FORMAT_VERSION,
        "method": c.method, "bits": c.bits, "experts": c.experts, "num_train_timesteps": c.num_train_timesteps,
        "init": c.init, "intervals": [list(i) for i in c.intervals], "train_s_in": c.train_s_in,
        "train_bias": c.train_bias, "base_id": state.base_id, "base_fingerprint": fingerprint(model),
        "layout": "one tensor per layer, shape (K, out + in): row k = [s_out[k] | s_in[k]] (s_in only with MCSU)",
        **(extra or {}),
    }
    with atomic_dir(directory) as tmp:
        save_file(adapter_state(model), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(directory)


def read_adapter_config(directory) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    cfg = read_json(path, "adapter")
    check_version(cfg, path)
    return cfg


@torch.no_grad()
def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Put an adapter's scales into a quantized model (switching it to the adapter's method and experts)."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    state = quant_state(model)
    if (cfg["bits"], cfg["init"]) != (state.config.bits, state.config.init):
        raise TuneQDMError(
            f"adapter {directory} was trained on a W{cfg['bits']} {cfg['init']} base; this model is "
            f"W{state.config.bits} {state.config.init}"
        )
    if cfg["base_fingerprint"] != fingerprint(model):
        raise TuneQDMError(
            f"adapter {directory} belongs to base fingerprint {cfg['base_fingerprint']} "
            f"(base {cfg.get('base_id')!r}), but this model's fingerprint is {fingerprint(model)}"
        )
    tensors = load_tensors(directory / ADAPTER_WEIGHTS, "adapter")
    configure_(model, method=cfg["method"], experts=cfg["experts"], num_train_timesteps=cfg["num_train_timesteps"],
               intervals=tuple(tuple(i) for i in cfg["intervals"]), train_bias=cfg["train_bias"])
    layers = quantized_layers(model)
    expected = set(layers) | {f"{n}.bias" for n, l in layers.items() if l.bias is not None and cfg["train_bias"]}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise TuneQDMError(f"adapter {directory} does not match this model's layers (e.g. {odd[:3]})")
    for name, layer in layers.items():
        t = tensors[name]
        width = layer.weight_shape[0] + (layer.in_scale_features if layer.trains_s_in else 0)
        if tuple(t.shape) != (cfg["experts"], width):
            raise TuneQDMError(
                f"adapter {directory}: layer {name!r} has scales {tuple(t.shape)}, its config implies "
                f"{(cfg['experts'], width)}"
            )
        out = layer.weight_shape[0]
        for k in range(cfg["experts"]):
            layer.s_out[k].copy_(t[k, :out])
            if layer.trains_s_in:
                layer.s_in[k].copy_(t[k, out:])
        if cfg["train_bias"] and layer.bias is not None:
            layer.bias.copy_(tensors[f"{name}.bias"])
    return model
