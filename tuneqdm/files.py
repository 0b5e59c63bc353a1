"""Files on disk, one home: atomic output folders, checked JSON and safetensors reads, format versions.

Every writer in tuneqdm builds its whole output folder under a temporary name beside the target and swaps it into
place, so a crash or a full disk never leaves a half-written folder, nor new files beside old ones; every reader
turns a missing, unreadable or foreign file into one ``TuneQDMError`` line that says what to do. Writers record
SHA-256 digests of their tensors and settings (``digests``) and readers check them and the JSON schema
(``check_digests``, ``check_fields``) before using a value.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import math
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
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, None)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def _temporary_name(target: Path, kind: str) -> str:
    """``.NAME.tmp-PID-xxxx``: the writer's pid tells a later run whether the writer is still alive."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file so that readers see the old content or the whole new one, never a part (a temporary beside
    it, synced, then renamed over it; removed if the write fails). ``str`` is written as UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_name(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    Temporaries of ``target`` that writers which died left beside it (a kill -9, a power cut: gigabytes at FLUX size)
    are removed first (``remove_stale_temporaries``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)  # every writer cleans up after its own dead runs
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


def lock_file(target: str | os.PathLike) -> Path:
    """The lock file of an output folder (see ``output_lock``): its pid while a tuneqdm process writes there."""
    folder = Path(os.environ.get("TUNEQDM_LOCKS") or Path(tempfile.gettempdir()) / f"tuneqdm-locks-{os.getuid()}")
    return folder / f"{hashlib.sha256(str(Path(target).resolve()).encode()).hexdigest()[:24]}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, flag: str = "--out"):
    """Hold ``target`` for this process while it writes there: a second tuneqdm process given the same folder is
    refused in one line naming the first one's pid, instead of both reporting success while one result is lost.

    An exclusive ``flock`` on a file named by the folder's resolved path, in a per-user folder of the temporary
    directory (``$TUNEQDM_LOCKS`` to choose another): nothing is created beside the output, a folder that does not
    exist yet is locked as well, and the kernel drops the lock when its holder dies, so a killed run never leaves a
    stale one. Where no lock file can be made, nothing is locked (the command runs as before)."""
    import fcntl

    path = lock_file(target)
    fd = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TuneQDMError(f"{flag} {target} is being written by another tuneqdm process (pid {holder}): wait "
                               "for it to finish, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # the file stays (removing it would race with a process opening it): 0 bytes


def writes_to(folder_of):
    """Decorate a command's run function: it holds the folder ``folder_of(config)`` names (:func:`output_lock`; None:
    nothing) for its whole call, whether the CLI or a Python caller runs it."""
    def wrap(run):
        @functools.wraps(run)
        def locked(config):
            folder = folder_of(config)
            with output_lock(folder) if folder is not None else contextlib.nullcontext():
                return run(config)
        return locked
    return wrap


def check_output_folder(out: str | os.PathLike, force: bool, ours: tuple[str, ...] = (),
                        what: str = "a tuneqdm output") -> Path:
    """``out`` as a Path; a one-line error when it is a file, the folder the process runs in (or one holding it), a
    non-empty folder (unless ``force``) or cannot be written (see ``check_writable``): called before the long work,
    not after it.

    One rule for every command's ``--force``: it replaces only a folder of what that command writes, ``ours`` (the
    fnmatch patterns of the names it puts there, ``what`` naming the kind); one entry of anything else and the
    folder is refused, so ``--out ~ --force`` never wipes a home folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TuneQDMError(f"--out {out} is a file: give a folder name")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise TuneQDMError(f"--out {out} is the folder this command runs in (or holds it), which it cannot replace: "
                           "give a new subfolder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        if not force:
            raise TuneQDMError(f"output folder {out} is not empty: choose another --out or pass --force")
        foreign = [name for name in entries if not any(fnmatch.fnmatchcase(name, p) for p in ours)]
        if foreign:
            raise TuneQDMError(f"output folder {out} holds files that are not {what} ({foreign[0]}): --force only "
                               f"replaces {what}, choose another --out")
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
        obj = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, too deep
        reason = e.msg if isinstance(e, json.JSONDecodeError) else first_line(e, 80)
        raise TuneQDMError(f"{path} is not valid JSON ({reason}): save the {what} again") from None
    except OSError as e:
        raise TuneQDMError(f"cannot read {path} ({e.strerror or e}): check its permissions") from None
    if not isinstance(obj, dict):
        raise TuneQDMError(f"{path} is not a JSON object: save the {what} again")
    return obj


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a one-line error naming ``what`` when it is missing or unreadable."""
    if not path.is_file():
        raise TuneQDMError(f"no {what} at {path.parent}: {path.name} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TuneQDMError(f"{path} is corrupt or truncated ({first_line(e, None)}): save the {what} again") from None


def check_prompt(text: str | None, flag: str) -> str | None:
    """A prompt that is text: a command-line byte that is not UTF-8 arrives as a lone surrogate, which every
    tokenizer refuses with a TypeError (at the first validation, after training ran, for --validation_prompt)."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TuneQDMError(f"{flag} holds a byte that is not UTF-8 text (at character {e.start}): pass the prompt "
                               "as UTF-8") from None
    return text


def read_prompt_file(path: str | os.PathLike, flag: str) -> list[str]:
    """The one reader of prompt files (evaluate --prompts, quantize and quantize-activations --calib_prompts): one
    prompt per non-empty line of UTF-8 text; one line when it is not UTF-8 or holds no prompt (the caller says what
    to do about a missing file)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TuneQDMError(f"{flag} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise TuneQDMError(f"cannot read {flag} {path} ({e.strerror or e}): check its permissions") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise TuneQDMError(f"{flag} {path} has no prompts: write one prompt per line")
    return prompts


def check_version(cfg: dict, path: Path, message: str | None = None) -> None:
    """Refuse a file written in another format version (``message``: the one-line error to give instead)."""
    if cfg.get("format_version") != FORMAT_VERSION:
        raise TuneQDMError(message or (
            f"{path} has format version {cfg.get('format_version')!r}; this tuneqdm reads version {FORMAT_VERSION}"
        ))


def first_line(error: BaseException, limit: int | None = 100) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors (cut at
    ``limit`` characters; None: whole)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


# ---- schemas: the JSON fields a loader reads, checked before any of them is used ----------------------------------
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object", type(None): "null"}


def _is_kind(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def check_fields(obj, fields: dict, path: Path | str, fix: str) -> dict:
    """``obj`` if it is a JSON object with ``fields`` (``{key: type or tuple of types}``, a key ending in ``?`` is
    optional); else one line naming the key and ending in ``fix`` (what to do). ``int`` excludes booleans, ``float``
    takes finite numbers."""
    if not isinstance(obj, dict):
        raise TuneQDMError(f"{path} is not a JSON object: {fix}")
    for key, kinds in fields.items():
        optional, key = key.endswith("?"), key.rstrip("?")
        if key not in obj:
            if optional:
                continue
            raise TuneQDMError(f"{path} lacks the key {key!r}: {fix}")
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not any(_is_kind(obj[key], k) for k in kinds):
            want = " or ".join(_KINDS[k] for k in kinds)
            raise TuneQDMError(f"{path}: {key!r} must be {want}, not {json.dumps(obj[key])[:40]}: {fix}")
    return obj


# ---- digests: every tensor and the JSON settings that shape the model, checked on load ----------------------------
def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a bit flip, a changed dtype or shape all change it)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)};".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def json_digest(obj) -> str:
    """SHA-256 of a JSON value in canonical form (as it reads back from a file: sorted keys, no spaces)."""
    canonical = json.loads(json.dumps(obj))  # tuples -> lists, int keys -> str: the form a reader sees
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digests(tensors: dict[str, torch.Tensor], parts: dict | None = None) -> dict:
    """What a writer stores under ``"digests"``: ``{"tensors": {name: sha256}, part: sha256 of each JSON part}``
    (``parts``: ``{name: JSON value}``, e.g. the settings a loader builds the model from)."""
    return {"tensors": {k: tensor_digest(v) for k, v in sorted(tensors.items())},
            **{k: json_digest(v) for k, v in (parts or {}).items()}}


def check_digests(recorded, tensors: dict[str, torch.Tensor], path: Path, fix: str, parts: dict | None = None):
    """Verify what ``digests`` recorded; one line naming the first tensor or JSON part that differs and ending in
    ``fix`` (what to do).

    ``recorded`` None (a file written before tuneqdm stored digests) is accepted: refusing would make users redo
    every earlier adapter and quantized base, and the loaders' structural checks (schema, dtypes, shapes, finite
    scales) still apply to it. Digests guard against damage, not against a deliberate forger.
    """
    check_digest_values(recorded, {k: (lambda t=t: tensor_digest(t)) for k, t in tensors.items()}, path, fix, parts)


def check_digest_values(recorded, actual: dict, path: Path, fix: str, parts: dict | None = None) -> None:
    """``check_digests`` with the tensors' digests given (``{name: sha256}``, or a function returning it: computed
    only when the names agree), for files read one tensor at a time (``file_tensor_digests``)."""
    if recorded is None:
        return
    damaged = f"{path}: its SHA-256 digests are damaged: {fix}"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("tensors"), dict):
        raise TuneQDMError(damaged)
    names = set(recorded["tensors"])
    if names != set(actual):
        odd = min(names ^ set(actual))
        where = "its file" if odd in names else "its digests"
        raise TuneQDMError(f"{path}: tensor {odd!r} is missing from {where}: {fix}")
    for name in sorted(actual):
        digest = actual[name]() if callable(actual[name]) else actual[name]
        if recorded["tensors"][name] != digest:
            raise TuneQDMError(f"{path}: tensor {name!r} does not match its SHA-256 digest (the file is damaged): "
                               f"{fix}")
    for part, value in (parts or {}).items():
        if part not in recorded:
            raise TuneQDMError(damaged)
        if recorded[part] != json_digest(value):
            raise TuneQDMError(f"{path}: {part} was changed after saving (it does not match its SHA-256 digest): {fix}")


def file_tensor_digests(paths, what: str, fix: str) -> dict[str, str]:
    """``{name: sha256}`` of every tensor of the safetensors files ``paths``, read one tensor at a time (a whole
    fine-tuned UNet is never held twice); one line naming ``what`` for a missing, unreadable or truncated file, a
    name found in two files, or a floating tensor holding NaN or infinite values (a result nothing should sample
    from), ending in ``fix``."""
    from safetensors import safe_open

    found: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise TuneQDMError(f"no {what} at {path.parent}: {path.name} is missing: {fix}")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if name in found:
                        raise TuneQDMError(f"{path}: tensor {name!r} is in two files of the {what}: {fix}")
                    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                        raise TuneQDMError(f"{path}: tensor {name!r} holds NaN or infinite values: {fix}")
                    found[name] = tensor_digest(t)
        except TuneQDMError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise TuneQDMError(f"{path} is corrupt or truncated ({first_line(e, None)}): {fix}") from None
    return found
