"""tuneqdm: personalize a diffusion model by training only the quantization scales of its low-bit weights."""

from .errors import TuneQDMError
from .loading import load_pipeline
from .serialization import fingerprint, load_adapter, load_quantized, save_adapter, save_quantized
from .quant.runtime import installed_runtime
from .tuning import (METHODS, QuantConfig, configure_, dequantize_, expert_for_timestep, is_quantized, quantize_,
                     quantize_pretrained, quantized_layers, scale_param_groups, scale_parameters, set_expert,
                     set_timesteps, weight_bytes)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "QuantConfig", "TuneQDMError", "configure_", "dequantize_", "expert_for_timestep", "fingerprint",
    "installed_runtime", "is_quantized", "load_adapter", "load_pipeline", "load_quantized", "quantize_",
    "quantize_pretrained", "quantized_layers", "save_adapter",
    "save_quantized", "scale_param_groups", "scale_parameters", "set_expert", "set_timesteps", "weight_bytes",
]
