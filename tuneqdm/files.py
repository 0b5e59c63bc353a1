"""Files on disk, one home: atomic output folders, checked JSON and safetensors reads, format versions.

Every writer in tuneqdm builds its output under a temporary name beside the target and renames it into place, so a
crash or a full disk never leaves a half-written folder; every reader turns a missing, unreadable or foreign file
into one ``TuneQDMError`` line that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import TuneQDMError

FORMAT_VERSION = 1  # every tuneqdm file format (quantized base, adapter, checkpoint, activations, metrics)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary folder; on success its files move into ``target`` (each by an atomic rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        else:
            for f in tmp.iterdir():
                os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(out: str | os.PathLike, force: bool) -> Path:
    """``out`` as a Path; a one-line error when it is a file, a non-empty folder (unless ``force``) or cannot be
    written (see ``check_writable``): called before the long work, not after it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TuneQDMError(f"--out {out} is a file: give a folder name")
    if out.exists() and any(out.iterdir()) and not force:
        raise TuneQDMError(f"output folder {out} is not empty: choose another --out or pass --force")
    check_writable(out)
    return out


def check_writable(out: str | os.PathLike, flag: str = "--out") -> None:
    """A one-line error when the output folder ``out`` cannot be written where ``atomic_dir`` will write it: its
    nearest existing ancestor is a file or refuses new entries, or ``out`` itself does (probed by creating and
    removing a temporary folder: permission bits alone say nothing for root or a read-only mount)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TuneQDMError(f"{flag} {out} is a file: give a folder name")
    _probe(out.parent, out, flag)
    if out.is_dir():
        _probe(out, out, flag)


def check_writable_file(out: str | os.PathLike, flag: str = "--out") -> None:
    """A one-line error when the file ``out`` cannot be written (atomically, beside itself)."""
    out = Path(out)
    if out.is_dir():
        raise TuneQDMError(f"{flag} {out} is a folder: give a file name")
    _probe(out.parent, out, flag)


def _probe(folder: Path, out: Path, flag: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TuneQDMError(f"cannot write {out}: {existing} is a file: choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as e:
        raise TuneQDMError(f"cannot write {out}: {existing} is not writable ({e.strerror}): choose another {flag}"
                           ) from None


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a one-line error naming ``what`` when it is missing or not valid JSON."""
    if not path.is_file():
        raise TuneQDMError(f"no {what} at {path.parent}: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneQDMError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): save the {what} again")


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a one-line error naming ``what`` when it is missing or unreadable."""
    if not path.is_file():
        raise TuneQDMError(f"no {what} at {path.parent}: {path.name} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TuneQDMError(f"{path} is corrupt or truncated ({reason}): save the {what} again") from None


def check_version(cfg: dict, path: Path, message: str | None = None) -> None:
    """Refuse a file written in another format version (``message``: the one-line error to give instead)."""
    if cfg.get("format_version") != FORMAT_VERSION:
        raise TuneQDMError(message or (
            f"{path} has format version {cfg.get('format_version')!r}; this tuneqdm reads version {FORMAT_VERSION}"
        ))
