"""Timestep routing: which scale set (expert) each sample of a batch uses.

TAS gives expert ``k = min(floor(t·K/T), K−1)`` to a sample at timestep ``t`` (``T`` = the scheduler's
``num_train_timesteps``). The S1 strategy uses its one tuned set (index 0) inside chosen intervals and the original
quantization scales (index -1) elsewhere. A forward pre-hook on the denoiser reads its ``timestep`` argument, so a
plain ``unet(x, t, emb)`` routes every sample by its own ``t`` in training and in any diffusers pipeline. A denoiser
whose ``timestep`` is not in training-timestep units (sigma, 1 - sigma, t·scale) is routed by its family's
conversion back to them (``tuneqdm.families.training_timesteps``): one rule for every architecture, in training and in
sampling alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import training_timesteps
from ..errors import TuneQDMError
from ..hooks import CallArguments, on_timestep
from .config import QuantConfig

BASE = -1  # route index meaning "the original quantization scales" (S1 outside its intervals)


def expert_for_timestep(t: torch.Tensor, experts: int, num_train_timesteps: int) -> torch.Tensor:
    """Per-sample expert index ``min(floor(t·K/T), K−1)`` (clamped at 0 for t < 0)."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
    return torch.floor(t * experts / num_train_timesteps).long().clamp_(0, experts - 1)


def s1_route(t: torch.Tensor, intervals) -> torch.Tensor:
    """0 where ``t`` falls in one of the half-open ``intervals`` [a, b), else ``BASE``."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
    inside = torch.zeros_like(t, dtype=torch.bool)
    for a, b in intervals:
        inside |= (t >= a) & (t < b)
    return torch.where(inside, 0, BASE).long()


@dataclass
class Route:
    """The routing of one forward call: an expert index per sample, grouped for a cheap per-sample gather."""

    experts: list[int]
    groups: list[int] = field(init=False)  # sorted distinct expert indices present in the batch
    _index: torch.Tensor = field(init=False)  # sample -> position in ``groups``
    _on_device: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.groups = sorted(set(self.experts))
        self._index = torch.tensor([self.groups.index(e) for e in self.experts], dtype=torch.long)

    @property
    def uniform(self) -> bool:
        return len(self.groups) == 1

    def members(self, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The samples of each expert in ``groups`` (index tensors), and the permutation that puts the
        concatenated per-expert outputs back in batch order."""
        if device not in self._on_device:
            members = [torch.nonzero(self._index == g).flatten() for g in range(len(self.groups))]
            inverse = torch.argsort(torch.cat(members))
            self._on_device[device] = ([m.to(device) for m in members], inverse.to(device))
        return self._on_device[device]


class Router:
    """Shared by every quantized layer of a model; holds the current :class:`Route`. K, T and S1's intervals are
    read from the model's ``QuantConfig`` (the one place they are held; ``configure_`` hands over a new one)."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.route: Route | None = None

    @property
    def experts(self) -> int:
        return self.config.experts

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def intervals(self) -> tuple[tuple[int, int], ...]:
        return self.config.intervals

    def route_timesteps(self, t, batch_size: int | None = None) -> Route:
        t = torch.as_tensor(t)
        if self.intervals:
            idx = s1_route(t, self.intervals)
        else:
            idx = expert_for_timestep(t, self.experts, self.num_train_timesteps)
        if batch_size is not None and idx.numel() == 1 and batch_size != 1:
            idx = idx.expand(batch_size)
        elif batch_size is not None and idx.numel() != batch_size:
            raise TuneQDMError(
                f"got {idx.numel()} timesteps for a batch of {batch_size}: pass one timestep or one per sample"
            )
        self.route = Route(idx.tolist())
        return self.route

    def set_experts(self, experts: list[int]) -> Route:
        """Route by expert index directly (e.g. to run one expert on a whole batch)."""
        self.route = Route(list(experts))
        return self.route


def install_timestep_hook(model: torch.nn.Module, router: Router):
    """Route by the ``timestep`` argument of ``model.forward`` (in training timesteps, see
    ``tuneqdm.families.training_timesteps``); returns the hook handle (None if it has none)."""

    def route(t, call: CallArguments) -> None:
        if t is None:
            router.route = None
            return
        t = training_timesteps(model, torch.as_tensor(t).detach().to("cpu", torch.float64))
        sample = call.get("sample", "hidden_states", "x")
        if sample is None and call.args:
            sample = call.args[0]
        router.route_timesteps(t, sample.shape[0] if torch.is_tensor(sample) else None)

    return on_timestep(model, route)
