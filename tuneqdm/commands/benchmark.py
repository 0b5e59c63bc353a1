"""``tuneqdm benchmark fidelity``: train and evaluate every (method, bits, subject) and write the table over subjects
(``tuneqdm.benchmarks.fidelity`` owns the cells, their folders and the table); resumable and shardable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneQDMError
from ..files import check_writable
from ..options import QUIET_HELP, option
from ..progress import quiet_while
from ..quant.bits import SUPPORTED_BITS, Bits
from ..quant.kernels import DYNAMIC_BITS, DYNAMIC_CHOICES, FLOAT_BITS
from ..train.config import DEFAULT_STEPS, METHOD_CHOICES
from .evaluate import CLIP_ID, DINO_ID, EVALUATORS


@dataclass
class BenchmarkFidelityConfig:
    """The ``tuneqdm benchmark fidelity`` settings; each field is its flag."""

    subjects: str = option("0-9", "toy subject seeds, e.g. 0-9 or 0,3,5 (default 0-9)")
    methods: str = option("fp,peqa,tuneqdm,floor", "comma-separated: fp, lora, qlora, peqa, tuneqdm, mcsu, tas, s1, "
                                                   "floor (the untuned quantized model)")
    bits: list[int] = option(default_factory=lambda: [4], type=int, nargs="+", choices=SUPPORTED_BITS)
    s1_intervals: str | None = option(None, "the timesteps S1 trains on, e.g. 0-250 (method s1 only)")
    activation_bits: int = option(FLOAT_BITS, "the quantized methods train with --activation_bits 8 (int8 "
                                  "activations; cells <method>-w<bits>a8) or 16 (float)", choices=DYNAMIC_CHOICES)
    sample_activation_bits: int | None = option(None, "the activations the cells sample with, 8 or 16 (default: "
                                                "as they trained; cells sampled otherwise are named ...-sa<bits>)",
                                                choices=DYNAMIC_CHOICES)
    max_train_steps: int = option(DEFAULT_STEPS)
    learning_rate: list[str] = option(default_factory=list, nargs="+", metavar="METHOD=LR",
                                      help="per-method learning rates, e.g. fp=1e-4 tuneqdm=5e-3 (default: each "
                                           "method's own)")
    pretrained_model_name_or_path: str | None = option(None, "default: the embedded toy pipeline")
    prompts: str = option("toy", "dreambooth-object, dreambooth-live, toy or a file")
    images_per_prompt: int = option(4)
    num_inference_steps: int = option(25)
    seed: int = option(0)
    evaluator: str = option("toy", choices=EVALUATORS)
    dino_id: str = option(DINO_ID)
    clip_id: str = option(CLIP_ID)
    shard: str = option("0/1", "i/n: run every n-th cell starting at i (one per process)")
    out: str = option("fidelity")
    table_only: bool = option(False, "train nothing: write the table of --out's finished cells (e.g. W4 ablations "
                                     "beside W4/W8)")
    quiet: bool = option(False, QUIET_HELP)

    def __post_init__(self):
        self.bits = [Bits(b) for b in self.bits]


def run_benchmark_fidelity(config: BenchmarkFidelityConfig) -> dict:
    """Run this shard's unfinished cells (none with ``table_only``) and write the table; returns it."""
    from ..benchmarks import fidelity
    from ..toy.subjects import parse_seeds

    methods = _methods(config.methods)
    shard, shards = _shard(config.shard)
    lrs = _method_lrs(config.learning_rate, methods)
    out = Path(config.out)
    with quiet_while(config.quiet):
        if config.table_only:
            return _table_only(config, methods, out)
        if ("s1" in methods) != bool(config.s1_intervals):
            raise TuneQDMError("--methods s1 needs --s1_intervals (e.g. 0-250), and --s1_intervals needs s1 in "
                               "--methods")
        check_writable(out)  # before the first cell trains
        subjects = fidelity.write_subjects(out, parse_seeds(config.subjects))
        encoders = _encoders(config)
        kw = {"prompts": config.prompts, "images_per_prompt": config.images_per_prompt,
              "num_inference_steps": config.num_inference_steps, "seed": config.seed}
        total = fidelity.denoiser_parameters(config.pretrained_model_name_or_path)
        todo = fidelity.cells(methods, config.bits, subjects)[shard::shards]
        acts = _activations(config, methods)
        fidelity.run_cells(out, config.pretrained_model_name_or_path, todo, config.max_train_steps, kw, encoders, lrs,
                           config.s1_intervals, acts)
        result = fidelity.table(out, methods, config.bits, subjects, total, acts)
    print(f"table: {out / 'fidelity.md'}")
    return result


def _methods(text: str) -> list[str]:
    from ..benchmarks.fidelity import FLOOR

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in (*METHOD_CHOICES, FLOOR):
            raise TuneQDMError(f"unknown method {m!r} in --methods: choose from {', '.join((*METHOD_CHOICES, FLOOR))}")
    return methods


def _activations(config: BenchmarkFidelityConfig, methods: list[str]) -> tuple[int, int]:
    """(training, sampling) activation bits of this run's cells; int8 ones only for quantized methods."""
    acts = (config.activation_bits, config.sample_activation_bits or config.activation_bits)
    unquantized = [m for m in methods if m in ("fp", "lora")]
    if acts != (FLOAT_BITS, FLOAT_BITS) and unquantized:
        raise TuneQDMError(f"--activation_bits / --sample_activation_bits {DYNAMIC_BITS} apply to quantized methods: "
                           f"run {', '.join(unquantized)} in a benchmark of their own")
    from ..benchmarks.fidelity import FLOOR

    if config.activation_bits != FLOAT_BITS and FLOOR in methods:
        raise TuneQDMError("--activation_bits 8: the floor trains nothing; give it --sample_activation_bits 8 instead")
    return acts


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        raise TuneQDMError(f"--shard {text!r}: write i/n with 0 <= i < n, e.g. 0/2") from None
    return shard, shards


def _method_lrs(entries, methods) -> dict[str, float]:
    from ..benchmarks.fidelity import FLOOR

    lrs = {}
    for entry in entries:
        method, _, value = entry.partition("=")
        try:
            lrs[method] = float(value)
        except ValueError:
            raise TuneQDMError(f"--learning_rate {entry!r}: write METHOD=LR, e.g. fp=1e-4") from None
        if method not in methods or method == FLOOR:
            raise TuneQDMError(f"--learning_rate {entry!r}: {method!r} is not a trained method of --methods")
    return lrs


def _encoders(config: BenchmarkFidelityConfig):
    if config.evaluator == "toy":
        from ..toy.evaluators import load_toy_clip, load_toy_dino

        return load_toy_dino(), load_toy_clip()
    from ..eval.real import ClipEncoder, DinoEncoder

    return DinoEncoder(config.dino_id), ClipEncoder(config.clip_id)


def _table_only(config: BenchmarkFidelityConfig, methods: list[str], out: Path) -> dict:
    """The table of the finished cells of every (method, bits) asked for, missing ones left out; nothing trains."""
    from ..benchmarks import fidelity
    from ..toy.subjects import parse_seeds

    if not (out / "cells").is_dir():
        raise TuneQDMError(f"--table_only: {out} holds no finished cells; run the benchmark into it first")
    check_writable(out)
    subjects = [f"s{seed}" for seed in parse_seeds(config.subjects)]
    result = fidelity.table(out, methods, config.bits, subjects,
                            fidelity.denoiser_parameters(config.pretrained_model_name_or_path),
                            _activations(config, methods))
    print(f"table: {out / 'fidelity.md'} ({len(result['rows'])} rows)")
    return result

