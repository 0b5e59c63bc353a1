"""tuneqdm: personalize a diffusion model by training only the quantization scales of its low-bit weights."""

from .errors import TuneQDMError
from .loading import load_pipeline
from .serialization import fingerprint, load_adapter, load_quantized, save_adapter, save_quantized
from .quant.runtime import installed_runtime
from .tuning import (METHODS, QuantConfig, configure_, dequantize_, expert_for_timestep, is_quantized, quantize_,
                     quantize_pretrained, quantized_layers, scale_param_groups, scale_parameters, set_expert,
                     set_timesteps, weight_bytes)

from .quant.bits import Bits

__version__ = "0.1.0"

# every command as a Python call (tuneqdm.commands): imported on first use, so `import tuneqdm` stays as light as the
# library's core (the commands pull in training, calibration and evaluation)
COMMANDS = (
    "BenchmarkFidelityConfig", "DemoConfig", "EvaluateConfig", "ExportConfig", "GenerateConfig",
    "QuantizeActivationsConfig", "QuantizeConfig", "ReportConfig", "ToyScenesConfig", "ToySubjectConfig",
    "TrainConfig", "run_benchmark_fidelity", "run_demo", "run_evaluate", "run_export", "run_generate",
    "run_quantize", "run_quantize_activations", "run_report", "run_toy_scenes", "run_toy_subject", "run_train",
)


def __getattr__(name: str):
    if name in COMMANDS:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'tuneqdm' has no attribute {name!r}")

__all__ = [
    *COMMANDS, "Bits", "METHODS", "QuantConfig", "TuneQDMError", "configure_", "dequantize_", "expert_for_timestep", "fingerprint",
    "installed_runtime", "is_quantized", "load_adapter", "load_pipeline", "load_quantized", "quantize_",
    "quantize_pretrained", "quantized_layers", "save_adapter",
    "save_quantized", "scale_param_groups", "scale_parameters", "set_expert", "set_timesteps", "weight_bytes",
]
