"""A model's weight files as they ship: safetensors shards and their index, read one checked tensor at a time.

One home for what every reader of a model folder needs before it trusts a byte: which files hold which tensors (a
sharded model's index checked against every shard's header), the file names of a variant (``*.fp16.safetensors``),
the header of a shard checked against the file's size (a truncated download is found before any tensor is read),
one tensor read through its own short ``safe_open`` (so the pages of a multi-GB shard never pile up in the
process's resident memory), and a cheap fingerprint of the files' content. diffusers and transformers name their
files differently (``diffusion_pytorch_model`` / ``model``); both put a variant before the last extension.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import TuneQDMError
from .files import first_line

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
INDEX_SUFFIX = ".index.json"
# what a stored float weight may be: as shipped (fp32, fp16, bf16), fp64, and the fp8 formats of FLUX-era checkpoints
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
OTHER_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
UNREAD_DTYPES = ("F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64", "U16", "U32", "U64")  # safetensors' other dtypes
REDOWNLOAD = "download the model again"
SAMPLE_BYTES = 8192  # of each tensor's start and end, for the content fingerprint


def variant_name(name: str, variant: str | None) -> str:
    """``name`` of a variant as diffusers and transformers spell it: the variant before the last extension
    (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def weights_name(folder: Path) -> str:
    """The weight file name of a component folder: diffusers' models and transformers' models name theirs apart."""
    return TRANSFORMERS_WEIGHTS if any(folder.glob("model*.safetensors*")) else DIFFUSERS_WEIGHTS


def weight_files(folder, variant: str | None = None, name: str | None = None) -> dict[Path, list[str]]:
    """``{shard: [tensor names]}`` of a model folder (``name``: its weight file name, default by ``weights_name``),
    every shard's header checked against its size and, when sharded, against the index: one line for a missing,
    truncated or foreign shard."""
    folder = Path(folder)
    name = name or weights_name(folder)
    index = folder / variant_name(name + INDEX_SUFFIX, variant)
    single = folder / variant_name(name, variant)
    if index.is_file():
        return _sharded(folder, index)
    if single.is_file():
        return {single: list(header(single))}
    stem = name.rpartition(".")[0]
    others = sorted({p.name[len(stem) + 1:].split(".")[0] for p in folder.glob(f"{stem}.*.safetensors")} - {variant})
    if others:
        raise TuneQDMError(f"{folder} holds no {single.name} nor {index.name}, but the variant {others[0]} "
                           f"({variant_name(name, others[0])}): pass --variant {others[0]}")
    raise TuneQDMError(f"{folder} holds no {single.name} nor {index.name}: pass a diffusers model folder saved with "
                       f"safetensors{' (check --variant)' if variant else ''}")


def _sharded(folder: Path, index: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise TuneQDMError(f"{index} is not a safetensors index (no weight_map): {REDOWNLOAD}") from None
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if Path(shard).name != shard:
            raise TuneQDMError(f"{index} names a shard outside the folder ({shard!r}): {REDOWNLOAD}")
        shards.setdefault(folder / shard, []).append(key)
    for shard, keys in shards.items():
        present = set(header(shard))
        if present != set(keys):
            odd = sorted(present ^ set(keys))
            raise TuneQDMError(f"shard {shard} does not match {index.name} (e.g. {odd[0]!r}): {REDOWNLOAD}")
    return shards


def header(path: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked: every tensor's bytes lie
    inside the file and match its dtype and shape (a truncated or overwritten shard is one line, before any read)."""
    return _parse(Path(path))[1]


def _parse(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the tensor data starts, the checked header entries) of a safetensors file."""
    if not path.is_file():
        raise TuneQDMError(f"shard {path} is missing: {REDOWNLOAD}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("its header is longer than the file")
            entries = json.loads(f.read(length))
    except (struct.error, ValueError, OSError) as e:
        raise TuneQDMError(f"{path} is not a readable safetensors file ({first_line(e)}): {REDOWNLOAD}") from None
    if not isinstance(entries, dict):
        raise TuneQDMError(f"{path} is not a readable safetensors file (its header is no JSON object): {REDOWNLOAD}")
    entries.pop("__metadata__", None)
    data = size - 8 - length
    for key, info in entries.items():
        if isinstance(info, dict) and info.get("dtype") not in FLOAT_DTYPES and info.get("dtype") not in OTHER_DTYPES:
            # a format safetensors defines (other FP8/FP6/FP4 kinds) is a whole file tuneqdm cannot read, not damage
            fix = ("convert the model to one of those (e.g. save it in bf16)" if info.get("dtype") in UNREAD_DTYPES
                   else REDOWNLOAD)
            raise TuneQDMError(f"{path}: tensor {key!r} is stored as {info.get('dtype')!r}, which tuneqdm cannot read "
                               f"(weights: {', '.join(FLOAT_DTYPES)}): {fix}")
        if not _well_formed(info):
            raise TuneQDMError(f"{path}: tensor {key!r} has an unreadable entry: {REDOWNLOAD}")
        dtype = FLOAT_DTYPES.get(info["dtype"]) or OTHER_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if end > data:
            raise TuneQDMError(f"{path} is truncated ({size} bytes; tensor {key!r} ends at byte {8 + length + end}): "
                               f"{REDOWNLOAD}")
        numel = 1
        for n in info["shape"]:
            numel *= n
        if end - start != numel * dtype.itemsize:
            raise TuneQDMError(f"{path}: tensor {key!r} holds {end - start} bytes, its shape needs "
                               f"{numel * dtype.itemsize}: {REDOWNLOAD}")
    return 8 + length, entries


def _well_formed(info) -> bool:
    """A header entry with a shape of non-negative integers and ordered offsets."""
    if not isinstance(info, dict):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return _naturals(shape) and _naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def _naturals(values) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def read_tensor(path: Path, key: str, float_only: bool = True) -> torch.Tensor:
    """One tensor as stored, read through its own short-lived mapping; ``float_only``: refuse a non-float one."""
    try:
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        raise TuneQDMError(f"{path}: tensor {key!r} cannot be read ({first_line(e)}): {REDOWNLOAD}") from None
    if float_only and t.dtype not in FLOAT_DTYPES.values():
        raise TuneQDMError(f"{path}: tensor {key!r} is {t.dtype}, not a float weight: {REDOWNLOAD}")
    if t.dtype.is_floating_point and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()):
        raise TuneQDMError(f"{path}: tensor {key!r} holds NaN or infinite values, which no model could be built "
                           f"from: {REDOWNLOAD}")
    return t


def tensor_files(files: dict[Path, list[str]]) -> dict[str, Path]:
    """``{tensor name: its shard}``."""
    return {key: shard for shard, keys in files.items() for key in keys}


def content_fingerprint(files: dict[Path, list[str]]) -> str:
    """SHA-256 (16 hex digits) of the files' tensors by content: each tensor's name, dtype and shape and its first
    and last ``SAMPLE_BYTES`` bytes (whatever the shard names or the folder's path). Cheap for a 24 GB model (one
    small read per tensor end); a fine-tune changes nearly every value of the tensors it trains, so it changes this."""
    h = hashlib.sha256()
    entries = sorted((key, shard) for shard, keys in files.items() for key in keys)
    headers: dict[Path, tuple[int, dict]] = {}
    for key, shard in entries:
        if shard not in headers:
            headers[shard] = _parse(shard)
        base, info = headers[shard][0], headers[shard][1][key]
        start, end = info["data_offsets"]
        h.update(f"{key}:{info['dtype']}:{info['shape']};".encode())
        with open(shard, "rb") as f:
            f.seek(base + start)
            h.update(f.read(min(SAMPLE_BYTES, end - start)))
            if end - start > SAMPLE_BYTES:
                f.seek(base + max(start + SAMPLE_BYTES, end - SAMPLE_BYTES))
                h.update(f.read(end - max(start + SAMPLE_BYTES, end - SAMPLE_BYTES)))
    return h.hexdigest()[:16]


def parameter_count(files: dict[Path, list[str]]) -> int:
    """Number of values in the files' float tensors (read from the headers)."""
    total = 0
    for shard, keys in files.items():
        entries = header(shard)
        for key in keys:
            if entries[key]["dtype"] in FLOAT_DTYPES:
                n = 1
                for d in entries[key]["shape"]:
                    n *= d
                total += n
    return total
