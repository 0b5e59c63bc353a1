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

Both JSON files hold ``"digests"``: the SHA-256 of every tensor and of the JSON settings the loader builds the model
from (``tuneqdm.files.digests``). Loading checks the schema, the digests, every tensor's dtype and shape against the
settings, and that every scale is finite and non-zero, before anything is allocated: a damaged file ends in one
``TuneQDMError`` line, never in a traceback or a silently different model. Files written before digests existed
load without that check (``tuneqdm.files.check_digests`` says why); docs/benchmarks/fuzz_files.md has the counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import TuneQDMError
from .files import (FORMAT_VERSION, atomic_dir, check_digests, check_fields, check_version, digests, first_line,
                    load_tensors, read_json)
from .quant.layers import QUANTIZED_CLASSES
from .quant.split import SplitConv2d, split_convs
from .tuning.config import METHODS, QuantConfig
from .tuning.model import attach, configure_, quant_state, quantized_layers, replace_module
from .tuning.streaming import diffusers_model_class, empty_model, own_float_storage

QUANT_MAP, QUANT_WEIGHTS = "quantization.json", "quantized.safetensors"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
MODEL_CONFIG = "config.json"
# what `tuneqdm quantize` writes into its folder, and the activation parameters calibrated beside it later
QUANTIZED_BASE_FILES = (QUANT_MAP, QUANT_WEIGHTS, MODEL_CONFIG, "activations-a*-k*")
_SCALE_KEYS = (".s_out.", ".s_in.")
_SAVE_BASE, _SAVE_ADAPTER = "save the quantized base again", "save the adapter again (or train it again)"


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
_BASE_FIELDS = {"format_version": int, "base_id?": (str, type(None)), "model_class": str, "quant_config": dict,
                "fingerprint": str, "layers": dict, "splits?": (dict, type(None)), "digests?": dict}
_BASE_SETTINGS = ("base_id", "model_class", "quant_config", "fingerprint", "layers", "splits")
_LAYER_FIELDS = {"type": str, "bits": int, "shape": list}


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
        parts = {QUANT_MAP: {k: meta.get(k) for k in _BASE_SETTINGS}}
        if hasattr(model, "save_config"):
            model.save_config(tmp)
            parts[MODEL_CONFIG] = json.loads((tmp / MODEL_CONFIG).read_text())
        meta["digests"] = digests(tensors, parts)
        (tmp / QUANT_MAP).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def _model_class(name: str, directory: Path) -> type:
    """The diffusers model class ``name`` (``diffusers.<...>.Class``) names, by exact name among diffusers' exports."""
    module, _, cls_name = name.rpartition(".")
    cls = diffusers_model_class(cls_name) if module == "diffusers" or module.startswith("diffusers.") else None
    if cls is None:
        raise TuneQDMError(f"{directory} holds a {name}: pass an empty instance with load_quantized(dir, model=...)")
    return cls


def _read_base_meta(directory: Path) -> tuple[dict, QuantConfig]:
    """quantization.json checked: schema, quant_config, and every layer's entry (its bits equal quant_config's)."""
    path = directory / QUANT_MAP
    meta = read_json(path, "quantized base")
    check_version(meta, path)
    check_fields(meta, _BASE_FIELDS, path, _SAVE_BASE)
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
    except (TuneQDMError, TypeError, ValueError) as e:
        raise TuneQDMError(f"{path}: invalid quant_config ({first_line(e)}): {_SAVE_BASE}") from None
    if config.experts > config.num_train_timesteps:  # each expert needs a timestep; also bounds what attach allocates
        raise TuneQDMError(f"{path}: quant_config has {config.experts} experts for {config.num_train_timesteps} "
                           f"timesteps: {_SAVE_BASE}")
    for name, info in meta["layers"].items():
        check_fields(info, _LAYER_FIELDS, f"{path} (layer {name!r})", _SAVE_BASE)
        if info["bits"] != config.bits:
            raise TuneQDMError(f"{path}: layer {name!r} is {info['bits']}-bit but quant_config.bits is {config.bits}: "
                               f"{_SAVE_BASE}")
    for name, split in (meta.get("splits") or {}).items():
        if not isinstance(split, int) or isinstance(split, bool):
            raise TuneQDMError(f"{path}: split of {name!r} must be an integer channel: {_SAVE_BASE}")
    return meta, config


def _quantize_skeleton(model: nn.Module, meta: dict, directory: Path) -> None:
    """Replace the layers quantization.json names by empty quantized layers (on the meta device)."""
    for name, split in (meta.get("splits") or {}).items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise TuneQDMError(f"{directory}: split conv {name!r} of quantization.json is not in the model") from None
        if type(conv) is not nn.Conv2d:
            raise TuneQDMError(f"{directory}: split conv {name!r} of quantization.json is a {type(conv).__name__}")
        replace_module(model, name, SplitConv2d.from_conv(conv, split))
    for name, info in meta["layers"].items():
        try:
            float_module = model.get_submodule(name)
        except AttributeError:
            raise TuneQDMError(f"{directory}: layer {name!r} of quantization.json is not in the model") from None
        qcls = QUANTIZED_CLASSES.get(type(float_module))
        if qcls is None or qcls.__name__ != info["type"]:
            raise TuneQDMError(f"{directory}: layer {name!r} is a {type(float_module).__name__}, quantization.json "
                               f"says {info['type']!r}: {_SAVE_BASE}")
        layer = qcls.empty_like(float_module, info["bits"])
        if list(layer.weight_shape) != info["shape"]:
            raise TuneQDMError(f"{directory}: layer {name!r} has weight shape {list(layer.weight_shape)}, "
                               f"quantization.json says {info['shape']}: {_SAVE_BASE}")
        replace_module(model, name, layer)


def _check_base_tensors(model: nn.Module, tensors: dict, directory: Path) -> None:
    """Every tensor the file holds has the name, shape and dtype the model expects (checked before assigning them),
    every float tensor is finite and every quantization scale positive."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TuneQDMError(
            f"{directory} does not match its quantization.json: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )
    for name, want in expected.items():
        t = tensors[name]
        same_kind = t.dtype == want.dtype or (t.dtype.is_floating_point and want.dtype.is_floating_point
                                              and not name.endswith((".scale", ".zero_point", ".qweight")))
        if t.shape != want.shape or not same_kind:
            raise TuneQDMError(f"{directory}: tensor {name!r} is {t.dtype} {list(t.shape)}, the model expects "
                               f"{want.dtype} {list(want.shape)}: {_SAVE_BASE}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise TuneQDMError(f"{directory}: tensor {name!r} holds NaN or infinite values: {_SAVE_BASE}")
    for name in quantized_layers(model):
        if not bool((tensors[f"{name}.scale"] > 0).all()):
            raise TuneQDMError(f"{directory}: layer {name!r} has quantization scales <= 0: {_SAVE_BASE}")


def load_quantized(directory, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model without ever materialising its float weights.

    The architecture is built on the meta device (diffusers models from their config.json, the class looked up among
    diffusers' exported models by name; others from ``model``, an empty float instance), its Linear/Conv2d become
    empty quantized layers, and the saved tensors are assigned once their digests, names, shapes and dtypes check out.
    """
    directory = Path(directory)
    meta, config = _read_base_meta(directory)
    cls = _model_class(meta["model_class"], directory) if model is None else None
    tensors = load_tensors(directory / QUANT_WEIGHTS, "quantized base")
    recorded = meta.get("digests")
    parts = {QUANT_MAP: {k: meta.get(k) for k in _BASE_SETTINGS}}
    model_config = None
    if model is None or (isinstance(recorded, dict) and MODEL_CONFIG in recorded):
        model_config = parts[MODEL_CONFIG] = read_json(directory / MODEL_CONFIG, "quantized base")
    check_digests(recorded, tensors, directory, _SAVE_BASE, parts)
    if model is None:
        model = empty_model(cls, model_config, directory / MODEL_CONFIG, _SAVE_BASE)
    _quantize_skeleton(model, meta, directory)
    _check_base_tensors(model, tensors, directory)
    model.load_state_dict(tensors, strict=False, assign=True)
    own_float_storage(model)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise TuneQDMError(f"{directory} lacks tensors for {still_meta[:3]}: {_SAVE_BASE}")
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
_ADAPTER_FIELDS = {"format_version": int, "method": str, "bits": int, "experts": int, "num_train_timesteps": int,
                   "init": str, "intervals": list, "train_s_in": bool, "train_bias": bool,
                   "base_id?": (str, type(None)), "base_fingerprint": str, "quantized_base?": (str, type(None)),
                   "digests?": dict}
_ADAPTER_SETTINGS = ("method", "bits", "experts", "num_train_timesteps", "init", "intervals", "train_s_in",
                     "train_bias", "base_id", "base_fingerprint")


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
    """Write only the trained scales + a JSON config naming the base by id and fingerprint; scales that are not
    finite or are zero are refused (the loader would refuse them)."""
    state = quant_state(model)
    c = state.config
    config = {
        **(extra or {}),  # extra entries never replace the format's own
        "format_version": FORMAT_VERSION,
        "method": c.method, "bits": c.bits, "experts": c.experts, "num_train_timesteps": c.num_train_timesteps,
        "init": c.init, "intervals": [list(i) for i in c.intervals], "train_s_in": c.train_s_in,
        "train_bias": c.train_bias, "base_id": state.base_id, "base_fingerprint": fingerprint(model),
        "layout": "one tensor per layer, shape (K, out + in): row k = [s_out[k] | s_in[k]] (s_in only with MCSU)",
    }
    tensors = adapter_state(model)
    _check_scales(tensors, "cannot save the adapter", "the training diverged: lower the learning rate")
    config["digests"] = digests(tensors, {ADAPTER_CONFIG: {k: config.get(k) for k in _ADAPTER_SETTINGS}})
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(directory)


def _check_scales(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Scales finite and non-zero, trained biases finite; one line naming the first layer that is not.

    A negative trained scale is accepted: training moves a small scale across zero legitimately (``tuneqdm demo``'s
    absolute learning rate does it within 4 steps) and it only flips the sign of that channel. Zero is refused: the
    layer's backward divides by its scales, so such an adapter could be neither trained further nor resumed.
    """
    for name, t in tensors.items():
        bias = name.endswith(".bias") and name[: -len(".bias")] in tensors
        if not bool(torch.isfinite(t).all()):
            raise TuneQDMError(f"{where}: layer {name!r} has NaN or infinite {'biases' if bias else 'scales'}: {fix}")
        if not bias and bool((t == 0).any()):
            raise TuneQDMError(f"{where}: layer {name!r} has scales equal to 0: {fix}")


def _adapter_settings(cfg: dict, path: Path) -> None:
    """The settings of adapter_config.json are of the right types and consistent with each other."""
    check_fields(cfg, _ADAPTER_FIELDS, path, _SAVE_ADAPTER)
    if not all(isinstance(i, list) and len(i) == 2 and all(type(v) is int for v in i) for i in cfg["intervals"]):
        raise TuneQDMError(f"{path}: 'intervals' must be a list of [start, end] integer pairs: {_SAVE_ADAPTER}")
    try:
        qc = QuantConfig(bits=cfg["bits"], method=cfg["method"], experts=cfg["experts"], init=cfg["init"],
                         intervals=tuple(tuple(i) for i in cfg["intervals"]), train_bias=cfg["train_bias"],
                         num_train_timesteps=cfg["num_train_timesteps"])
    except TuneQDMError as e:
        raise TuneQDMError(f"{path}: {e}") from None
    if qc.train_s_in != cfg["train_s_in"]:
        raise TuneQDMError(f"{path}: 'train_s_in' is {cfg['train_s_in']}, method {qc.method!r} implies "
                           f"{qc.train_s_in}: {_SAVE_ADAPTER}")


def read_adapter(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter's config and tensors, checked against each other before any model is touched: the schema, the
    digests, every tensor float32 with one row per expert, every scale finite and non-zero."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    cfg = read_json(path, "adapter")
    check_version(cfg, path)
    _adapter_settings(cfg, path)
    tensors = load_tensors(directory / ADAPTER_WEIGHTS, "adapter")
    check_digests(cfg.get("digests"), tensors, directory, _SAVE_ADAPTER,
                  {ADAPTER_CONFIG: {k: cfg.get(k) for k in _ADAPTER_SETTINGS}})
    for name, t in tensors.items():
        bias = name.endswith(".bias") and name[: -len(".bias")] in tensors
        if t.dtype != torch.float32:
            raise TuneQDMError(f"adapter {directory}: tensor {name!r} is {t.dtype}, adapters hold float32: "
                               f"{_SAVE_ADAPTER}")
        want = "one bias per output channel" if bias else f"one row per expert ({cfg['experts']})"
        if (t.dim() != 1) if bias else (t.dim() != 2 or t.shape[0] != cfg["experts"]):
            raise TuneQDMError(f"adapter {directory}: tensor {name!r} has shape {tuple(t.shape)}, its config implies "
                               f"{want}: {_SAVE_ADAPTER}")
    _check_scales(tensors, f"adapter {directory}", _SAVE_ADAPTER)
    return cfg, tensors


def read_adapter_config(directory) -> dict:
    """The checked adapter_config.json of an adapter (its tensors are checked too: see ``read_adapter``)."""
    return read_adapter(directory)[0]


def check_timesteps(cfg: dict, num_train_timesteps: int | None, directory) -> None:
    """An adapter routes timesteps to experts by the T it was trained with: another T re-routes every step."""
    if num_train_timesteps is not None and cfg["num_train_timesteps"] != num_train_timesteps:
        raise TuneQDMError(f"adapter {directory} was trained with num_train_timesteps {cfg['num_train_timesteps']}, "
                           f"but this scheduler uses {num_train_timesteps}: use the adapter's base scheduler")


@torch.no_grad()
def load_adapter(model: nn.Module, directory, num_train_timesteps: int | None = None) -> nn.Module:
    """Put an adapter's scales into a quantized model (switching it to the adapter's method and experts).

    ``num_train_timesteps``: T of the scheduler that will drive the model (``load_pipeline`` passes its scheduler's),
    refused when it differs from the adapter's. Everything is checked before the model changes.
    """
    directory = Path(directory)
    cfg, tensors = read_adapter(directory)
    check_timesteps(cfg, num_train_timesteps, directory)
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
    layers = quantized_layers(model)
    expected = set(layers) | {f"{n}.bias" for n, q in layers.items() if q.bias is not None and cfg["train_bias"]}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise TuneQDMError(f"adapter {directory} does not match this model's layers (e.g. {odd[:3]})")
    train_s_in = METHODS[cfg["method"]].train_s_in
    for name, layer in layers.items():
        width = layer.weight_shape[0] + (layer.in_scale_features if train_s_in else 0)
        if tuple(tensors[name].shape) != (cfg["experts"], width):
            raise TuneQDMError(
                f"adapter {directory}: layer {name!r} has scales {tuple(tensors[name].shape)}, its config implies "
                f"{(cfg['experts'], width)}"
            )
        if cfg["train_bias"] and layer.bias is not None and tensors[f"{name}.bias"].shape != layer.bias.shape:
            raise TuneQDMError(f"adapter {directory}: layer {name!r} has {tuple(tensors[f'{name}.bias'].shape)} "
                               f"biases, the model {tuple(layer.bias.shape)}")
    configure_(model, method=cfg["method"], experts=cfg["experts"], num_train_timesteps=cfg["num_train_timesteps"],
               intervals=tuple(tuple(i) for i in cfg["intervals"]), train_bias=cfg["train_bias"])
    for name, layer in layers.items():
        t, out = tensors[name], layer.weight_shape[0]
        for k in range(cfg["experts"]):
            layer.s_out[k].copy_(t[k, :out])
            if layer.trains_s_in:
                layer.s_in[k].copy_(t[k, out:])
        if cfg["train_bias"] and layer.bias is not None:
            layer.bias.copy_(tensors[f"{name}.bias"])
    return model
