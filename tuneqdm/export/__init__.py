"""``tuneqdm export``: a trained result as LoRA files other tools load (diffusers, kohya), a merged diffusers
checkpoint (and its original single-file layout), and the per-step switch of exported timestep experts."""

from .checkpoint import export_checkpoint, merge_
from .deltas import layer_delta, low_rank, route_weights
from .lora import export_lora
from .schedule import use_lora_experts

__all__ = ["export_checkpoint", "export_lora", "layer_delta", "low_rank", "merge_", "route_weights",
           "use_lora_experts"]
