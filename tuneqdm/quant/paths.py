"""Choosing, holding and reporting the sampling path of every quantized layer of a model (the paths themselves:
``tuneqdm.quant.kernels``). Above ``layers``, which uses the kernels, so that neither imports the other back."""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import TuneQDMError
from .kernels import DEFAULT_GRID_BYTES, DYNAMIC_BITS, GRID, INT8, REFERENCE, ActInput, check_kernels
from . import runtime
from .layers import QuantizedLayer

DEFAULT_EXCLUDE = ("conv_in", "conv_out")  # a UNet's input and output layers keep float activations


def set_kernels(model: nn.Module, mode: str) -> None:
    """Choose the sampling path of every quantized layer of ``model``: ``auto`` (the integer path where activations
    are quantized, on the devices where it was measured faster: ``INT8_AUTO_DEVICES``), ``int8`` (the integer path
    wherever it applies) or ``reference`` (rebuild the float weight at every call; simulated activation
    quantization)."""
    check_kernels(mode)
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            m.runtime.install(runtime.KERNELS, mode)


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
        layer.runtime.install(runtime.GRID_BUDGET, budget)
    try:
        yield
    finally:
        for layer in layers:
            layer.runtime.remove(runtime.GRID_BUDGET)
            layer.runtime.remove(runtime.GRID)


class DynamicActivations:
    """Dynamic activation quantization: every quantized layer's ``x ⊙ s_in`` to symmetric int8, one scale per
    token (Linear), pixel (1x1 conv) or sample (k x k conv: it factors out of the im2col integer matmul), computed at
    each call; no calibration. Attention is left in full precision. Sampling takes the integer path where
    ``kernels`` says; training (gradients on) takes it wherever it applies (``train --activation_bits 8``).
    Here, below both ``ptq`` and ``train``, because both install it."""

    def __init__(self, bits: int = DYNAMIC_BITS, exclude=DEFAULT_EXCLUDE):
        if bits != DYNAMIC_BITS:
            raise TuneQDMError(f"dynamic activation quantization is {DYNAMIC_BITS}-bit; got --activation_bits {bits}")
        self.bits, self.exclude, self.enabled = bits, tuple(exclude), True
        self._layers: list[nn.Module] = []

    def params(self, x: torch.Tensor) -> ActInput | None:
        return ActInput("dynamic", self.bits) if self.enabled else None

    def install(self, model: nn.Module) -> DynamicActivations:
        self._layers = [m for name, m in model.named_modules() if name and isinstance(m, QuantizedLayer)
                        and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)]
        if not self._layers:
            raise TuneQDMError("dynamic activation quantization needs a tuneqdm-quantized model: quantize it first")
        for m in self._layers:
            m.runtime.install(runtime.INPUT_QUANTIZER, self)
        return self

    def remove(self) -> None:
        for m in self._layers:
            m.runtime.remove(runtime.INPUT_QUANTIZER)
        self._layers = []
