"""The ``tuneqdm`` command: it parses the flags into the command's config (``tuneqdm.commands``: every flag is a
config field, its default and help declared there once) and calls its run function. Every user-facing failure is
one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from . import commands as c
from .errors import TrainWarning, TuneQDMError, TuneQDMWarning
from .options import add_options, settings
from .progress import is_quiet, set_quiet


def train_settings(args: argparse.Namespace) -> dict:
    """The train flags as TrainConfig's keyword arguments: every flag is a field (TrainConfig refuses any other
    key, so a flag without a field fails loudly instead of being dropped; tests/test_settings.py checks parity)."""
    return settings(args)


# one function per command, each the command's run function on the config its flags make
def _train(args) -> None:
    c.run_train(c.TrainConfig(**train_settings(args)))


def _generate(args) -> None:
    c.run_generate(c.GenerateConfig(**settings(args)))


def _evaluate(args) -> None:
    c.run_evaluate(c.EvaluateConfig(**settings(args)))


def _quantize(args) -> None:
    c.run_quantize(c.QuantizeConfig(**settings(args)))


def _quantize_activations(args) -> None:
    c.run_quantize_activations(c.QuantizeActivationsConfig(**settings(args)))


def _benchmark_fidelity(args) -> None:
    c.run_benchmark_fidelity(c.BenchmarkFidelityConfig(**settings(args)))


def _report(args) -> None:
    c.run_report(c.ReportConfig(**settings(args)))


def _export(args) -> None:
    c.run_export(c.ExportConfig(**settings(args)))


def _demo(args) -> None:
    c.run_demo(c.DemoConfig(**settings(args)))


def _toy_subject(args) -> None:
    c.run_toy_subject(c.ToySubjectConfig(**settings(args)))


def _toy_scenes(args) -> None:
    c.run_toy_scenes(c.ToyScenesConfig(**settings(args)))


class _Parser(argparse.ArgumentParser):
    """Every option's help ends with its default (subcommands inherit the class), unless the help already names
    which default applies; an option without a default says "none"."""

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs != 0 and not action.required and action.help is not argparse.SUPPRESS:
            text = action.help or ""
            if "default" not in text.lower():
                shown = "none" if action.default is None else "%(default)s"
                action.help = f"{text} (default: {shown})" if text else f"default: {shown}"
        return action


def _command(sub, name: str, config: type, func, **parser_kwargs) -> argparse.ArgumentParser:
    """A subcommand whose flags are ``config``'s fields and whose action is ``func``."""
    parser = sub.add_parser(name, **parser_kwargs)
    add_options(parser, config)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuneqdm", description="Quantized diffusion personalization by scale tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _command(sub, "demo", c.DemoConfig, _demo,
             help="quantize a tiny model, train its scales, save, reload and sample")
    _command(sub, "train", c.TrainConfig, _train,
             help="personalize a model on a few photos (DreamBooth; diffusers' flag names)",
             description="DreamBooth on a quantized model: only the quantization scales train (--method tuneqdm, "
                         "peqa, mcsu, tas, s1), LoRA on the same quantized UNet (qlora), or the fp/lora baselines.")
    _command(sub, "quantize", c.QuantizeConfig, _quantize,
             help="post-training quantization: a calibrated quantized base (Q-Diffusion)",
             description="Quantize the UNet's weights with timestep-aware calibration data (the fp pipeline's "
                         "denoiser inputs at uniformly spaced DDIM steps, with classifier-free guidance) and write a "
                         "quantized base for train/generate --quantized_base.")
    _command(sub, "export", c.ExportConfig, _export,
             help="a trained result as LoRA files (diffusers, kohya) or a merged checkpoint",
             description="Export a `tuneqdm train` result for other tools: --to lora writes each quantized layer's "
                         "personalization delta (tuned minus base dequantized weight) as a LoRA by truncated SVD (one "
                         "file per timestep expert, a schedule and a merged file); --to checkpoint merges the scales "
                         "into a float diffusers model folder; --to quantized keeps a PEQA-style model's integers in "
                         "optimum-quanto's format. docs/export.md says what each holds.")
    _command(sub, "generate", c.GenerateConfig, _generate,
             help="sample a pipeline (the embedded default unless a model is named)")
    _command(sub, "quantize-activations", c.QuantizeActivationsConfig, _quantize_activations,
             help="calibrate DGQ activation quantization (written next to a quantized base)")
    _command(sub, "evaluate", c.EvaluateConfig, _evaluate,
             help="DreamBooth metrics (DINO, CLIP-I, CLIP-T) of a model on a subject, or --metric fid (PTQ fidelity "
                  "on the toy world)")
    bench = sub.add_parser("benchmark", help="benchmarks over subjects, methods and bit widths")
    bench_sub = bench.add_subparsers(dest="benchmark_command", required=True)
    _command(bench_sub, "fidelity", c.BenchmarkFidelityConfig, _benchmark_fidelity,
             help="train and evaluate every (method, bits, subject); resumable")
    _command(sub, "report", c.ReportConfig, _report,
             help="one self-contained HTML page of an evaluation or a fidelity benchmark")
    toy = sub.add_parser("toy", help="the procedural toy world: personal subjects and captioned scenes")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    _command(toy_sub, "subject", c.ToySubjectConfig, _toy_subject,
             help="write a personal subject: 4-6 photos and subject.json")
    _command(toy_sub, "scenes", c.ToyScenesConfig, _toy_scenes,
             help="write a grid of random scenes; prints their captions, row by row")
    return parser


@contextlib.contextmanager
def _one_line_warnings():
    """tuneqdm's data warnings as one line each (``tuneqdm: warning: ...``) during one CLI call; other warnings as
    Python shows them. ``catch_warnings`` gives the previous ``showwarning`` back on exit, so a program that calls
    ``main`` keeps its own."""

    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (TrainWarning, TuneQDMWarning)):
                print(f"tuneqdm: warning: {message}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show  # the documented hook, replaced inside catch_warnings only
        yield


def main(argv: list[str] | None = None) -> int:
    # transformers warns on import that torchvision is missing (it falls back to PIL, which is all we need)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    quiet_before = is_quiet()
    set_quiet(quiet_before or getattr(args, "quiet", False))
    try:
        with _one_line_warnings():  # each run function holds the folder it writes (files.writes_to)
            args.func(args)
    except TuneQDMError as e:
        print(f"tuneqdm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # exit status 128 + signal: 130 for Ctrl-C, 143 for SIGTERM (training)
        status = getattr(e, "exit_status", 130)
        word = "terminated" if status == 143 else "interrupted"
        print(f"tuneqdm: {word}{' ' + str(e) if str(e) else ''}", file=sys.stderr)
        return status
    finally:
        set_quiet(quiet_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
