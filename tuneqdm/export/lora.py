"""A scale adapter as LoRA files that diffusers, kohya-style tools (ComfyUI, A1111/Forge) and PEFT load.

Every quantized layer's personalization delta ``Ŵ_tuned − Ŵ_base`` (``tuneqdm.export.deltas``) becomes a LoRA pair
by truncated SVD, one layer at a time: no more than one layer's float delta is ever held. Linear layers give
``lora_A`` (r, in) / ``lora_B`` (out, r); a Conv2d gives the LoCon pair, ``lora_A`` a conv of the layer's kernel,
stride and padding into r channels and ``lora_B`` a 1x1 conv (PEFT's own conv LoRA; kohya's ``lora_down`` /
``lora_up``).

Formats:

- ``diffusers``: ``pytorch_lora_weights.safetensors`` with PEFT keys (``unet.<module>.lora_A.weight``, or
  ``transformer.`` for a DiT), no alphas (scale 1 at every rank): ``pipe.load_lora_weights(OUT)`` loads it. ComfyUI
  reads this layout for FLUX (``transformer.`` keys), not for SD UNets.
- ``kohya``: diffusers' ``convert_state_dict_to_kohya`` of the same tensors (``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` = the rank): what ComfyUI and A1111/Forge read for SD 1.x/2.x and SDXL UNets, and
  diffusers' ``load_lora_weights`` too. UNet pipelines only: kohya keys name a UNet's modules.

One-expert adapters (peqa, mcsu) give one file. K-expert adapters (tuneqdm, tas) and S1 give one file per expert in
``experts/<k>/`` plus a schedule (``tuneqdm.export.schedule``) and, at the top, the merged LoRA of the time-uniform
blend ``Σ w_k Ŵ_k`` for tools that cannot switch per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, atomic_dir, load_tensors
from ..quant.layers import QConv2d, QuantizedLayer
from ..results import LORA_WEIGHTS
from ..tuning.model import quantized_layers
from .deltas import check_rank_choice, full_rank, layer_delta, low_rank, route_weights, tuned_routes

FORMATS = ("diffusers", "kohya")
EXPORT_JSON = "lora_export.json"
EXPERTS_DIR = "experts"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_ENERGY = 0.9
# kohya files scale each pair by alpha / rank. Every pair gets the same alpha, its lora_up multiplied by rank / alpha
# so that the product is the delta: diffusers' kohya reader drops some modules' alphas (mid-block attention) and a
# uniform alpha leaves nothing to drop; ComfyUI and A1111 read alpha / rank the same way.
KOHYA_ALPHA = 1.0  # the default rank rule: per layer, the smallest rank that keeps 90 % of the delta's energy


def check_format(fmt: str, component: str) -> None:
    """One line for a format tuneqdm does not write, or kohya for a transformer."""
    if fmt not in FORMATS:
        raise TuneQDMError(f"unknown LoRA format {fmt!r}: choose diffusers or kohya")
    if fmt == "kohya" and component != "unet":
        raise TuneQDMError("kohya LoRA keys name UNet modules (SD 1.x/2.x, SDXL); this is a transformer: use "
                           "--format diffusers, whose transformer.* keys ComfyUI and diffusers both read")


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TuneQDMError(f"unknown --dtype {name!r}: choose fp32, fp16 or bf16")
    return DTYPES[name]


def check_layers(layers: dict[str, QuantizedLayer], rank: int | None, cfg: dict) -> None:
    """Refuse, before any work, a rank no layer can hold and an adapter whose trained biases a LoRA cannot hold."""
    if cfg.get("train_bias"):
        raise TuneQDMError("this adapter trained biases, which a LoRA cannot hold: export it with --to checkpoint")
    largest = max(full_rank(layer) for layer in layers.values())
    if rank is not None and rank > largest:
        raise TuneQDMError(f"--rank {rank} is larger than every layer of this model (the largest holds rank "
                           f"{largest}): give --rank {largest} or less (each layer is capped at its own full rank)")


def products(cfg: dict) -> dict[str, dict[int, float]]:
    """{file, relative to the output folder: {route: weight}} of an adapter: one file for a one-expert adapter; for
    K experts or S1, one file per expert plus the merged blend at the top."""
    weights, tuned = route_weights(cfg), tuned_routes(cfg)
    if list(weights) == [0]:
        return {LORA_WEIGHTS: {0: 1.0}}
    files = {LORA_WEIGHTS: weights}
    files.update({f"{EXPERTS_DIR}/{k}/{LORA_WEIGHTS}": {k: 1.0} for k in tuned})
    return files


def _pair(layer: QuantizedLayer, factors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) weights of one layer in PEFT's shapes."""
    down, up = factors.down, factors.up
    if isinstance(layer, QConv2d):
        down = down.reshape(factors.rank, *layer.weight_shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return down.to("cpu", dtype).contiguous(), up.to("cpu", dtype).contiguous()  # (the SVD may run on a GPU)


def factorize_layers(model, files: dict[str, dict[int, float]], rank: int | None, energy: float | None,
                     dtype: torch.dtype, warn=None) -> tuple[dict, dict]:
    """({file: {module: (lora_A, lora_B)}}, {file: {module: {"rank", "kept", "energy"}}}): every layer's delta for
    every file, factorized one at a time (a layer's float delta is freed before the next is built)."""
    pairs = {f: {} for f in files}
    stats = {f: {} for f in files}
    for name, layer in quantized_layers(model).items():
        if isinstance(layer, QConv2d) and layer.groups > 1:
            if warn is not None:
                warn(f"layer {name} is a grouped conv, which LoRA formats do not hold: its delta is left out")
            continue
        for file, weights in files.items():
            factors = low_rank(layer_delta(layer, weights), rank=rank, energy=energy)  # the delta is freed here
            if factors is None:
                continue
            pairs[file][name] = _pair(layer, factors, dtype)
            stats[file][name] = {"rank": factors.rank, "kept": factors.kept, "energy": factors.energy}
    return pairs, stats


def state_dict(pairs: dict, component: str, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of one LoRA file in ``fmt`` (PEFT keys prefixed by the denoiser's component name; kohya through
    diffusers' own converter)."""
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"{component}.{name}.lora_A.weight"] = down
        tensors[f"{component}.{name}.lora_B.weight"] = up
    return to_format(tensors, fmt)


def to_format(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors (scale 1) in ``fmt``: as they are for diffusers, through diffusers' own converter
    for kohya (then one alpha for every pair)."""
    if fmt == "kohya":
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

        tensors = convert_state_dict_to_kohya({_kohya_module(k): v for k, v in tensors.items()})
        for key in [k for k in tensors if k.endswith(".alpha")]:  # one alpha for all: see KOHYA_ALPHA
            up = key[: -len(".alpha")] + ".lora_up.weight"
            tensors[up] = (tensors[up].float() * (int(tensors[key]) / KOHYA_ALPHA)).to(tensors[up].dtype)
            tensors[key] = torch.tensor(KOHYA_ALPHA)
    return tensors


def summary(stats: dict) -> dict:
    """Ranks per layer, the fraction of the delta's energy kept per layer and over the whole model."""
    total = sum(s["energy"] for s in stats.values())
    kept = sum(s["energy"] * s["kept"] for s in stats.values())
    return {"energy_kept": kept / total if total else 1.0,
            "ranks": {n: s["rank"] for n, s in stats.items()},
            "layer_energy_kept": {n: round(s["kept"], 6) for n, s in stats.items()}}


def write_lora_files(out: Path, files: dict, pairs: dict, stats: dict, component: str, fmt: str, record: dict) -> dict:
    """Write every LoRA file and ``lora_export.json`` into ``out`` as one unit (``atomic_dir``); returns the record
    with each file's summary and byte count."""
    from safetensors.torch import save_file

    record = {**record, "files": {}}
    with atomic_dir(out) as tmp:
        if not any(pairs.values()):
            raise TuneQDMError("the adapter changes no weight (every delta is zero): there is nothing to export")
        for file, weights in files.items():
            if not pairs[file]:  # an expert that training never moved: no file, the schedule runs it without LoRA
                record["files"][file] = None
                continue
            tensors = state_dict(pairs[file], component, fmt)
            entry = {"routes": {str(k): w for k, w in weights.items()}, **summary(stats[file])}
            meta = {k: record.get(k) for k in ("method", "base_id", "base_fingerprint", "rank", "energy", "format")}
            path = tmp / file
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, path, metadata={"format": "pt", "tuneqdm": json.dumps({**meta, **entry})})
            record["files"][file] = {**entry, "bytes": path.stat().st_size,
                                     "parameters": sum(t.numel() for t in tensors.values() if t.dim() > 0)}
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2))
    return record


def export_lora(model, out, cfg: dict, component: str, fmt: str = "diffusers", rank: int | None = None,
                energy: float | None = None, dtype: str = "fp32", schedule: dict | None = None,
                extra: dict | None = None, warn=None) -> dict:
    """Write the LoRA export of a quantized denoiser that holds an adapter's scales (``cfg``: its checked
    adapter_config.json) into the folder ``out``; returns what ``lora_export.json`` records.

    ``component``: ``unet`` or ``transformer`` (the key prefix). ``rank`` / ``energy``: the rank rule (default:
    ``DEFAULT_ENERGY``). ``schedule``: which expert each timestep uses (``tuneqdm.export.schedule``), recorded for
    K-expert and S1 adapters.
    """
    check_format(fmt, component)
    check_rank_choice(rank, energy)
    torch_dtype = check_dtype(dtype)
    if rank is None and energy is None:
        energy = DEFAULT_ENERGY
    layers = quantized_layers(model)
    if not layers:
        raise TuneQDMError("the model has no quantized layers: load a scale adapter first")
    check_layers(layers, rank, cfg)
    files = products(cfg)
    pairs, stats = factorize_layers(model, files, rank, energy, torch_dtype, warn)
    record = {"format_version": FORMAT_VERSION, "kind": "lora", "format": fmt, "component": component,
              "method": cfg["method"], "bits": cfg["bits"], "experts": cfg["experts"],
              "base_id": cfg.get("base_id"), "base_fingerprint": cfg["base_fingerprint"],
              "rank": rank, "energy": energy, "dtype": dtype,
              "delta": "W_tuned - W_base: the tuned dequantized weight minus the dequantized base (original scales)",
              **(extra or {})}
    if len(files) > 1:
        record["merged"] = {"file": LORA_WEIGHTS, "weights": {str(k): w for k, w in route_weights(cfg).items()},
                            "rule": "time-uniform blend: each route weighted by the fraction of timesteps it serves"}
        record["schedule"] = schedule
    return write_lora_files(Path(out), files, pairs, stats, component, fmt, record)


# SDXL's added-conditioning MLP under its LDM name: diffusers' kohya reader maps ``label_emb`` back to
# ``add_embedding`` but drops ``add_embedding`` itself; ComfyUI and A1111 read the LDM name.
_KOHYA_RENAMES = {"unet.add_embedding.linear_1.": "unet.label_emb.0.0.", "unet.add_embedding.linear_2.": "unet.label_emb.0.2."}


def _kohya_module(key: str) -> str:
    for old, new in _KOHYA_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def convert_lora_file(path: Path, out: Path, fmt: str, dtype: str, info: dict) -> dict:
    """A ``lora``/``qlora`` result's diffusers LoRA file (PEFT keys, alpha = rank) written into ``out`` in ``fmt``."""
    from safetensors.torch import save_file

    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    tensors = convert_unet_state_dict_to_peft(load_tensors(path, "LoRA"))  # diffusers' .lora.down -> PEFT's lora_A
    components = {k.split(".", 1)[0] for k in tensors}
    if len(components) != 1 or not components <= {"unet", "transformer"}:
        raise TuneQDMError(f"{path} holds LoRA weights for {sorted(components)}, not for one UNet or transformer: "
                           "train the adapter again")
    component = components.pop()
    check_format(fmt, component)
    torch_dtype = check_dtype(dtype)
    tensors = to_format({k: v.to(torch_dtype) for k, v in tensors.items()}, fmt)
    record = {"format_version": FORMAT_VERSION, "kind": "lora", "format": fmt, "component": component,
              "method": info.get("tuneqdm_method", "lora"), "base_id": info.get("base_id"),
              "base_fingerprint": info.get("base_fingerprint"), "dtype": dtype, "rank": None, "energy": None,
              "delta": "the trained LoRA itself (copied)", "adapter": str(path.parent.resolve()), "files": {}}
    meta = {k: record[k] for k in ("method", "base_id", "base_fingerprint", "format")}
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / LORA_WEIGHTS, metadata={"format": "pt", "tuneqdm": json.dumps(meta)})
        record["files"][LORA_WEIGHTS] = {"bytes": (tmp / LORA_WEIGHTS).stat().st_size,
                                         "parameters": sum(t.numel() for t in tensors.values() if t.dim() > 0)}
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2))
    return record
