"""What a scale adapter changes in each weight, and that change as a low-rank product.

A quantized layer's weight for route ``k`` is ``Ŵ_k = diag(s_out[k]) (W_q − z) diag(s_in[k])``; route ``BASE`` (−1)
is the dequantized base with its original scales, ``Ŵ_base = diag(s) (W_q − z)``. The personalization delta of an
expert is ``Δ_k = Ŵ_k − Ŵ_base`` (PEQA: ``diag(s_out − s)(W_q − z)``; MCSU: a full matrix). A LoRA holds it as
``up @ down`` from a truncated SVD, at a fixed rank or at the smallest rank that keeps a fraction of its energy
(``‖Δ‖²_F``, the sum of the squared singular values).

Routes and their weight in a blend: every timestep ``t`` of ``[0, T)`` goes to one route (TAS: expert
``min(floor(t·K/T), K−1)``; S1: the tuned set inside its intervals, the base elsewhere), and a route's blend weight
is the fraction of the timesteps it serves. The blend ``Σ w_k Ŵ_k`` is what a tool that cannot switch weights per
step gets: the time-average of the weights the sampler would use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TuneQDMError
from ..quant.layers import QuantizedLayer
from ..tuning.routing import BASE, expert_for_timestep, s1_route

_FLOAT64_LIMIT = 1 << 22  # deltas up to this many values are factorized in float64 (exact to 1e-12); larger in float32


def route_weights(cfg: dict) -> dict[int, float]:
    """{route: fraction of the training timesteps [0, T) it serves} for an adapter config (``BASE`` included for S1
    when some timesteps keep the original scales); the fractions add up to 1."""
    t = torch.arange(cfg["num_train_timesteps"])
    if cfg["intervals"]:
        routes = s1_route(t, [tuple(i) for i in cfg["intervals"]])
    else:
        routes = expert_for_timestep(t, cfg["experts"], cfg["num_train_timesteps"])
    counts = torch.bincount(routes + 1, minlength=cfg["experts"] + 1)  # index 0 is BASE
    return {k - 1: int(n) / len(t) for k, n in enumerate(counts.tolist()) if n}


def tuned_routes(cfg: dict) -> list[int]:
    """The routes that carry tuned scales (every expert; ``BASE`` carries none)."""
    return [k for k in route_weights(cfg) if k != BASE]


@torch.no_grad()
def route_weight(layer: QuantizedLayer, route: int) -> torch.Tensor:
    """``Ŵ_route`` of one layer (float32, the weight's shape)."""
    return layer.dequantized_weight(route)


@torch.no_grad()
def layer_delta(layer: QuantizedLayer, weights: dict[int, float]) -> torch.Tensor:
    """``Σ_k w_k Ŵ_k − Ŵ_base`` (float32, the weight's shape): one expert's delta for ``{k: 1.0}``, a blend's for
    several (``weights`` add up to 1; ``BASE`` contributes nothing)."""
    tuned = {k: w for k, w in weights.items() if k != BASE and w}
    if not tuned:
        return torch.zeros(layer.weight_shape)
    if list(tuned.values()) == [1.0]:  # one expert: two weight-sized tensors at most
        delta = layer.dequantized_weight(next(iter(tuned)))
    else:
        delta = torch.zeros(layer.weight_shape)
        for k, w in tuned.items():
            delta.add_(layer.dequantized_weight(k), alpha=w)
    return delta.sub_(layer.dequantized_weight(BASE), alpha=sum(tuned.values()))


def full_rank(layer: QuantizedLayer) -> int:
    """The largest rank a delta of this layer can have: min(out, in x kernel)."""
    shape = layer.weight_shape
    return min(shape[0], shape[1:].numel())


@dataclass
class LowRank:
    """``up @ down`` (down: (r, in x kernel), up: (out, r)) holding ``kept`` of the delta's energy ``energy``
    (``‖delta‖²``, the sum of its squared singular values)."""

    down: torch.Tensor
    up: torch.Tensor
    kept: float
    energy: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def check_rank_choice(rank: int | None, energy: float | None) -> None:
    """One line for a rank or an energy that cannot be used (both given, rank <= 0, energy outside (0, 1])."""
    if rank is not None and energy is not None:
        raise TuneQDMError("give --rank or --energy, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise TuneQDMError(f"--rank {rank}: give a positive integer (or --energy E to choose it per layer)")
    if energy is not None and not 0 < energy <= 1:
        raise TuneQDMError(f"--energy {energy}: give a fraction in (0, 1], e.g. 0.9 keeps 90 % of each delta's energy")


@torch.no_grad()
def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank | None:
    """The truncated SVD of ``delta`` (its rows: output channels) at ``rank`` (capped at the full rank) or at the
    smallest rank keeping ``energy`` of ``‖delta‖²``; None for a delta that is exactly zero. The singular values are
    split evenly between the factors (``up = U√S``, ``down = √S Vᵀ``), which keeps both in the range of fp16."""
    matrix = delta.reshape(delta.shape[0], -1)
    dtype = torch.float64 if matrix.numel() <= _FLOAT64_LIMIT else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    energies = s.square()
    total = float(energies.sum())
    if total == 0.0:
        return None
    cumulative = energies.cumsum(0) / total
    if energy is not None:
        r = int(torch.searchsorted(cumulative, torch.tensor(energy * (1 - 1e-12), dtype=dtype))) + 1
    else:
        r = rank
    r = max(1, min(r, len(s)))
    root = s[:r].sqrt()
    return LowRank(down=(root[:, None] * vh[:r]).float().contiguous(), up=(u[:, :r] * root).float().contiguous(),
                   kept=float(cumulative[r - 1]), energy=total)
