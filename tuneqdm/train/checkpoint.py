"""Resumable checkpoints: safetensors + JSON (never pickle), each written whole or not at all.

``checkpoints/checkpoint-<step>/`` holds ``state.safetensors`` (the trainable tensors, the optimizer's moment
tensors, torch's RNG states) and ``state.json`` (step, optimizer hyper-parameters, lr-scheduler state, numpy and
Python RNG states, the data-order seed, the base fingerprint and the run's settings). The folder is built under a
temporary name and renamed into place, so a crash or a full disk leaves no partial checkpoint behind.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import TuneQDMError
from ..files import (FORMAT_VERSION, WRITE_ERRORS, atomic_dir, check_digests, check_fields, check_version, digests,
                     first_line, load_tensors, read_json, write_error_reason)

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step}"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``output_dir``, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_JSON).is_file()]
    return sorted(found)


def resolve(output_dir, which: str) -> Path | None:
    """``latest`` -> the newest checkpoint of ``output_dir`` (None when there is none); else a checkpoint folder."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(which)
    if not path.is_dir() and (Path(output_dir) / "checkpoints" / which).is_dir():
        path = Path(output_dir) / "checkpoints" / which
    if not (path / STATE_JSON).is_file():
        raise TuneQDMError(f"--resume_from_checkpoint {which}: no checkpoint there ({STATE_JSON} is missing)")
    return path


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        reason = first_line(e)
        raise TuneQDMError(f"the checkpoint's optimizer state does not fit this run ({reason})") from None


def rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x)
                                                              for x in np_state[2:]]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save(output_dir, step: int, trainable: dict, optimizer, lr_scheduler, info: dict,
         total_limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; on any failure no trace of it remains and a one-line error is raised."""
    target = checkpoint_dir(output_dir, step)
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    rng_tensors, rng_meta = rng_state()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    meta = {"format_version": FORMAT_VERSION, "step": step, "optimizer": opt_meta,
            "lr_scheduler": lr_scheduler.state_dict(), "rng": rng_meta, **info}
    meta["digests"] = digests(tensors, {STATE_JSON: meta})  # every tensor and the whole JSON, checked by load()
    try:
        with atomic_dir(target) as tmp:
            save_file(tensors, tmp / STATE_TENSORS, metadata={"format": "pt"})
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    except WRITE_ERRORS as e:  # a full disk: OSError, or SafetensorError from safetensors
        good = list_checkpoints(output_dir)
        last = f"the last good checkpoint is {good[-1][1]}" if good else "no earlier checkpoint exists"
        raise TuneQDMError(f"cannot write checkpoint {target} ({write_error_reason(e)}); nothing partial was left, "
                           f"{last}") from None
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


_FIELDS = {"format_version": int, "step": int, "optimizer": dict, "lr_scheduler": dict, "rng": dict, "digests?": dict}
_REDO = "resume from another checkpoint or start again"


def load(path: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint folder, checked: the schema of state.json, the digests of the tensors and of
    the JSON, and the dtypes of the tensors (a damaged checkpoint ends in one line, never in a changed resume).
    Checkpoints written before digests existed are accepted (see ``tuneqdm.files.check_digests``)."""
    path = Path(path)
    json_path = path / STATE_JSON
    meta = read_json(json_path, "checkpoint")
    check_version(meta, json_path)
    check_fields(meta, _FIELDS, json_path, _REDO)
    check_fields(meta["optimizer"], {"param_groups": list, "scalars": dict}, f"{json_path} (optimizer)", _REDO)
    check_fields(meta["rng"], {"numpy": list, "python": list}, f"{json_path} (rng)", _REDO)
    if meta["step"] < 0 or len(meta["rng"]["numpy"]) != 5 or len(meta["rng"]["python"]) != 3:
        raise TuneQDMError(f"{json_path}: step or rng states are malformed: {_REDO}")
    tensors = load_tensors(path / STATE_TENSORS, "checkpoint")
    written = {k: v for k, v in meta.items() if k != "digests"}  # what save() digested
    check_digests(meta.get("digests"), tensors, path, _REDO, {STATE_JSON: written})
    if "rng.torch" not in tensors:
        raise TuneQDMError(f"{path / STATE_TENSORS} lacks the torch RNG state: {_REDO}")
    for name, t in tensors.items():
        if t.dtype != torch.uint8 if name.startswith("rng.") else not t.dtype.is_floating_point:
            raise TuneQDMError(f"{path / STATE_TENSORS}: tensor {name!r} has dtype {t.dtype}: {_REDO}")
    return tensors, meta


def restore(tensors: dict, meta: dict, optimizer, lr_scheduler) -> None:
    """Optimizer, lr scheduler and RNG states (the caller restores the trainable tensors and the step); a state that
    does not fit ends in one line naming it."""
    for part, apply in (("optimizer", lambda: _restore_optimizer(optimizer, tensors, meta["optimizer"])),
                        ("lr scheduler", lambda: lr_scheduler.load_state_dict(meta["lr_scheduler"])),
                        ("RNG", lambda: set_rng_state(tensors, meta["rng"]))):
        try:
            apply()
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as e:
            if isinstance(e, TuneQDMError):
                raise
            reason = first_line(e)
            raise TuneQDMError(f"the checkpoint's {part} state does not fit this run ({reason}): {_REDO}") from None


def model_tensors(tensors: dict) -> dict:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
