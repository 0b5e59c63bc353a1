"""DGQ activation quantization: fake-quantize the input of every Linear/Conv2d with grouped, per-step parameters.

DGQ (Ryu, Park & Shim, ICLR 2025) keeps activation outliers apart instead of letting them stretch one layer-wide
range. For each layer and each sampling step, from calibration statistics:

1. every *vector* of the input along one dimension gets its (min, max): per **channel** (reduced over the batch and
   the positions) and per **position** (pixel of a conv input, token of a linear input; reduced over the batch and
   the channels);
2. the grouping dimension is the one whose vectors are spread more: ``spread = (max of the maxes − min of the
   maxes) + (max of the mins − min of the mins)`` (the criterion of DGQ's released code); a 2-D linear input
   (batch, features) has channels only;
3. the vectors' (min, max) points are clustered into K groups by K-means (deterministic: centres start at the
   points of evenly spaced rank in the order of their range, Lloyd iterations until no label changes);
4. each group gets the asymmetric uniform quantizer of its members' range ``[min of mins, max of maxes]``:
   ``scale = (hi − lo) / (2^b − 1)``, ``zero_point = round(−lo / scale)``.

K = 1 is the layer-wise min-max baseline. Per-pixel groups quantize the layer's input pixels (before the conv
unfolds them), the natural place for a pre-hook; DGQ's code groups the unfolded patches' positions.

The quantizer is attached with public PyTorch hooks only: a forward pre-hook on each layer replaces its input by
the fake-quantized one, and a forward pre-hook on the denoiser reads its ``timestep`` argument and selects the
parameters of the nearest calibrated timestep (so a sampler with the calibrated schedule uses exactly one parameter
set per step). Works on tuneqdm's quantized layers (W+A) and on plain float layers (A only). Nothing is added to
the model's ``state_dict``; ``remove()`` restores the model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TuneQDMError
from ..hooks import given_timesteps, on_timestep
from ..quant.kernels import ActInput
from ..quant.layers import QuantizedLayer
from ..quant.paths import DynamicActivations  # noqa: F401  (its home is quant: training uses it too)
from ..quant.runtime import INPUT_QUANTIZER
from .attention import QuantizedAttnProcessor, WrappedAttnProcessor
from .config import DEFAULT_EXCLUDE, ActivationConfig

CHANNEL, POSITION = 0, 1
DIM_NAMES = ("channel", "position")


# ---- the uniform quantizer ----------------------------------------------------------------------------------------
def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantizer of the range [lo, hi]: (scale, zero_point), float32."""
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-lo / scale)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, 2^b − 1) − z) · s`` in float32, returned in ``x``'s dtype. Inside the range the
    parameters were fitted to, the error is at most ``s / 2``."""
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, 2**bits - 1)
    return ((q - zero_point) * scale).to(x.dtype)


# ---- grouping -------------------------------------------------------------------------------------------------------
def kmeans(points: torch.Tensor, k: int, iterations: int = 100) -> torch.Tensor:
    """Labels (int64) of ``points`` (N, D) in ``k`` clusters. Deterministic: centres start at the points of evenly
    spaced rank in the order of their extent (last minus first coordinate, i.e. the range of a (min, max) point), so
    the narrowest and the widest vectors seed the first and the last cluster; ties go to the lower cluster."""
    points = points.double()
    n = points.shape[0]
    if k <= 1 or n == 0:
        return torch.zeros(n, dtype=torch.long)
    order = torch.argsort(points[:, -1] - points[:, 0], stable=True)
    picks = torch.round(torch.linspace(0, n - 1, k, dtype=torch.float64)).long()
    centres = points[order[picks]].clone()
    labels = None
    for _ in range(iterations):
        new = (points[:, None, :] - centres[None, :, :]).square().sum(-1).argmin(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return labels


def spread(lo: torch.Tensor, hi: torch.Tensor) -> float:
    """DGQ's spread of a set of vectors' ranges: how far apart their maxima are plus how far apart their minima are."""
    if lo.numel() == 0:
        return float("-inf")
    return float((hi.max() - hi.min()) + (lo.max() - lo.min()))


@dataclass
class Grouping:
    """One layer at one step: the grouping dimension, each vector's group and each group's range."""

    dim: int  # CHANNEL or POSITION
    labels: torch.Tensor  # (n,) int64, n = channels or positions
    lo: torch.Tensor  # (K,) float32
    hi: torch.Tensor  # (K,) float32


def fit_grouping(channel_lo, channel_hi, position_lo, position_hi, groups: int) -> Grouping:
    """DGQ grouping of one layer's input at one step from its per-channel and per-position ranges."""
    use_position = spread(position_lo, position_hi) > spread(channel_lo, channel_hi)
    lo, hi = (position_lo, position_hi) if use_position else (channel_lo, channel_hi)
    lo, hi = lo.float().reshape(-1), hi.float().reshape(-1)
    labels = kmeans(torch.stack([lo, hi], dim=1), groups)
    g_lo = torch.zeros(groups)
    g_hi = torch.zeros(groups)
    for g in range(groups):
        members = labels == g
        if members.any():
            g_lo[g], g_hi[g] = lo[members].min(), hi[members].max()
    return Grouping(POSITION if use_position else CHANNEL, labels, g_lo, g_hi)


# ---- layout of a layer's input ---------------------------------------------------------------------------------------
def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or getattr(module, "channel_dim", None) == 1


def input_ranges(x: torch.Tensor, conv: bool) -> tuple[torch.Tensor, ...]:
    """(channel_lo, channel_hi, position_lo, position_hi) of one input, float32 on the CPU. Positions are the
    pixels of a conv input (B, C, H, W) and the tokens of a linear input (B, ..., C); a 2-D linear input has none."""
    x = x.detach().float()
    if conv:
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        pos = x.reshape(x.shape[0], x.shape[1], -1)
        p_lo, p_hi = pos.amin(dim=(0, 1)), pos.amax(dim=(0, 1))
    else:
        per_channel = x.reshape(-1, x.shape[-1]).T
        if x.dim() > 2:
            pos = x.reshape(x.shape[0], -1, x.shape[-1])
            p_lo, p_hi = pos.amin(dim=(0, 2)), pos.amax(dim=(0, 2))
        else:
            p_lo = p_hi = torch.empty(0)
    return per_channel.amin(1).cpu(), per_channel.amax(1).cpu(), p_lo.cpu(), p_hi.cpu()


def _vector_shape(x: torch.Tensor, conv: bool, dim: int) -> tuple[int, ...]:
    """How a per-channel or per-position vector broadcasts against ``x``."""
    if dim == CHANNEL:
        return (1, x.shape[1], *[1] * (x.dim() - 2)) if conv else (*[1] * (x.dim() - 1), x.shape[-1])
    return (1, 1, *x.shape[2:]) if conv else (1, *x.shape[1:-1], 1)


def _positions(x: torch.Tensor, conv: bool) -> int:
    return x.shape[2:].numel() if conv else x.shape[1:-1].numel()


# ---- per-step parameters of one layer --------------------------------------------------------------------------------
@dataclass
class LayerParams:
    """A layer's DGQ parameters for every calibrated step (stacked along dim 0)."""

    conv: bool
    dims: torch.Tensor  # (S,) int8: CHANNEL or POSITION
    channel_labels: torch.Tensor  # (S, C) uint8 (zeros where the step groups positions)
    position_labels: torch.Tensor  # (S, P) uint8 (zeros where the step groups channels; P = 0 for 2-D inputs)
    lo: torch.Tensor  # (S, K) float32
    hi: torch.Tensor  # (S, K) float32
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_groupings(cls, conv: bool, groupings: list[Grouping], channels: int, positions: int) -> LayerParams:
        s = len(groupings)
        c_labels = torch.zeros(s, channels, dtype=torch.uint8)
        p_labels = torch.zeros(s, positions, dtype=torch.uint8)
        for i, g in enumerate(groupings):
            (c_labels if g.dim == CHANNEL else p_labels)[i] = g.labels.to(torch.uint8)
        return cls(conv, torch.tensor([g.dim for g in groupings], dtype=torch.int8), c_labels, p_labels,
                   torch.stack([g.lo for g in groupings]), torch.stack([g.hi for g in groupings]))

    def act_input(self, step: int, x: torch.Tensor, bits: int, name: str) -> ActInput:
        """The integer path's description of ``step``'s quantizer (channel groups carry their labels)."""
        scale, zero = self.vectors(step, x, bits, name)
        if int(self.dims[step]) == POSITION:
            return ActInput("position", bits, scale.reshape(-1), zero.reshape(-1))
        key = ("groups", step, bits, x.device)
        if key not in self._cache:
            g_scale, g_zero = uniform_params(self.lo[step], self.hi[step], bits)
            self._cache[key] = (self.channel_labels[step].long().to(x.device), g_scale, g_zero)
        labels, g_scale, g_zero = self._cache[key]
        return ActInput("channel", bits, scale.reshape(-1), zero.reshape(-1), labels, g_scale, g_zero)

    def vectors(self, step: int, x: torch.Tensor, bits: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-vector (scale, zero_point) of ``step``, shaped to broadcast against ``x`` (cached)."""
        dim = int(self.dims[step])
        if dim == POSITION and _positions(x, self.conv) != self.position_labels.shape[1]:
            raise TuneQDMError(
                f"layer {name!r}: activations were calibrated at {self.position_labels.shape[1]} positions per "
                f"sample, this input has {_positions(x, self.conv)}: calibrate at the resolution you sample at"
            )
        key = (step, bits, x.device, tuple(x.shape[1:]))
        if key not in self._cache:
            labels = (self.channel_labels if dim == CHANNEL else self.position_labels)[step].long()
            scale, zero = uniform_params(self.lo[step], self.hi[step], bits)
            shape = _vector_shape(x, self.conv, dim)
            self._cache[key] = (scale[labels].reshape(shape).to(x.device), zero[labels].reshape(shape).to(x.device))
        return self._cache[key]


# ---- timestep -> step -------------------------------------------------------------------------------------------
def nearest_steps(t, timesteps: torch.Tensor) -> list[int]:
    """Per-sample index of the calibrated timestep nearest to ``t`` (ties: the earlier step)."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
    return (t[:, None] - timesteps[None, :].double()).abs().argmin(dim=1).tolist()


def select_layers(model: nn.Module, exclude=DEFAULT_EXCLUDE) -> dict[str, nn.Module]:
    """The Linear/Conv2d layers (float or tuneqdm-quantized) whose inputs are quantized, by name."""
    return {
        name: m for name, m in model.named_modules()
        if name and isinstance(m, (nn.Linear, nn.Conv2d, QuantizedLayer))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules holding an attention processor, by the processor's name as diffusers' ``attn_processors`` names
    it; found module by module, as diffusers' ``set_attn_processor`` finds them, so that a transformer without that
    registry (Z-Image's) has its attention quantized too."""
    return {f"{name}.processor": m for name, m in model.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None}


def _set_processors(model: nn.Module, processors) -> None:
    """Give every attention module of ``model`` ``processors`` (one for all, or a dict by processor name)."""
    for name, m in _attention_modules(model).items():
        m.set_processor(processors[name] if isinstance(processors, dict) else processors)


class ActivationQuantizer:
    """Calibrated DGQ parameters of a model, and the hooks that apply them.

    ``timesteps``: the calibrated timesteps (one parameter set each); ``layers``: :class:`LayerParams` by layer name.
    ``install(model)`` attaches the pre-hooks and the attention processors; ``enabled = False`` runs the model in
    full precision without removing anything; ``set_step(i)`` selects a step by hand for models without a
    ``timestep`` argument.
    """

    def __init__(self, config: ActivationConfig, timesteps, layers: dict[str, LayerParams], info: dict | None = None):
        self.config = config
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        self.layers = layers
        self.info = dict(info or {})
        self.enabled = True
        self.steps: list[int] | None = None
        self._handles: list = []
        self._inputs: list[nn.Module] = []  # quantized layers given an input quantizer
        self._model: nn.Module | None = None
        self._processors = None
        self.skipped_attention: set[str] = set()  # wrapped processors that computed no quantizable attention

    # -- routing
    def set_step(self, step: int) -> None:
        if not 0 <= step < len(self.timesteps):
            raise TuneQDMError(f"step {step} does not exist: the activations have steps 0..{len(self.timesteps) - 1}")
        self.steps = [step]

    def route(self, t) -> list[int]:
        self.steps = nearest_steps(t, self.timesteps)
        return self.steps

    # -- hooks
    def install(self, model: nn.Module, family=None) -> ActivationQuantizer:
        """Attach to ``model``; ``family`` (``tuneqdm.families.family(pipe)``; None: a UNet) says how its attention
        is quantized."""
        if self._model is not None:
            raise TuneQDMError("these activation parameters are already installed on a model: remove() them first")
        found = select_layers(model, self.config.exclude)
        if set(found) != set(self.layers):
            odd = sorted(set(found) ^ set(self.layers))
            raise TuneQDMError(f"the activation parameters do not match this model's layers (e.g. {odd[:3]}): "
                               "calibrate them on this model")
        handle = on_timestep(model, given_timesteps(self.route))
        self._handles += [handle] if handle is not None else []
        for name, module in found.items():
            if isinstance(module, QuantizedLayer):  # the layer quantizes its input itself (integer path or fake)
                module.runtime.install(INPUT_QUANTIZER, _LayerInput(self, name, self.layers[name]))
                self._inputs.append(module)
            else:
                self._handles.append(module.register_forward_pre_hook(self._layer_hook(name, self.layers[name])))
        if self.config.attention != "none":
            self._processors = {name: m.processor for name, m in _attention_modules(model).items()} or None
        if self._processors is not None:
            _set_processors(model, self._attention_processors(family))
        self._model = model
        return self

    def _attention_processors(self, family):
        """A UNet's processors are replaced by the quantized ``AttnProcessor`` (its ``<start>`` is cross-attention's key
        0); any other denoiser's are wrapped, keeping their own computation (see ``WrappedAttnProcessor``)."""
        bits, mode = self.config.bits, self.config.attention
        if family is None or family.own_attention:
            return QuantizedAttnProcessor(bits, mode, owner=self)
        return {name: WrappedAttnProcessor(p, name, bits, mode, self, family.start_token, family.text_last)
                for name, p in self._processors.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for module in self._inputs:
            module.runtime.remove(INPUT_QUANTIZER)
        self._handles, self._inputs = [], []
        if self._processors is not None and self._model is not None:
            _set_processors(self._model, self._processors)
        self._processors, self._model, self.steps = None, None, None

    def _layer_hook(self, name: str, params: LayerParams):
        def hook(module, args):
            if not self.enabled or not args or not torch.is_tensor(args[0]):
                return None
            return (self.fake_quantize(name, params, args[0]), *args[1:])

        return hook

    def current_steps(self, name: str) -> list[int]:
        if self.steps is None:
            raise TuneQDMError(f"layer {name!r} ran before any timestep was seen: call the model with its "
                               "timestep argument or set_step() first")
        return self.steps

    def fake_quantize(self, name: str, params: LayerParams, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized in float with the parameters of each sample's step."""
        bits, steps = self.config.bits, self.current_steps(name)
        if len(set(steps)) == 1:
            scale, zero = params.vectors(steps[0], x, bits, name)
            return fake_quantize(x, scale, zero, bits)
        if len(steps) != x.shape[0]:
            raise TuneQDMError(f"layer {name!r} got a batch of {x.shape[0]} for {len(steps)} timesteps")
        out = torch.empty_like(x)
        index = torch.tensor(steps, device=x.device)
        for s in sorted(set(steps)):
            rows = torch.nonzero(index == s).flatten()
            part = x.index_select(0, rows)
            scale, zero = params.vectors(s, part, bits, name)
            out[rows] = fake_quantize(part, scale, zero, bits)
        return out

    # -- summary
    def dim_counts(self) -> dict[str, int]:
        """How many (layer, step) pairs group channels and how many group positions."""
        dims = torch.cat([p.dims.reshape(-1) for p in self.layers.values()]) if self.layers else torch.empty(0)
        return {DIM_NAMES[d]: int((dims == d).sum()) for d in (CHANNEL, POSITION)}


class _LayerInput:
    """A quantized layer's view of its calibrated quantizer (``QuantizedLayer.input_quantizer``): the parameters of
    this call for the integer path, or the simulated quantization of the reference path."""

    def __init__(self, owner: ActivationQuantizer, name: str, params: LayerParams):
        self.owner, self.name, self.params_ = owner, name, params

    def params(self, x: torch.Tensor) -> ActInput | None:
        if not self.owner.enabled:
            return None
        steps, bits = self.owner.current_steps(self.name), self.owner.config.bits
        if len(set(steps)) != 1:
            return ActInput("channel", bits, mixed=True)
        return self.params_.act_input(steps[0], x, bits, self.name)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.fake_quantize(self.name, self.params_, x)


class ActivationObserver:
    """Calibration hooks: per layer and per timestep, the running per-channel and per-position (min, max) of the
    layer's input. ``fit(config)`` turns them into an :class:`ActivationQuantizer`."""

    def __init__(self, model: nn.Module, exclude=DEFAULT_EXCLUDE):
        self.layers = select_layers(model, exclude)
        if not self.layers:
            raise TuneQDMError("the model has no Linear or Conv2d layer whose activations could be quantized")
        self.exclude = tuple(exclude)
        self.stats: dict[float, dict[str, list[torch.Tensor]]] = {}
        self.t: float | None = None
        self._handles = []
        handle = on_timestep(model, given_timesteps(self._see_timestep))
        self._handles += [handle] if handle is not None else []
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name, is_conv(module))))

    def _see_timestep(self, t) -> None:
        values = torch.as_tensor(t).detach().reshape(-1).double().cpu().unique()
        if values.numel() != 1:
            raise TuneQDMError("calibration batches must share one timestep (as a sampler's are)")
        self.t = round(float(values[0]), 6)

    def set_timestep(self, t: float) -> None:
        """For models without a ``timestep`` argument: the timestep the next calls belong to."""
        self.t = round(float(t), 6)

    def _hook(self, name: str, conv: bool):
        def hook(module, args):
            if self.t is None:
                raise TuneQDMError("calibration saw a layer before any timestep: call the model with its timestep")
            new = input_ranges(args[0], conv)
            at = self.stats.setdefault(self.t, {})
            if name not in at:
                at[name] = list(new)
            else:
                old = at[name]
                if old[2].shape != new[2].shape and conv:
                    raise TuneQDMError(f"layer {name!r} saw inputs of different sizes during calibration: "
                                       "calibrate at one resolution")
                if old[2].shape != new[2].shape:  # tokens of prompts of several lengths (Qwen-Image's text stream):
                    none = torch.zeros(0)  # no position has ranges of its own, so the groups are per channel
                    at[name] = [torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1]), none, none]
                    return None
                at[name] = [torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1]),
                            torch.minimum(old[2], new[2]), torch.maximum(old[3], new[3])]
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def fit(self, config: ActivationConfig, info: dict | None = None) -> ActivationQuantizer:
        """DGQ grouping of every layer at every observed timestep (sorted from high t to low, as samplers go)."""
        if not self.stats:
            raise TuneQDMError("no calibration statistics: run the model on calibration inputs first")
        timesteps = sorted(self.stats, reverse=True)
        layers = {}
        for name, module in self.layers.items():
            missing = [t for t in timesteps if name not in self.stats[t]]
            if missing:
                raise TuneQDMError(f"layer {name!r} did not run at timestep {missing[0]} during calibration")
            groupings = [fit_grouping(*self.stats[t][name], config.groups) for t in timesteps]
            first = self.stats[timesteps[0]][name]
            layers[name] = LayerParams.from_groupings(is_conv(module), groupings, first[0].numel(), first[2].numel())
        return ActivationQuantizer(config, timesteps, layers, info)
