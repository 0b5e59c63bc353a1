"""Files on disk, one home: atomic output folders, checked JSON and safetensors reads, format versions.

Every writer in tuneqdm builds its whole output folder under a temporary name beside the target and swaps it into
place, so a crash or a full disk never leaves a half-written folder, nor new files beside old ones; every reader
turns a missing, unreadable or foreign file into one ``TuneQDMError`` line that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import TuneQDMError

FORMAT_VERSION = 1  # every tuneqdm file format (quantized base, adapter, checkpoint, activations, metrics)
# what a failed write raises: safetensors reports a full disk as SafetensorError, not OSError
WRITE_ERRORS = (OSError, SafetensorError)


def write_error_reason(e: BaseException) -> str:
    """The one-line reason of a failed write (``No space left on device``)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def _temporary_name(target: Path, kind: str) -> str:
    """``.NAME.tmp-PID-xxxx``: the writer's pid tells a later run whether the writer is still alive."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files: give them the modes the umask asks for."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root) / f, 0o666 & ~mask)


def _link_or_copy(src, dst) -> None:
    """A hard link (no bytes copied; the old folder's removal then drops only a name), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(old: Path, new: Path, keep) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or not keep(entry.name) or _TEMPORARY.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, new / entry.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target`` as one unit: rename the old one away, rename the new one in,
    then remove the old one. A death between the renames leaves ``target`` missing, never half old and half new;
    :func:`remove_stale_temporaries` then puts the old one back."""
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    old = target.parent / f"{_temporary_name(target, 'old')}{secrets.token_hex(4)}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # the new one could not go in: the old one comes back
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, carry=None):
    """Yield an empty temporary folder beside ``target``; on success it REPLACES ``target`` as one unit.

    ``carry(name) -> bool``: entries of the old ``target`` the writer did not make that the new folder keeps (hard
    links, so nothing is copied), e.g. a training run's checkpoints beside its new adapter. Files and folders get
    the modes the umask asks for (mkdtemp alone would make them private). On an exception ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(target, "tmp"), dir=target.parent))
    try:
        yield tmp
        _honour_umask(tmp)
        if carry is not None and target.is_dir():
            _carry(target, tmp, carry)
        replace_folder(tmp, target)
    finally:
        _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary folders that writers which died left in ``folder`` (only those of ``name`` when given);
    an old folder renamed away whose replacement never arrived is put back. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _TEMPORARY.match(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if m["pid"] is not None and _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


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
