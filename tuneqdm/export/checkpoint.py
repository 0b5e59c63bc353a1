"""The personalized denoiser as a normal diffusers model folder: dequantized, the tuned scales merged in.

Every quantized layer becomes the float layer of ``Σ_k w_k Ŵ_k``: one expert (``{k: 1}``; one-expert methods have
only expert 0), the dequantized base (``{BASE: 1}``: the quantized base as a float model, onto which an exported
LoRA gives exactly ``Ŵ_tuned`` up to its rank), or, by default for K-expert and S1 adapters, the time-uniform blend
of ``tuneqdm.export.deltas.route_weights``: each expert weighted by the fraction of the timesteps it serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, atomic_dir
from ..tuning.model import dequantize_, quantized_layers, replace_module
from ..tuning.routing import BASE
from .deltas import route_weights
from .lora import check_dtype

CHECKPOINT_JSON = "tuneqdm_export.json"


def expert_weights(cfg: dict, expert: str | int | None) -> dict[int, float]:
    """{route: weight} of the merged weights: ``None`` (default: expert 0 of a one-expert adapter, else the blend),
    ``"blend"``, ``"base"`` or an expert index (a one-line error for one the adapter does not have)."""
    weights = route_weights(cfg)
    if expert is None:
        return {0: 1.0} if list(weights) == [0] else weights
    if expert == "blend":
        return weights
    if expert == "base":
        return {BASE: 1.0}
    try:
        k = int(expert)
    except (TypeError, ValueError):
        k = None
    if k is None or not 0 <= k < cfg["experts"]:
        raise TuneQDMError(f"--expert {expert}: this adapter has experts 0..{cfg['experts'] - 1}; give one of them, "
                           "'blend' (every expert, weighted by the timesteps it serves) or 'base'")
    return {k: 1.0}


@torch.no_grad()
def merge_(model, weights: dict[int, float]) -> torch.nn.Module:
    """Replace every quantized layer of ``model`` by a float layer holding ``Σ w_k Ŵ_k``, one layer at a time, and
    remove tuneqdm's routing: ``model`` becomes a plain float model of its class."""
    for name, layer in quantized_layers(model).items():
        routes = list(weights)
        float_layer = layer.to_float(routes[0])
        if len(routes) > 1 or weights[routes[0]] != 1.0:
            merged = sum(w * layer.dequantized_weight(k) for k, w in weights.items())
            float_layer.weight.copy_(merged)
        replace_module(model, name, float_layer)
    return dequantize_(model)  # no quantized layer is left: this removes the routing hook and state


def export_checkpoint(model, out, cfg: dict, expert: str | int | None = None, dtype: str = "fp32",
                      single_file: bool = False, extra: dict | None = None) -> dict:
    """Merge an adapter's scales into its quantized denoiser ``model`` (in place: it becomes a float model) and write
    it as a diffusers model folder ``out`` (``config.json`` + safetensors; ``from_pretrained(out)`` loads it), with
    ``single_file``: also the single ``.safetensors`` in the original layout ``from_single_file`` reads."""
    weights = expert_weights(cfg, expert)
    torch_dtype = check_dtype(dtype)
    if single_file:
        from .single_file import check_single_file

        check_single_file(model)
    if quantized_layers(model):
        merge_(model, weights)
    if any(p.dtype != torch_dtype for p in model.parameters()):
        torch.nn.Module.to(model, torch_dtype)  # (ModelMixin.to warns about modules to keep in float32: none here)
    record = {"format_version": FORMAT_VERSION, "kind": "checkpoint", "method": cfg["method"], "bits": cfg["bits"],
              "experts": cfg["experts"], "base_id": cfg.get("base_id"), "base_fingerprint": cfg["base_fingerprint"],
              "weights": {("base" if k == BASE else str(k)): w for k, w in weights.items()}, "dtype": dtype,
              **(extra or {})}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if single_file:
            from .single_file import write_single_file

            record["single_file"] = write_single_file(model, tmp)
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(record, indent=2))
    return record


def saved_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
