"""Streaming quantization: a diffusers model folder -> a quantized model, never holding the float model.

The denoiser is built on the meta device from its ``config.json``; its Linear/Conv2d become empty quantized layers;
then the (sharded) safetensors files are read one tensor at a time: a layer weight is quantized as soon as it is
read and only its packed integers stay, every other tensor is kept as it is. Peak memory is about the packed model
plus the largest single float tensor. Each tensor is read through its own short ``safe_open`` so that the pages of
a multi-GB shard never accumulate in the process's resident memory.
"""

from __future__ import annotations

import importlib

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import TuneQDMError
from ..files import first_line
from ..memory import pin_mmap_threshold
from ..progress import progress
from ..quant.layers import QuantizedLayer
from ..quant.packing import pack, values_per_byte
from ..quant.quantizer import quantize_weight
from ..quant.split import SplitConv2d
from ..shards import header, read_tensor, weight_files
from .config import QuantConfig
from .model import attach, empty_quantized_, replace_module

BLOCK_ELEMENTS = 1 << 22  # rows quantized together: float temporaries stay ~16 MB whatever the layer's size


def exported_class(package: str, name, bases: tuple[str, ...]) -> type | None:
    """The class ``package`` exports under exactly ``name`` when it derives from one of the package's ``bases``
    (None otherwise): files name their classes, and a crafted file must never get an arbitrary module imported."""
    module = importlib.import_module(package)
    if not (isinstance(name, str) and name.isidentifier()):
        return None
    try:
        cls = getattr(module, name, None)
    except (ImportError, RuntimeError):  # an export whose optional dependency is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, tuple(getattr(module, b) for b in bases)) else None


def diffusers_model_class(name) -> type[nn.Module] | None:
    """The model class the ``diffusers`` package exports under exactly ``name`` (None when there is none)."""
    return exported_class("diffusers", name, ("ModelMixin",))


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
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        splits: dict[str, int] | None = None, **kwargs) -> nn.Module:
    """Quantize the diffusers model in ``folder`` (e.g. ``MODEL/transformer``) tensor by tensor, on ``device``.

    The result equals ``quantize_(cls.from_pretrained(folder), config)`` (same integers, scales and other tensors,
    the latter cast to ``dtype``), at a fraction of the memory: on a GPU each tensor is moved there as it is read and
    quantized there, so only packed weights and scales ever live on it. ``splits``: ``{conv: input channel}`` of the
    convs quantized as two slices (Q-Diffusion's shortcut splitting, ``tuneqdm.quant.split``), as ``tuneqdm
    quantize`` finds them. A bar shows the tensors and bytes read.
    """
    folder, device = Path(folder), torch.device(device)
    pin_mmap_threshold()  # every freed temporary goes straight back to the OS (see tuneqdm.memory)
    config = replace(config, **kwargs) if config is not None else QuantConfig(**kwargs)
    files = weight_files(folder, variant)
    model = _skeleton(folder)
    for name, split in (splits or {}).items():
        replace_module(model, name, SplitConv2d.from_conv(_conv(model, name, folder), split, device="meta"))
    layers = empty_quantized_(model, config)
    rest = _stream_into(model, layers, files, folder, config, dtype, device, splits or {})
    model.load_state_dict(rest, strict=False, assign=True)
    own_float_storage(model)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise TuneQDMError(f"{folder} lacks tensors for {missing[:3]}: download the model again")
    attach(model, config)
    return model.eval()


def own_float_storage(model: nn.Module) -> None:
    """Give every float (unquantized) Linear and Conv2d weight its own freshly allocated storage: tensors read from a
    file sit at whatever offset the file put them, and a matmul's rounding follows the alignment, so the same weights
    read by two paths (streamed from the model's files, or from the cache of quantized bases) would compute
    differently by an ulp, and a resumed run would no longer repeat its first run bit for bit."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) in (nn.Linear, nn.Conv2d):
                for name, p in list(module.named_parameters(recurse=False)):
                    if not p.is_meta:
                        p.data = p.data.clone()


def _conv(model: nn.Module, name: str, folder: Path) -> nn.Conv2d:
    try:
        conv = model.get_submodule(name)
    except AttributeError:
        conv = None
    if type(conv) is not nn.Conv2d:
        raise TuneQDMError(f"cannot split {name!r} of {folder}: it is not a Conv2d of the model")
    return conv


def _stream_into(model, layers, files, folder, config, dtype, device, splits) -> dict[str, torch.Tensor]:
    """Read every tensor once: a quantized layer's weight into its packed integers (a split conv's into its two
    slices), every other tensor returned (in ``dtype``; a quantized layer's bias in float32) for ``load_state_dict``."""
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    total = sum(_nbytes(info) for shard, keys in files.items() for info in map(header(shard).get, keys))
    rest: dict[str, torch.Tensor] = {}
    kind = "UNet" if "UNet" in type(model).__name__ else "transformer"
    bar = progress(desc=f"quantizing the {kind} to {config.bits} bits ({config.init})", total=total, unit="B",
                   unit_scale=True, unit_divisor=1024, mininterval=1.0)
    tensors, done = sum(len(keys) for keys in files.values()), 0
    with bar:
        for shard, keys in files.items():
            for key in keys:
                owner, _, leaf = key.rpartition(".")
                t = read_tensor(shard, key).to(device)
                done += 1
                bar.set_postfix_str(f"{done}/{tensors} tensors", refresh=False)
                bar.update(t.numel() * t.element_size())
                if owner in splits and leaf == "weight":  # the two input-channel slices, each its own quantizer
                    for part, piece in (("hidden", t[:, :splits[owner]]), ("skip", t[:, splits[owner]:])):
                        _check_shape(shard, f"{key} ({part})", piece.shape, layers[f"{owner}.{part}"].weight_shape)
                        _quantize_into(layers[f"{owner}.{part}"], piece, config.bits, config.init)
                elif owner in splits and leaf == "bias":  # held by the hidden half
                    rest[f"{owner}.hidden.bias"] = t.to(torch.float32)
                elif owner in layers and leaf == "weight":
                    _check_shape(shard, key, t.shape, layers[owner].weight_shape)
                    _quantize_into(layers[owner], t, config.bits, config.init)
                elif key in expected:
                    _check_shape(shard, key, t.shape, expected[key].shape)
                    rest[key] = t.to(torch.float32 if owner in layers else dtype)
                else:
                    raise TuneQDMError(f"{shard} holds {key!r}, which the model of config.json does not have")
                del t
    return rest


def _check_shape(where, key: str, shape, implied) -> None:
    if tuple(shape) != tuple(implied):
        raise TuneQDMError(f"{where}: {key} has shape {tuple(shape)}, the model's config implies {tuple(implied)}: "
                           "the folder's files do not match")


def _nbytes(info: dict) -> int:
    start, end = info["data_offsets"]
    return end - start
