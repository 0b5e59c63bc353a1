"""A training run's output folder and what makes a resume safe.

The folder holds one run: a used folder is refused unless the run resumes (``--resume_from_checkpoint``) or starts
over (``--force``). A run's identity (the resolved settings, the subjects' photos by content, the base's fingerprint
and the resolution) is recorded in every checkpoint and in ``training.json``; a resume whose identity differs is
refused in one line naming the first changed setting, and the log is cut back to the resumed step so that no row is
written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import TuneQDMError
from ..files import read_json, remove_stale_temporaries
from ..loading.inspection import BaseFacts
from ..quant.kernels import FLOAT_BITS
from ..results import PRODUCTS, read_training_json
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import IMAGE_SUFFIXES, Subject, warn

LOG = "train_log.jsonl"
TRACKER_LOGS = "logs"  # --report_to tensorboard: accelerate's tracker files

# settings added after identities were first recorded: the value a record without them was trained with
_ADDED_SETTINGS = {"activation_bits": FLOAT_BITS}


def check_output_dir(out: Path, cfg: TrainConfig) -> None:
    """A folder that already holds a run is refused unless this run resumes it or starts over."""
    if out.exists() and not out.is_dir():
        raise TuneQDMError(f"--output_dir {out} exists and is not a folder")
    used = out.is_dir() and any((out / p).exists() for p in (*PRODUCTS, "checkpoints", LOG, TRACKER_LOGS))
    if used and not cfg.resume_from_checkpoint and not cfg.force:
        raise TuneQDMError(f"--output_dir {out} already holds a training run: pass "
                           "--resume_from_checkpoint latest to continue it, --force to start over, "
                           "or choose another --output_dir")


def remove_stale_run_temporaries(out: Path) -> None:
    """Temporary folders of writers that died (a kill -9 while a checkpoint or the result was written)."""
    remove_stale_temporaries(out.parent, out.name)
    for folder in (out, out / "checkpoints", out / "validation"):
        remove_stale_temporaries(folder)


def settings_identity(cfg: TrainConfig, model_settings: dict, num_processes: int, base_id: str | None,
                      subjects: list[Subject]) -> dict:
    """The resolved settings that shape the result, the subjects included (their photos by content): what a
    resumed run must share with its checkpoint. The base's fingerprint and the resolution come after loading
    (``model_identity``)."""
    return {**cfg.resolved_settings(), **model_settings, "train_batch_size": None,
            "global_batch_size": cfg.train_batch_size * num_processes,  # the draws depend on this only
            "base_id": base_id, "instance_prompts": [s.instance_prompt for s in subjects],
            "class_prompts": [s.class_prompt for s in subjects] if cfg.with_prior_preservation else None,
            "instance_photos": _photos_digest(subjects)}


def model_settings(cfg: TrainConfig, base: BaseFacts) -> dict:
    """The settings that shape only some models' runs, resolved for this base: the flow-matching ones when its
    scheduler is one, the T5 prompt length when it has a T5 encoder (so other runs record neither)."""
    out = {}
    if base.flow_matching:
        out.update(weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                   mode_scale=cfg.mode_scale if cfg.weighting_scheme == "mode" else None)
    if base.t5_prompts:
        out["max_sequence_length"] = cfg.max_sequence_length  # None: the pipeline's own default
    return out


def model_identity(fingerprint: str | None, resolution: int | None) -> dict:
    """The part of the identity known once the model is loaded."""
    return {"base_fingerprint": fingerprint, "resolution": resolution}


def is_finished_or_refused(out: Path, cfg: TrainConfig, identity: dict, resume_path: Path | None,
                           main: bool) -> bool:
    """Before the model loads: is the run already finished (``--resume_from_checkpoint latest``)? Does the
    checkpoint to resume come from the same settings? A changed setting is refused with one line naming it."""
    if cfg.resume_from_checkpoint == "latest":
        done = read_training_json(out, "start over with --force, or choose another --output_dir")
        same = isinstance(done.get("identity"), dict) and all(
            _recorded(done["identity"], k, object()) == v for k, v in identity.items())
        steps = done.get("steps")
        if same and isinstance(steps, int) and steps >= cfg.max_train_steps:
            if main and not cfg.quiet:
                print(f"{out} already holds this finished run ({done['steps']} steps): nothing to train",
                      file=sys.stderr)
            return True
        if done and not same and resume_path is None:
            refuse_changes(done.get("identity"), identity, f"--output_dir {out} holds a finished run")
        if resume_path is None and main:
            warn(f"no checkpoint in {out / 'checkpoints'}: starting from step 0")
    if resume_path is not None:
        meta = read_json(resume_path / ckpt.STATE_JSON, "checkpoint")
        refuse_changes(meta.get("identity") if isinstance(meta, dict) else None, identity,
                       f"checkpoint {resume_path}")
        step = meta.get("step") if isinstance(meta, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step > cfg.max_train_steps:
            # before, the result was the checkpoint's, reported as "trained for --max_train_steps steps"
            raise TuneQDMError(f"checkpoint {resume_path} has already trained {step} steps, more than "
                               f"--max_train_steps {cfg.max_train_steps}: pass --max_train_steps {step} or more "
                               "to continue it, or --force to start over")
    return False


def refuse_changes(theirs, mine: dict, what: str) -> None:
    """One line naming the first setting of ``mine`` that ``theirs`` (a recorded identity) does not share."""
    if not isinstance(theirs, dict):
        theirs = {}
    theirs = {**{k: v for k, v in _ADDED_SETTINGS.items() if k in mine}, **theirs}
    for key, value in mine.items():
        if key not in theirs:
            raise TuneQDMError(f"{what} was made by an older tuneqdm that did not record its {key}: start over with "
                               "--force or choose another --output_dir")
        if theirs[key] == value:
            continue
        if key == "instance_photos":
            raise TuneQDMError(f"{what} was trained on other photos (the --instance_data_dir files differ): "
                               "resume with the same photos, or start over with --force")
        raise TuneQDMError(f"{what} was made with another {key} ({theirs[key]!r}; this run: {value!r}): resume "
                           "with the same settings, or start over with --force")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run, the one a failure names."""
    found = ckpt.list_checkpoints(out)
    return found[-1][1] if found else None


def prepare_log(out: Path, cfg: TrainConfig, step: int, resumed: bool) -> Path:
    """The folder made ready for the loop (an old run's files gone with --force, the log cut back to the resumed
    step, whose later rows are about to be written again); the log's path. Main process only."""
    if cfg.force and not resumed:
        _start_over(out)
    _truncate_log(out / LOG, step)
    return out / LOG


def _recorded(identity: dict, key: str, missing=None):
    """A recorded identity's value of ``key`` (an added setting's old value where the record predates it)."""
    return identity.get(key, _ADDED_SETTINGS.get(key, missing))


def _photos_digest(subjects: list[Subject]) -> str:
    """SHA-256 of every subject's image files (names and bytes, in the order they are read): the photos by content,
    wherever the folder now is."""
    h = hashlib.sha256()
    for s in subjects:
        folder = Path(s.instance_data_dir)
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        for path in files:
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        h.update(b"\1")
    return h.hexdigest()[:16]


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's rows up to ``step`` (a resumed run writes the later ones again); replaced by a rename."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-cut")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _start_over(out: Path) -> None:
    """--force: the old run's log, checkpoints and images go; its result stays until the new one replaces it."""
    (out / LOG).unlink(missing_ok=True)
    for name in ("checkpoints", "validation", TRACKER_LOGS):
        shutil.rmtree(out / name, ignore_errors=True)
