"""Every command as a Python call: one ``XConfig`` dataclass (each field is the command's flag, with its default and
help; ``tuneqdm.options``) and one ``run_x(config)`` per command. The CLI only parses into these and dispatches.

This layer sits just below ``tuneqdm.cli`` because ``generate`` and ``evaluate`` combine packages of one layer that
may not import each other (``ptq``'s activation calibration, ``train``'s subject data, ``eval``); each run function
checks its config and calls the package that owns the work."""

from .benchmark import BenchmarkFidelityConfig, run_benchmark_fidelity
from .demo import DemoConfig, run_demo
from .evaluate import EvaluateConfig, run_evaluate
from .export import ExportConfig, run_export
from .generate import GenerateConfig, run_generate
from .quantize import QuantizeConfig, run_quantize
from .quantize_activations import QuantizeActivationsConfig, run_quantize_activations
from .report import ReportConfig, run_report
from .toy import ToyScenesConfig, ToySubjectConfig, run_toy_scenes, run_toy_subject
from .train import TrainConfig, run_train

__all__ = ["BenchmarkFidelityConfig", "DemoConfig", "EvaluateConfig", "ExportConfig", "GenerateConfig",
           "QuantizeActivationsConfig", "QuantizeConfig", "ReportConfig", "ToyScenesConfig", "ToySubjectConfig",
           "TrainConfig", "run_benchmark_fidelity", "run_demo", "run_evaluate", "run_export", "run_generate",
           "run_quantize", "run_quantize_activations", "run_report", "run_toy_scenes", "run_toy_subject",
           "run_train"]
