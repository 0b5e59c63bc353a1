"""`tuneqdm benchmark fidelity`, which trains: subjects x methods x bits on the same seeds, one cell at a time, resumable.

A cell is one (method, bits, subject): ``tuneqdm train`` then ``tuneqdm evaluate``, written to
``OUT/cells/<method>-w<bits>/<subject>/`` (``run/`` and ``eval/``). A cell whose ``eval/metrics.json`` exists is
finished and never redone, so an interrupted benchmark resumes where it stopped; ``--shard i/n`` runs every n-th cell
so that n processes (or GPUs) share the work. ``floor`` is the untuned quantized model (scales at their initial
values); ``fp`` and ``lora`` ignore ``bits``. The table (``tuneqdm.eval.fidelity``) averages over subjects.

Each finished cell records the settings it was made with (learning rate, steps, prompts, images, seeds, evaluators);
resuming with other settings is refused rather than mixing two protocols in one table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors import safe_open

from ..errors import TuneQDMError
from ..eval.evaluate import METRICS, evaluate, read_photos
from ..eval.fidelity import FLOOR
from ..eval.prompts import evaluation_prompts
from ..loading import assemble, base_id, load_pipeline, quantized_denoiser, resolve
from ..progress import is_quiet
from ..train import TrainConfig, train
from ..train.config import DEFAULT_LR
from ..tuning import QuantConfig


def _numel(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def trained_size(run: Path) -> tuple[int, int]:
    """(trainable parameters, bytes on disk) of a ``tuneqdm train`` result."""
    files = [p for p in run.rglob("*.safetensors") if "checkpoints" not in p.parts]
    if not files:
        raise TuneQDMError(f"{run} holds no trained weights")
    return sum(_numel(p) for p in files), sum(p.stat().st_size for p in run.rglob("*")
                                              if p.is_file() and "checkpoints" not in p.parts and p.suffix != ".jsonl")


def cell_settings(method: str, steps: int, evaluate_kwargs: dict, encoders, learning_rate: float | None,
                  s1_intervals: str | None = None, base_fingerprint: str | None = None) -> dict:
    """What makes two runs of one cell comparable (the floor has no training, so no lr or steps); the base by its
    content, so that a folder resumed after the model changed (a new embedded default) is refused, not mixed."""
    settings = {k: evaluate_kwargs[k] for k in ("prompts", "images_per_prompt", "num_inference_steps", "seed")}
    settings["base_fingerprint"] = base_fingerprint
    settings.update(subject_encoder=encoders[0].name, clip_encoder=encoders[1].name)
    if method != FLOOR:
        settings.update(max_train_steps=steps,
                        learning_rate=DEFAULT_LR[method] if learning_rate is None else learning_rate)
    if method == "s1":
        settings["s1_intervals"] = s1_intervals
    return settings


def _finished(done: Path, settings: dict) -> dict | None:
    if not done.is_file():
        return None
    metrics = json.loads(done.read_text())
    cell = done.parent.parent
    if "settings" not in metrics:
        raise TuneQDMError(f"{cell} was made by an older tuneqdm: use another --out")
    for k, v in settings.items():
        if metrics["settings"].get(k) != v:
            raise TuneQDMError(f"{cell} was made with {k} {metrics['settings'].get(k)!r}, this run asks {v!r}: "
                               f"use another --out or the same settings")
    return metrics


def run_cell(base, subject_dir: Path, method: str, bits: int | None, steps: int, cell: Path, evaluate_kwargs: dict,
             encoders, learning_rate: float | None = None, s1_intervals: str | None = None,
             base_fingerprint: str | None = None) -> dict:
    settings = cell_settings(method, steps, evaluate_kwargs, encoders, learning_rate, s1_intervals, base_fingerprint)
    finished = _finished(cell / "eval" / METRICS, settings)
    if finished is not None:
        return finished
    meta = json.loads((subject_dir / "subject.json").read_text())
    token, class_word = meta["instance_prompt"].split()[1], meta["class"]
    info = {"method": method, "bits": bits, "subject": subject_dir.name, "settings": settings}
    if method == FLOOR:
        source = resolve(base)
        pipe = assemble(source, quantized_denoiser(source, QuantConfig(bits=bits, method="peqa", init="mse")))
        info.update(trainable_params=0, adapter_bytes=0, train_s=0.0, train_peak_mib=None)
    else:
        run = cell / "run"
        cfg = TrainConfig(pretrained_model_name_or_path=base, method=method, bits=bits or 4,
                          instance_data_dir=str(subject_dir), max_train_steps=steps, output_dir=str(run),
                          quiet=is_quiet(),
                          force=True, checkpointing_steps=10**9, learning_rate=settings["learning_rate"],
                          s1_intervals=settings.get("s1_intervals"))
        t0 = time.perf_counter()
        train(cfg)
        log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
        params, size = trained_size(run)
        info.update(trainable_params=params, adapter_bytes=size, train_s=time.perf_counter() - t0,
                    train_peak_mib=max(r["peak_mem_mib"] for r in log))
        pipe = load_pipeline(base, adapter=run)
    info["base"] = base_id(base)
    subject_enc, clip_enc = encoders
    return evaluate(pipe, read_photos(subject_dir), _prompts(evaluate_kwargs, token, class_word),
                    evaluate_kwargs["images_per_prompt"], subject_enc, clip_enc, token, cell / "eval",
                    seed=evaluate_kwargs["seed"], num_inference_steps=evaluate_kwargs["num_inference_steps"],
                    info=info)


def _prompts(kw, token, class_word):
    return evaluation_prompts(kw["prompts"], token, class_word)
