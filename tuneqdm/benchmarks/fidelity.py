"""`tuneqdm benchmark fidelity`: subjects x methods x bits on the same seeds, one cell at a time, resumable; the
table over subjects it writes, which ``tuneqdm report`` reads. The one home of the fidelity benchmark's library part
(the scripts that sweep and compare its runs are ``benchmarks/fidelity_*.py``).

A cell is one (method, bits, subject): ``tuneqdm train`` then ``tuneqdm evaluate``, written to
``OUT/cells/<method>-w<bits>/<subject>/`` (``run/`` and ``eval/``). A cell whose ``eval/metrics.json`` exists is
finished and never redone, so an interrupted benchmark resumes where it stopped; ``--shard i/n`` runs every n-th cell
so that n processes (or GPUs) share the work. ``floor`` is the untuned quantized model (scales at their initial
values); ``fp`` and ``lora`` ignore ``bits``. The table averages over subjects (mean and population std).

Each finished cell records the settings it was made with (learning rate, steps, prompts, images, seeds, evaluators);
resuming with other settings is refused rather than mixing two protocols in one table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from safetensors import safe_open

from ..errors import TuneQDMError
from ..eval.evaluate import METRICS, evaluate, read_photos
from ..eval.prompts import evaluation_prompts
from ..files import write_file_atomically
from ..loading import assemble, base_id, load_pipeline, pipeline_fingerprint, quantized_denoiser, resolve
from ..progress import is_quiet, progress
from ..quant.kernels import FLOAT_BITS
from ..sampling import sample_on_dynamic_activations
from ..train import TrainConfig, train
from ..train.config import DEFAULT_LR
from ..tuning import QuantConfig


FLOOR = "floor"
FLOAT_ACTS = (FLOAT_BITS, FLOAT_BITS)  # (training, sampling) activation bits of a cell: float in both
TABLE_VERSION = 2


# ---- the cells and the table ----------------------------------------------------------------------------------------
def cells(methods, bits, subjects) -> list[tuple[str, int | None, str]]:
    out = []
    for m in methods:
        for b in ([None] if m in ("fp", "lora") else bits):
            for s in subjects:
                out.append((m, b, s))
    return out


def activation_suffix(acts: tuple[int, int] = FLOAT_ACTS) -> str:
    """The cell-name suffix of the activation bits a cell trains and samples with: none for float in both, ``a8``
    for int8 in both (``train --activation_bits 8`` sampled as ``generate`` samples it), ``-sa8`` for float training
    sampled on int8 activations, ``a8-sa16`` the other way round."""
    train_bits, sample_bits = acts
    suffix = "" if train_bits == FLOAT_BITS else f"a{train_bits}"
    return suffix if sample_bits == train_bits else f"{suffix}-sa{sample_bits}"


def cell_name(method: str, bits: int | None, acts: tuple[int, int] = FLOAT_ACTS) -> str:
    return method if bits is None else f"{method}-w{bits}{activation_suffix(tuple(acts))}"


def cell_dir(out: Path, method: str, bits: int | None, subject: str, acts: tuple[int, int] = FLOAT_ACTS) -> Path:
    """A cell's folder: ``run/`` (the training) and ``eval/`` (its evaluation) inside."""
    return out / "cells" / cell_name(method, bits, acts) / subject


def table(out: Path, methods, bits, subjects, total_params: int, acts: tuple[int, int] = FLOAT_ACTS) -> dict:
    """Mean and std over subjects of every finished (method, bits), as JSON and markdown in ``out``."""
    rows = []
    for m in methods:
        for b in ([None] if m in ("fp", "lora") else bits):
            ms = [json.loads(p.read_text()) for s in subjects
                  if (p := cell_dir(out, m, b, s, acts) / "eval" / METRICS).is_file()]
            if not ms:
                continue
            row = {"method": m, "bits": b, "subjects": len(ms)}
            if b is not None and tuple(acts) != FLOAT_ACTS:
                row["activation_bits"] = list(acts)
            for k in ("dino", "clip_i", "clip_t", "train_s"):
                vals = [x[k] for x in ms]
                row[k] = statistics.fmean(vals)
                row[k + "_std"] = statistics.pstdev(vals)
            row["learning_rate"] = ms[0]["settings"].get("learning_rate")
            row["trainable_params"] = ms[0]["trainable_params"]
            row["trainable_fraction"] = ms[0]["trainable_params"] / total_params
            row["adapter_bytes"] = ms[0]["adapter_bytes"]
            peaks = [x["train_peak_mib"] for x in ms if x.get("train_peak_mib") is not None]
            row["train_peak_mib"] = max(peaks) if peaks else None
            rows.append(row)
    result = {"table_version": TABLE_VERSION, "unet_params": total_params, "rows": rows}
    write_file_atomically(out / "fidelity.json", json.dumps(result, indent=1))
    md = ["| method | bits | lr | subjects | DINO | CLIP-I | CLIP-T | trainable | adapter bytes | train s | peak MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pm = lambda k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}"  # noqa: E731
        lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:g}"
        md.append(f"| {r['method']} | {r['bits'] or '-'}{activation_suffix(tuple(r.get('activation_bits', FLOAT_ACTS)))} | {lr} | {r['subjects']} | {pm('dino')} | {pm('clip_i')} | "
                  f"{pm('clip_t')} | {r['trainable_params']:,} ({100 * r['trainable_fraction']:.2f} %) | "
                  f"{r['adapter_bytes']:,} | {r['train_s']:.0f} | "
                  f"{'-' if r['train_peak_mib'] is None else round(r['train_peak_mib'])} |")
    write_file_atomically(out / "fidelity.md", "\n".join(md) + "\n")
    return result


# ---- one cell: train, then evaluate ----------------------------------------------------------------------------------
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
                  s1_intervals: str | None = None, base_fingerprint: str | None = None,
                  acts: tuple[int, int] = FLOAT_ACTS) -> dict:
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
    if tuple(acts) != FLOAT_ACTS:  # only then: cells made before activation variants stay comparable
        settings["activation_bits"] = list(acts)
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
             base_fingerprint: str | None = None, acts: tuple[int, int] = FLOAT_ACTS) -> dict:
    settings = cell_settings(method, steps, evaluate_kwargs, encoders, learning_rate, s1_intervals, base_fingerprint,
                             acts)
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
                          s1_intervals=settings.get("s1_intervals"), activation_bits=acts[0])
        t0 = time.perf_counter()
        train(cfg)
        log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
        params, size = trained_size(run)
        info.update(trainable_params=params, adapter_bytes=size, train_s=time.perf_counter() - t0,
                    train_peak_mib=max(r["peak_mem_mib"] for r in log))
        pipe = load_pipeline(base, adapter=run)
    if acts[1] != FLOAT_BITS:  # as generate samples an adapter trained with --activation_bits 8
        sample_on_dynamic_activations(pipe, acts[1])
    info["base"] = base_id(base)
    subject_enc, clip_enc = encoders
    return evaluate(pipe, read_photos(subject_dir), _prompts(evaluate_kwargs, token, class_word),
                    evaluate_kwargs["images_per_prompt"], subject_enc, clip_enc, token, cell / "eval",
                    seed=evaluate_kwargs["seed"], num_inference_steps=evaluate_kwargs["num_inference_steps"],
                    info=info)


def _prompts(kw, token, class_word):
    return evaluation_prompts(kw["prompts"], token, class_word)


# ---- a whole benchmark: its subjects, its shard of the cells, the table ---------------------------------------------
def subject_dir(out: Path, subject: str) -> Path:
    """A subject's photos and subject.json, written once into the benchmark's folder and shared by its shards."""
    return out / "subjects" / subject


def write_subjects(out: Path, seeds) -> list[str]:
    """The toy subjects of ``seeds`` under ``out/subjects/`` (kept if already written); their names."""
    from ..toy.subjects import write_subject

    names = []
    for seed in seeds:
        folder = subject_dir(out, f"s{seed}")
        if not (folder / "subject.json").is_file():
            try:
                write_subject(seed, folder, force=True)
            except OSError:  # another shard wrote it at the same moment (same seed: the same files)
                if not (folder / "subject.json").is_file():
                    raise
        names.append(folder.name)
    return names


def denoiser_parameters(base) -> int:
    """The denoiser's parameter count, read from its files' headers (no model is built)."""
    from ..shards import parameter_count

    source = resolve(base)
    return parameter_count(source.weight_files(source.denoiser))


def run_cells(out: Path, base, todo, steps: int, evaluate_kwargs: dict, encoders, learning_rates: dict,
              s1_intervals: str | None = None, acts: tuple[int, int] = FLOAT_ACTS) -> None:
    """Train and evaluate every (method, bits, subject) of ``todo`` into its cell, one line per cell on stdout."""
    base_fingerprint = pipeline_fingerprint(resolve(base))
    for i, (m, b, s) in enumerate(progress(todo, desc="benchmark fidelity: cells", unit="cell")):
        r = run_cell(base, subject_dir(out, s), m, b, steps, cell_dir(out, m, b, s, acts), evaluate_kwargs, encoders,
                     learning_rates.get(m), s1_intervals, base_fingerprint, acts)
        print(f"[{i + 1}/{len(todo)}] {cell_name(m, b, acts)} {s}: DINO {r['dino']:.3f} CLIP-I {r['clip_i']:.3f} "
              f"CLIP-T {r['clip_t']:.3f}", flush=True)
