"""Asymmetric uniform weight quantizer, one (scale, zero-point) per output channel.

``W ≈ scale ⊙ (q − z)`` with signed integers ``q`` and an integer zero-point ``z`` per output channel. The clipping
range always contains 0, so ``z`` lies inside the integer range and 0 is represented exactly.

Two initialisations:
- ``minmax``: the channel's [min, max].
- ``mse``: Q-Diffusion's init — shrink [min, max] by a factor searched per channel to minimise ‖W − Ŵ‖².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TuneQDMError, either
from .bits import Bits, qrange

INITS = ("minmax", "mse")
MSE_GRID = torch.linspace(1.0, 0.2, 41).tolist()  # clipping ratios tried by the "mse" init
_EPS = 1e-12


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # int8, shape of the weight
    zero_point: torch.Tensor  # int8, (out,)
    scale: torch.Tensor  # float32, (out,)

    def dequantize(self) -> torch.Tensor:
        view = (-1,) + (1,) * (self.q.dim() - 1)
        return (self.q.float() - self.zero_point.float().view(view)) * self.scale.view(view)


def _params_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    qmin, qmax = qrange(bits)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(_EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def _squared_error(w2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   buffer: torch.Tensor) -> torch.Tensor:
    """Per row, ``Σ (w − ŵ)²`` with ``ŵ = (clamp(round(w / s) + z) − z) · s``, every operation in place in ``buffer``:
    the numbers of the out-of-place expression bit for bit, without a weight-sized allocation per operation (41
    candidates x 7 operations for each block the mse init searches)."""
    qmin, qmax = qrange(bits)
    torch.div(w2d, scale[:, None], out=buffer)
    buffer.round_().add_(zero[:, None]).clamp_(qmin, qmax).sub_(zero[:, None]).mul_(scale[:, None])
    return torch.sub(w2d, buffer, out=buffer).pow_(2).sum(dim=1)


@torch.no_grad()
def check_init(init: str) -> str:
    if init not in INITS:
        raise TuneQDMError(f"unknown quantizer init {init!r}: choose {either([repr(i) for i in INITS])}")
    return init


def quantize_weight(weight: torch.Tensor, bits: int, init: str = "minmax") -> QuantizedWeight:
    """Quantize a weight (out, ...) per output channel."""
    Bits(bits)
    check_init(init)
    w2d = weight.detach().reshape(weight.shape[0], -1).float()
    lo = w2d.amin(dim=1).clamp(max=0)
    hi = w2d.amax(dim=1).clamp(min=0)
    scale, zero = _params_for_range(lo, hi, bits)
    if init == "mse":
        buffer = torch.empty_like(w2d)  # one buffer for every candidate
        best = _squared_error(w2d, scale, zero, bits, buffer)
        for ratio in MSE_GRID[1:]:
            s, z = _params_for_range(lo * ratio, hi * ratio, bits)
            err = _squared_error(w2d, s, z, bits, buffer)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(w2d / scale[:, None]) + zero[:, None], qmin, qmax)
    return QuantizedWeight(q.to(torch.int8).view(weight.shape), zero.to(torch.int8), scale.float())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference - approx).float().pow(2).sum()
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise.clamp_min(1e-30)))
