"""Streaming quantization: a diffusers model folder -> a quantized model, never holding the float model.

The denoiser is built on the meta device from its ``config.json``; its Linear/Conv2d become empty quantized layers;
then the (sharded) safetensors files are read one tensor at a time: a layer weight is quantized as soon as it is
read and only its packed integers stay, every other tensor is kept as it is. Peak memory is about the packed model
plus the largest single float tensor. Each tensor is read through its own short ``safe_open`` so that the pages of
a multi-GB shard never accumulate in the process's resident memory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import TuneQDMError
from ..files import first_line
from ..memory import pin_mmap_threshold
from ..quant.layers import QuantizedLayer
from ..quant.packing import pack, values_per_byte
from ..quant.quantizer import quantize_weight
from .config import QuantConfig
from .model import attach, empty_quantized_

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_READABLE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
BLOCK_ELEMENTS = 1 << 22  # rows quantized together: float temporaries stay ~16 MB whatever the layer's size


def diffusers_model_class(name) -> type[nn.Module] | None:
    """The model class the ``diffusers`` package exports under exactly ``name`` (None when there is none): files
    name their class, and a crafted file must never get an arbitrary module imported."""
    import diffusers

    if not (isinstance(name, str) and name.isidentifier()):
        return None
    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # an export whose optional dependency is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else None


def weight_files(folder: Path, variant: str | None = None) -> dict[str, list[str]]:
    """``{shard file: [tensor names]}`` of a diffusers model folder, checked against its index when sharded."""
    def named(name: str) -> str:
        stem, dot, ext = name.partition(".")
        return f"{stem}.{variant}.{ext}" if variant else name

    index = folder / named(INDEX_NAME)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise TuneQDMError(f"{index} is not a safetensors index (no weight_map): download the model again")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if Path(shard).name != shard:
                raise TuneQDMError(f"{index} names a shard outside the folder ({shard!r}): download the model again")
            shards.setdefault(shard, []).append(key)
        for shard, keys in shards.items():
            present = set(_header_keys(folder / shard))
            if present != set(keys):
                odd = sorted(present ^ set(keys))
                raise TuneQDMError(f"shard {folder / shard} does not match {index.name} (e.g. {odd[0]!r}): "
                                   "download the model again")
        return shards
    single = folder / named(WEIGHTS_NAME)
    if single.is_file():
        return {single.name: list(_header_keys(single))}
    raise TuneQDMError(f"{folder} holds no {named(WEIGHTS_NAME)} nor {named(INDEX_NAME)}: "
                       "pass a diffusers model folder saved with safetensors")


def _header_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise TuneQDMError(f"shard {path} is missing: download the model again")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise TuneQDMError(f"{path} is not a readable safetensors file ({first_line(e)}): "
                           "download the model again") from None


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor, read through its own short-lived mapping (see the module docstring)."""
    try:
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        raise TuneQDMError(f"{path}: tensor {key!r} cannot be read ({first_line(e)}): "
                           "download the model again") from None
    if t.dtype not in _READABLE_DTYPES:
        raise TuneQDMError(f"{path}: tensor {key!r} is {t.dtype}, not a float weight: download the model again")
    return t


def empty_model(cls: type[nn.Module], config: dict, config_file: Path, fix: str) -> nn.Module:
    """``cls`` built from ``config`` on the meta device (no weight allocated); a config its constructor rejects is
    one line naming ``config_file`` and ending in ``fix`` (what to do)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 -- a foreign config.json can fail inside the model's constructor in any way
        raise TuneQDMError(f"{config_file} does not describe a {cls.__name__} ({first_line(e)}): {fix}") from None


def _skeleton(folder: Path) -> nn.Module:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TuneQDMError(f"{folder} has no config.json: pass a diffusers model folder (e.g. MODEL/transformer)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneQDMError(f"{config_file} is not valid JSON ({e}): download the model again") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = diffusers_model_class(name)
    if cls is None:
        raise TuneQDMError(f"{name!r} is not a diffusers model class: pass a diffusers model folder "
                           "(its config.json names the class in _class_name)")
    return empty_model(cls, config, config_file, "download the model again")


@torch.no_grad()
def _quantize_into(layer: QuantizedLayer, weight: torch.Tensor, bits: int, init: str) -> None:
    """Quantize ``weight`` into ``layer`` a block of rows at a time (quantization is per row, so the integers are
    those of ``quantize_weight`` on the whole tensor) and keep only the packed bytes."""
    per, cols = values_per_byte(bits), max(weight[0].numel(), 1)
    step = max(per, BLOCK_ELEMENTS // cols // per * per)  # whole bytes per block, so the blocks' bytes concatenate
    packed, zero, scale = [], [], []
    for r in range(0, weight.shape[0], step):
        qw = quantize_weight(weight[r:r + step], bits, init)
        packed.append(pack(qw.q, bits))
        zero.append(qw.zero_point)
        scale.append(qw.scale)
    layer.set_packed(torch.cat(packed), torch.cat(zero), torch.cat(scale))


@torch.no_grad()
def quantize_pretrained(folder, config: QuantConfig | None = None, variant: str | None = None,
                        dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """Quantize the diffusers model in ``folder`` (e.g. ``MODEL/transformer``) tensor by tensor.

    The result equals ``quantize_(cls.from_pretrained(folder), config)`` (same integers, scales and other tensors,
    the latter cast to ``dtype``), at a fraction of the memory.
    """
    folder = Path(folder)
    pin_mmap_threshold()  # every freed temporary goes straight back to the OS (see tuneqdm.memory)
    config = replace(config, **kwargs) if config is not None else QuantConfig(**kwargs)
    shards = weight_files(folder, variant)
    model = _skeleton(folder)
    layers = empty_quantized_(model, config)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    rest: dict[str, torch.Tensor] = {}
    for shard, keys in shards.items():
        for key in keys:
            owner, _, leaf = key.rpartition(".")
            t = _read_tensor(folder / shard, key)
            if owner in layers and leaf == "weight":
                layer = layers[owner]
                if t.shape != layer.weight_shape:
                    raise TuneQDMError(f"{folder / shard}: {key} has shape {tuple(t.shape)}, the model's config "
                                       f"implies {tuple(layer.weight_shape)}: the folder's files do not match")
                _quantize_into(layer, t, config.bits, config.init)
            elif key in expected:
                if t.shape != expected[key].shape:
                    raise TuneQDMError(f"{folder / shard}: {key} has shape {tuple(t.shape)}, the model's config "
                                       f"implies {tuple(expected[key].shape)}: the folder's files do not match")
                rest[key] = t.to(torch.float32 if owner in layers else dtype)
            else:
                raise TuneQDMError(f"{folder / shard} holds {key!r}, which the model of config.json does not have")
            del t
    model.load_state_dict(rest, strict=False, assign=True)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise TuneQDMError(f"{folder} lacks tensors for {missing[:3]}: download the model again")
    attach(model, config)
    return model.eval()
