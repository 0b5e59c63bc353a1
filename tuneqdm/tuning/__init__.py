"""Methods as configuration, timestep routing, and ``quantize_``."""

from .config import METHODS, QuantConfig
from .model import (configure_, dequantize_, is_quantized, quantize_, quantized_layers, scale_param_groups,
                    scale_parameters, set_expert, set_timesteps, weight_bytes)
from .routing import expert_for_timestep
from .streaming import quantize_pretrained
