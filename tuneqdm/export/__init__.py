"""``tuneqdm export``: a trained result as LoRA files other tools load (diffusers, kohya), a merged diffusers
checkpoint (and its original single-file layout), a quanto model folder, and the per-step switch of exported timestep
experts."""

from .checkpoint import export_checkpoint, merge_
from .deltas import layer_delta, low_rank, route_weights
from .lora import export_lora
from .quantized import export_quantized
from .schedule import use_lora_experts

__all__ = ["export_checkpoint", "export_lora", "export_quantized", "layer_delta", "low_rank", "merge_",
           "route_weights", "use_lora_experts"]
