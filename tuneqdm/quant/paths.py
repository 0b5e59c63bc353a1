"""Choosing, holding and reporting the sampling path of every quantized layer of a model (the paths themselves:
``tuneqdm.quant.kernels``). Above ``layers``, which uses the kernels, so that neither imports the other back."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .kernels import DEFAULT_GRID_BYTES, GRID, INT8, REFERENCE, check_kernels
from .layers import QuantizedLayer


def set_kernels(model: nn.Module, mode: str) -> None:
    """Choose the sampling path of every quantized layer of ``model``: ``auto`` (the integer path where activations
    are quantized, on the devices where it was measured faster: ``INT8_AUTO_DEVICES``), ``int8`` (the integer path
    wherever it applies) or ``reference`` (rebuild the float weight at every call; simulated activation
    quantization)."""
    check_kernels(mode)
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            m.kernels = mode


def kernel_report(model: nn.Module) -> dict[str, int]:
    """How many quantized layers took each path in their last call (layers not called yet are left out)."""
    counts = {INT8: 0, GRID: 0, REFERENCE: 0}
    for m in model.modules():
        if isinstance(m, QuantizedLayer) and m.last_path is not None:
            counts[m.last_path] += 1
    return counts


@contextmanager
def sampling_kernels(model: nn.Module, grid_bytes: int = DEFAULT_GRID_BYTES):
    """Hold the layers' integers unpacked as int8 (up to ``grid_bytes``) while no gradient is recorded; freed on
    exit. Layers in ``reference`` mode hold nothing; an inner call inside an outer one keeps the outer budget."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer) and m.kernels != "reference"]
    if any(layer.grid_budget is not None for layer in layers):
        yield
        return
    budget = [grid_bytes]
    for layer in layers:
        layer.grid_budget = budget
    try:
        yield
    finally:
        for layer in layers:
            layer.grid_budget, layer.grid = None, None
