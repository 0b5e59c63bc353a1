"""Calibrated weight quantization: round-to-nearest (``minmax``, ``mse``) or learned rounding (``adaround``).

All three produce tuneqdm's ordinary quantized layers (packed integers, one zero-point and scale per output channel),
so a calibrated UNet saves with ``save_quantized`` and trains/generates like any quantized base.

- ``minmax``: each channel's [min, max], rounded to nearest (``quantize_weight(init="minmax")``).
- ``mse``: Q-Diffusion's clipping search per channel, rounded to nearest (``quantize_weight(init="mse")``).
- ``adaround``: the ``mse`` grid, then BRECQ-style block reconstruction with AdaRound's learned rounding. Each
  weight is ``s · (clamp(floor(W/s) + h(V) + z) − z)`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V)·(ζ−γ)+γ, 0, 1)`` (ζ = 1.1, γ = −0.1), ``V`` started so that ``h`` is the fractional
  part (the float weight). Per block, Adam on every ``V`` of the block minimises
  ``‖block_q(x_q) − block_fp(x_fp)‖²`` (summed per row, mean over a batch of calibration rows) plus
  ``λ Σ (1 − |2h − 1|^β)``, with no regulariser for the first ``warmup`` of the iterations and ``β`` annealed
  linearly from 20 to 2 afterwards, which pushes every ``h`` to 0 or 1; then ``h`` is hardened to ``V ≥ 0``
  (exact integers). Blocks run in the model's execution order and a block's input ``x_q`` comes from the model
  whose earlier blocks are already quantized (BRECQ/Q-Diffusion), its target from the full-precision model.

Blocks are the UNet's resnets (``ResnetBlock2D``), its attention modules (``Transformer2DModel``: proj_in, the
transformer blocks, proj_out) and its time embedding (``TimestepEmbedding``); every other quantized layer (conv_in,
conv_out, down/upsampler convs) is reconstructed on its own output. Shortcut splitting (default on): the first conv
and the shortcut conv of an up-block resnet, which read ``concat(hidden, skip)``, get separate quantizers for the
two input-channel slices (:mod:`tuneqdm.quant.split`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from ..errors import TuneQDMError
from ..hooks import CallArguments, on_call
from ..progress import progress as progress_bar  # `progress` is calibrate_weights' callback
from ..quant.layers import QUANTIZED_CLASSES
from ..loading.streamed import held
from ..quant.bits import Bits
from ..quant.packing import pack, qrange
from ..quant.quantizer import QuantizedWeight, quantize_weight
from ..quant.split import SplitConv2d
from ..tuning.config import QuantConfig
from ..tuning.model import attach, layers_to_quantize, replace_module
from .calibration import CalibrationSet

CALIBRATIONS = ("minmax", "mse", "adaround")
BLOCK_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "TimestepEmbedding")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


@dataclass
class AdaRoundConfig:
    """Block reconstruction settings. Defaults are sized for the embedded toy model on a 2-core CPU (BRECQ and
    Q-Diffusion use 20,000 iterations per block on a GPU); ``reg_weight``, ``warmup`` and the β range are BRECQ's."""

    iters: int = 500  # Adam steps per block
    batch_size: int = 32  # calibration rows per step
    lr: float = 1e-3  # Adam's learning rate on V
    reg_weight: float = 0.01  # λ of the rounding regulariser
    warmup: float = 0.2  # share of the iterations without the regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise TuneQDMError(f"adaround iterations must be an integer >= 1, got {self.iters!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TuneQDMError(f"adaround batch size must be an integer >= 1, got {self.batch_size!r}")
        if not self.lr > 0 or self.reg_weight < 0 or not 0 <= self.warmup < 1:
            raise TuneQDMError("adaround needs lr > 0, reg_weight >= 0 and 0 <= warmup < 1")
        if not self.beta_start >= self.beta_end > 0:
            raise TuneQDMError(f"adaround needs beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")

    def beta(self, it: int) -> float | None:
        """β of iteration ``it`` (None during the warm-up: no regulariser)."""
        start = int(self.warmup * self.iters)
        if it < start:
            return None
        progress = (it - start) / max(1, self.iters - start)
        return self.beta_end + (self.beta_start - self.beta_end) * (1 - progress)


@dataclass
class WeightCalibrationConfig:
    """What :func:`calibrate_weights` does. ``include``/``exclude``: fnmatch patterns on layer names (as in
    :class:`~tuneqdm.QuantConfig`)."""

    bits: int = 4
    calibrate: str = "adaround"
    split_shortcuts: bool = True
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    batch_size: int = 64  # rows per forward when collecting block inputs and targets

    def __post_init__(self):
        self.bits = Bits(self.bits, "--bits")
        if self.calibrate not in CALIBRATIONS:
            raise TuneQDMError(f"unknown --calibrate {self.calibrate!r}: choose one of {', '.join(CALIBRATIONS)}")

    @property
    def grid_init(self) -> str:
        """The quantizer init whose scales and zero-points the integers use (adaround learns rounding on mse's)."""
        return "minmax" if self.calibrate == "minmax" else "mse"

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, method="peqa", init=self.grid_init, include=self.include,
                           exclude=self.exclude)

    def to_dict(self) -> dict:
        d = {"calibrate": self.calibrate, "bits": self.bits, "grid_init": self.grid_init,
             "split_shortcuts": self.split_shortcuts}
        if self.calibrate == "adaround":
            d["adaround"] = asdict(self.adaround)
        return d


# ---- shortcut splits and block order -----------------------------------------------------------------------------
@torch.no_grad()
def trace_unet(unet: nn.Module, calib: CalibrationSet) -> tuple[dict[str, int], list[str]]:
    """One forward on one calibration row: the shortcut splits ``{conv name: hidden channels}`` of the up blocks'
    resnets, and the names of the reconstruction blocks in execution order."""
    splits, order, handles = {}, [], []

    def up_block_hook(name, module):
        def hook(call: CallArguments) -> None:
            skips = call.get("res_hidden_states_tuple")
            if skips is None:
                return
            for i, resnet in enumerate(module.resnets):
                hidden = resnet.conv1.in_channels - skips[-1 - i].shape[1]
                for conv in ("conv1", "conv_shortcut"):
                    m = getattr(resnet, conv, None)
                    if isinstance(m, nn.Conv2d) and m.in_channels == resnet.conv1.in_channels and hidden > 0:
                        splits[f"{name}.resnets.{i}.{conv}"] = hidden
        return hook

    def order_hook(name):
        def hook(module, args):
            if name not in order:
                order.append(name)
        return hook

    for name, m in unet.named_modules():
        if name.startswith("up_blocks.") and name.count(".") == 1 and hasattr(m, "resnets"):
            handles.append(on_call(m, up_block_hook(name, m)))
        if type(m).__name__ in BLOCK_CLASSES or type(m) in QUANTIZED_CLASSES:
            handles.append(m.register_forward_pre_hook(order_hook(name)))
    try:
        unet(**calib.unet_kwargs(slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return splits, order


def reconstruction_blocks(order: list[str], layers: list[str]) -> list[tuple[str, list[str]]]:
    """``[(block name, its quantized layers)]`` in execution order: the outermost traced blocks that hold quantized
    layers, then every remaining layer as its own block."""
    blocks, claimed = [], set()
    for name in order:
        if any(name.startswith(b + ".") or name == b for b, _ in blocks):
            continue  # inside a block already taken
        mine = [l for l in layers if l not in claimed and (l == name or l.startswith(name + "."))]
        if mine:
            blocks.append((name, mine))
            claimed.update(mine)
    missing = [l for l in layers if l not in claimed]
    if missing:
        raise TuneQDMError(f"layers never called on the calibration data: {missing[:3]}")
    return blocks


# ---- the quantization grid of one layer (one or two input-channel slices) ----------------------------------------
class _Slice:
    """One quantizer of a layer: the input channels ``lo:hi`` of its weight, with AdaRound's variable V."""

    def __init__(self, weight: torch.Tensor, lo: int, hi: int, bits: int, init: str):
        w = weight.detach()[:, lo:hi].float()
        self.lo, self.hi, self.bits, self.shape = lo, hi, bits, w.shape
        self.init = quantize_weight(w, bits, init)
        view = (-1,) + (1,) * (w.dim() - 1)
        self.scale = self.init.scale.view(view)
        self.zero = self.init.zero_point.float().view(view)
        scaled = w / self.scale
        self.floor = torch.floor(scaled)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v: nn.Parameter | None = None
        self._rest = rest

    def start_rounding(self) -> nn.Parameter:
        """AdaRound's V, started so that ``h(V)`` equals the fractional part of ``W/s``."""
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (self._rest - GAMMA) - 1))
        return self.v

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight(self) -> torch.Tensor:
        """The soft-rounded weight (differentiable in V)."""
        qmin, qmax = qrange(self.bits)
        return (torch.clamp(self.floor + self.soft() + self.zero, qmin, qmax) - self.zero) * self.scale

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def quantized(self) -> QuantizedWeight:
        """Exact integers: the round-to-nearest init, or the hardened learned rounding."""
        if self.v is None:
            return self.init
        qmin, qmax = qrange(self.bits)
        q = torch.clamp(self.floor + (self.v.detach() >= 0).float() + self.zero, qmin, qmax)
        return QuantizedWeight(q.to(torch.int8), self.init.zero_point, self.init.scale)


class _LayerGrid:
    def __init__(self, module: nn.Module, bits: int, init: str, split: int | None):
        c = module.weight.shape[1]
        bounds = [(0, c)] if split is None else [(0, split), (split, c)]
        self.module, self.split = module, split
        self.slices = [_Slice(module.weight, lo, hi, bits, init) for lo, hi in bounds]

    def weight(self, hard: bool = False) -> torch.Tensor:
        parts = [s.quantized().dequantize() if hard else s.weight() for s in self.slices]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ---- block reconstruction ---------------------------------------------------------------------------------------
class _Captured(Exception):
    pass


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


def _merge(chunks: list, rows: list[int]):
    """Concatenate captured structures along the batch (tensors whose dim 0 is the chunk's row count)."""
    first = chunks[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and first.shape[0] == rows[0]:
            return torch.cat(chunks)
        return first
    if isinstance(first, dict):
        return {k: _merge([c[k] for c in chunks], rows) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([c[i] for c in chunks], rows) for i in range(len(first)))
    return first


def _take(structure, index: torch.Tensor, n: int):
    if isinstance(structure, torch.Tensor):
        return structure[index] if structure.dim() > 0 and structure.shape[0] == n else structure
    if isinstance(structure, dict):
        return {k: _take(v, index, n) for k, v in structure.items()}
    if isinstance(structure, (tuple, list)):
        return type(structure)(_take(v, index, n) for v in structure)
    return structure


@torch.no_grad()
def capture_block(model: nn.Module, block: str, calib: CalibrationSet, batch_size: int, output: bool):
    """The ``(args, kwargs)`` the block ``block`` receives over the whole calibration set (batch dims merged), and
    its outputs when ``output``; each forward stops right after the block."""
    module = model.get_submodule(block)
    got_inputs, got_outputs, rows = [], [], []

    def pre(m, args, kwargs):
        got_inputs.append((args, kwargs))

    def post(m, args, out):
        got_outputs.append(_first_tensor(out).detach())
        raise _Captured

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        for rows_ in calib.batches(batch_size):
            try:
                model(**calib.unet_kwargs(rows_))
            except _Captured:
                pass
            rows.append(rows_.stop - rows_.start)
    finally:
        for h in handles:
            h.remove()
    inputs = _merge(got_inputs, rows)
    return inputs, (torch.cat(got_outputs) if output else None)


def reconstruct_block(block: nn.Module, grids: dict[str, _LayerGrid], inputs, target: torch.Tensor,
                      config: AdaRoundConfig) -> dict[str, float]:
    """Learn the rounding of every layer of ``block`` (names relative to it) so that its output on ``inputs``
    matches ``target``; returns the reconstruction error (mean squared, per element) before and after."""
    args, kwargs = inputs
    n = target.shape[0]

    def run(index, hard=False):
        weights = {(f"{name}.weight" if name else "weight"): g.weight(hard) for name, g in grids.items()}
        return _first_tensor(functional_call(block, weights, _take(args, index, n), _take(kwargs, index, n)))

    probe = _probe_rows(n)

    def error():
        """Error of the exact integers on the probe rows: round to nearest until the rounding is learned."""
        with torch.no_grad():
            return float((run(probe, hard=True) - target[probe]).pow(2).mean())

    rtn = error()
    params = [s.start_rounding() for g in grids.values() for s in g.slices]
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for it in range(config.iters):
        index = torch.randint(n, (min(config.batch_size, n),), generator=gen)
        rec = (run(index) - target[index]).pow(2).flatten(1).sum(1).mean()
        beta = config.beta(it)
        loss = rec
        if beta is not None and config.reg_weight > 0:
            loss = rec + config.reg_weight * sum(s.regulariser(beta) for g in grids.values() for s in g.slices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"round_to_nearest": rtn, "adaround": error()}


def _probe_rows(n: int, most: int = 256) -> torch.Tensor:
    """Up to ``most`` rows spread evenly over the set (rows are ordered by sampling step)."""
    return torch.linspace(0, n - 1, min(n, most)).round().long()


# ---- the whole model ----------------------------------------------------------------------------------------------
def _relative(block: str, layer: str) -> str:
    return "" if layer == block else layer[len(block) + 1:]


@torch.no_grad()
def _install(model: nn.Module, name: str, grid: _LayerGrid, bits: int) -> None:
    """Replace the float layer ``name`` by its quantized twin (two, inside a SplitConv2d, for a split conv)."""
    module = grid.module

    def quantized(float_module, qw):
        layer = QUANTIZED_CLASSES[type(float_module)].empty_like(float_module, bits, device=module.weight.device)
        layer.set_quantized_weight(qw)
        if float_module.bias is not None:
            layer.bias.data.copy_(float_module.bias.detach().float())
        return layer

    if grid.split is None:
        replace_module(model, name, quantized(module, grid.slices[0].quantized()))
        return
    split = SplitConv2d.from_conv(module, grid.split)
    split.hidden = quantized(split.hidden, grid.slices[0].quantized())
    split.skip = quantized(split.skip, grid.slices[1].quantized())
    replace_module(model, name, split)


def calibrate_weights(unet: nn.Module, calib: CalibrationSet | None, config: WeightCalibrationConfig,
                      progress=None) -> dict:
    """Quantize the float ``unet`` held in memory in place by ``config.calibrate``; returns a report (per-block
    errors, time). ``tuneqdm quantize`` never holds the float model: it calls :func:`learn_rounding` with the model
    streamed from its files.

    ``calib`` is needed for ``adaround`` and for shortcut splitting (one row finds the split points); afterwards
    the model is a tuneqdm quantized model (``save_quantized`` writes it).
    """
    qconfig = config.quant_config()
    names = layers_to_quantize(unet, qconfig)
    t0 = time.perf_counter()
    if calib is None and (config.calibrate == "adaround" or config.split_shortcuts):
        raise TuneQDMError(f"--calibrate {config.calibrate} with shortcut splitting needs calibration data")
    splits, order = trace_unet(unet, calib) if calib is not None else ({}, [])
    splits = {k: v for k, v in splits.items() if k in names} if config.split_shortcuts else {}
    fp = copy.deepcopy(unet).eval().requires_grad_(False) if config.calibrate == "adaround" else None
    for n in progress_bar(names, desc=f"{config.grid_init} grids", unit="layer"):  # round to nearest, layer by layer
        _install(unet, n, _LayerGrid(unet.get_submodule(n), config.bits, config.grid_init, splits.get(n)),
                 config.bits)
    attach(unet, qconfig)
    report = {"splits": splits, "blocks": []}
    if fp is not None:
        report["blocks"] = learn_rounding(fp, unet, calib, config, order, names, splits, progress)
        del fp
    report["seconds"] = time.perf_counter() - t0
    return report


def learn_rounding(fp: nn.Module, quantized: nn.Module, calib: CalibrationSet, config: WeightCalibrationConfig,
                   order: list[str], names: list[str], splits: dict[str, int], progress=None) -> list[dict]:
    """AdaRound block by block: ``quantized`` (the packed model on ``config``'s round-to-nearest grid, with
    ``splits``) gets the learned integers of each block in turn; ``fp`` is the float model, resident or streamed
    from its files (``tuneqdm.loading.streamed``: then only the block being learned holds its float weights).

    A block's input comes from ``quantized``, whose earlier blocks already hold their learned integers; its target
    from ``fp``. The grid (scales, zero-points) stays round-to-nearest's; only the integers change."""
    if len(calib) < 1:
        raise TuneQDMError("the calibration set is empty")
    fp.eval().requires_grad_(False)
    quantized.eval()
    blocks, report = reconstruction_blocks(order, names), []
    for i, (block, layers) in enumerate(progress_bar(blocks, desc="adaround: blocks", unit="block")):
        tb = time.perf_counter()
        inputs, _ = capture_block(quantized, block, calib, config.batch_size, output=False)
        _, target = capture_block(fp, block, calib, config.batch_size, output=True)
        with held(fp, block) as module:
            grids = {l: _LayerGrid(fp.get_submodule(l), config.bits, config.grid_init, splits.get(l)) for l in layers}
            with torch.enable_grad():
                errors = reconstruct_block(module, {_relative(block, l): g for l, g in grids.items()}, inputs,
                                           target, config.adaround)
        for l, grid in grids.items():  # later blocks see this block's learned integers
            _set_integers(quantized.get_submodule(l), grid)
        report.append({"block": block, "layers": len(layers), **errors, "seconds": time.perf_counter() - tb})
        if progress is not None:
            progress(i + 1, len(blocks), report[-1])
        del inputs, target, grids
    return report


@torch.no_grad()
def _set_integers(layer: nn.Module, grid: _LayerGrid) -> None:
    """A quantized layer (or both halves of a split conv) takes the grid's integers; its scales and zero-points are
    the grid's already (both are round-to-nearest's of the same float weight)."""
    parts = [layer] if grid.split is None else [layer.hidden, layer.skip]
    for part, piece in zip(parts, grid.slices):
        qw = piece.quantized()
        if not torch.equal(part.zero_point.cpu(), qw.zero_point.cpu()):
            raise RuntimeError("the learned rounding is on another grid than the quantized layer's")
        part.set_packed(pack(qw.q, part.bits).to(part.qweight.device), part.zero_point, part.scale)
