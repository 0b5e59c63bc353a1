"""The cache of quantized bases: a model is quantized once per (content, quantization settings), then reused.

The first command on a model streams its denoiser into packed integers (minutes for a FLUX.1-size model on a CPU);
the result is written here as an ordinary quantized base (``tuneqdm.save_quantized``) and every later train,
generate or evaluate with the same denoiser and settings loads it instead. An entry is named by the SHA-256 of
the denoiser's content fingerprint (``tuneqdm.shards.content_fingerprint``: any two differently trained weights
differ there), its config and the quantization settings, so a moved folder or a hub snapshot of the same files hits
the same entry and a changed model never does. Entries are written whole or not at all (``files.atomic_dir``) and
are read through ``load_quantized``, which checks every digest: a damaged entry is one line naming it, never used.

Where: ``--quantized_cache DIR``, else ``$TUNEQDM_CACHE``, else ``$XDG_CACHE_HOME/tuneqdm`` (``~/.cache/tuneqdm``);
``--no_quantized_cache`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from torch import nn

from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, WRITE_ERRORS, first_line, write_error_reason
from ..quant.packing import packed_numel
from ..serialization import load_quantized, save_quantized
from ..shards import header
from ..tuning.config import QuantConfig
from .source import Source

CACHE_ENV = "TUNEQDM_CACHE"
QUANTIZER_VERSION = 1  # raised whenever the integers quantize_weight gives for a weight change
_VOLATILE = ("_name_or_path", "_diffusers_version", "_use_default_values")  # config entries that do not shape it


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneqdm"


class QuantizedCache:
    """Quantized bases under ``root/quantized/<key>`` (``root`` None: no cache)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root)

    @classmethod
    def of(cls, setting: str | os.PathLike | bool | None) -> QuantizedCache:
        """The cache a ``quantized_cache`` setting names: None or True the default folder, a path that folder, False
        none."""
        if isinstance(setting, QuantizedCache):
            return setting
        if setting is None or setting is True:
            return cls(default_cache_dir())
        return cls(None) if setting is False else cls(setting)

    def key(self, source: Source, config: QuantConfig, splits: dict[str, int] | None = None) -> str:
        name = source.denoiser
        model_config = {k: v for k, v in source.config(name).items() if k not in _VOLATILE}
        identity = {"weights": source.fingerprint(name), "config": model_config, "bits": config.bits,
                    "init": config.init, "include": config.include, "exclude": config.exclude,
                    "splits": dict(sorted((splits or {}).items())), "quantizer": QUANTIZER_VERSION,
                    "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    def entry(self, key: str) -> Path | None:
        return None if self.root is None else self.root / "quantized" / key

    def load(self, entry: Path, device) -> nn.Module | None:
        """The cached quantized base at ``entry`` (None when there is none); a damaged one is one line."""
        if not entry.is_dir():
            return None
        try:
            return load_quantized(entry, device=device)
        except TuneQDMError as e:
            raise TuneQDMError(f"the quantized-base cache entry {entry} is damaged ({e}): delete it (rm -r {entry}) "
                               "and run again, or pass --no_quantized_cache") from None

    def check_room(self, source: Source, config: QuantConfig) -> None:
        """Before quantizing: one line when the cache's disk cannot hold the entry (estimated from the headers)."""
        if self.root is None:
            return
        need = estimated_bytes(source, config)
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < need:
            raise TuneQDMError(f"the quantized-base cache {self.root} needs about {need / 2**30:.2f} GiB for this model "
                               f"and its disk has {free / 2**30:.2f} GiB free: free space, choose another "
                               "--quantized_cache, or pass --no_quantized_cache")

    def store(self, model: nn.Module, entry: Path, source: Source) -> None:
        """Write ``model`` as the entry (whole or not at all); a failed write is one line, nothing partial left."""
        try:
            save_quantized(model, entry, base_id=source.base_id,
                           extra={"cache": {"source": source.base_id, "weights": source.fingerprint(source.denoiser)}})
        except WRITE_ERRORS as e:
            raise TuneQDMError(f"cannot write the quantized-base cache entry {entry} ({write_error_reason(e)}); "
                               "nothing partial was left: free space, choose another --quantized_cache, or pass "
                               "--no_quantized_cache") from None
        except TuneQDMError as e:
            raise TuneQDMError(f"cannot write the quantized-base cache entry {entry} ({first_line(e, None)}): choose "
                               "another --quantized_cache, or pass --no_quantized_cache") from None


def estimated_bytes(source: Source, config: QuantConfig) -> int:
    """About what a quantized base of the source's denoiser takes on disk: every 2-D or 4-D weight packed at
    ``config.bits`` with a zero-point and scale per row, every other tensor in float32."""
    total = 0
    for shard, keys in source.weight_files(source.denoiser).items():
        entries = header(shard)
        for key in keys:
            shape = entries[key]["shape"]
            numel = 1
            for d in shape:
                numel *= d
            if key.endswith(".weight") and len(shape) in (2, 4):
                total += packed_numel(numel, config.bits) + 5 * shape[0]
            else:
                total += 4 * numel
    return total
