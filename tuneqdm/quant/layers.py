"""Quantized Linear and Conv2d whose only trainable parameters are separable, per-expert scales.

The layer stores frozen packed integers ``W_q``, zero-points ``z`` and the original per-channel scales. The weight it
represents for expert ``k`` is ``Ŵ_k = diag(s_out[k]) · C · diag(s_in[k])`` with ``C = W_q − z``. A custom autograd
function computes ``y = op(x, Ŵ_k) + b`` and every gradient from the layer's input and output alone::

    g_x    = op_input_grad(g_y, Ŵ_k)
    g_s_in = Σ (x ⊙ g_x) / s_in                 (per input channel: Ŵ's column i carries s_in[i] once)
    g_s_out = (Σ (g_y ⊙ y) − b Σ g_y) / s_out   (per output channel: y − b carries s_out[o] once)

``Ŵ_k`` is rebuilt from the integers into a shared scratch buffer for the duration of one forward or backward, never
held between them (the official TuneQDM code lets autograd keep a dequantized float weight per layer, which costs
nearly full-precision memory). Folding the scales into the weight costs weight-sized passes over warm memory instead
of activation-sized temporaries; a batch whose samples use different experts runs one op per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TuneQDMError
from .kernels import (
    GRID,
    INT8,
    REFERENCE,
    dynamic_fake_quantize,
    dynamic_input_grad,
    dynamic_product,
    dynamic_quantize,
    dynamic_steps,
    int_forward,
    input_grad_reason,
    int_path_reason,
    signed_grid,
    train_grid,
    train_path_reason,
)
from .bits import Bits
from .packing import code_offset, pack, packed_numel, unpack_codes_into, values_per_byte
from .quantizer import QuantizedWeight, quantize_weight
from .reductions import channel_dot, channel_sum
from . import runtime
from .workspace import scratch

QUANTIZED_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {}


def register_qmodule(float_class: type[nn.Module]):
    """Class decorator: ``quantize_`` replaces modules of exactly ``float_class`` by the decorated class."""

    def wrapper(cls):
        QUANTIZED_CLASSES[float_class] = cls
        return cls

    return wrapper


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_WEIGHT_CHUNK = 1 << 22  # values: larger weights are rebuilt and applied a block of output channels at a time


class _ScaledOp(torch.autograd.Function):
    """``y = op(x, diag(s_out) C diag(s_in)) + b`` with gradients for x, s_in, s_out and b that need no saved weight."""

    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, layer):
        dtype = _compute_dtype(x)
        x, y = layer._blockwise_op(x, bias, dtype, lambda i, r: layer._scaled_weight(s_out, s_in, dtype, rows=r))
        need_x, need_s_in, need_s_out, _ = ctx.needs_input_grad[:4]
        ctx.layer, ctx.dtype, ctx.x_shape = layer, dtype, x.shape
        ctx.save_for_backward(
            x if need_s_in else None,
            y if need_s_out else None,  # the output is often saved by the next op too: shared storage
            s_in,
            s_out,
            bias,
        )
        return y

    @staticmethod
    def backward(ctx, g_y):
        x, y, s_in, s_out, bias = ctx.saved_tensors
        need_x, need_s_in, need_s_out, need_bias = ctx.needs_input_grad[:4]
        layer, dtype, cdim = ctx.layer, ctx.dtype, ctx.layer.channel_dim
        g_y = g_y.to(dtype)
        g_x = g_s_in = g_s_out = g_bias = None
        g_y_sum = channel_sum(g_y, cdim) if (need_bias or need_s_out) else None
        if need_x or need_s_in:
            for r in layer.row_blocks():
                part = layer._op_input_grad(g_y[layer._channel_index(r)], layer._scaled_weight(s_out, s_in, dtype, rows=r),
                                            ctx.x_shape)
                g_x = part if g_x is None else g_x.add_(part)
            if need_s_in:
                g_s_in = (layer._fold_in(channel_dot(x, g_x, cdim)) / s_in.float()).to(s_in.dtype)
        if need_s_out:
            g_s_out = channel_dot(g_y, y, cdim)
            if bias is not None:
                g_s_out -= bias.float() * g_y_sum
            g_s_out = (g_s_out / s_out.float()).to(s_out.dtype)
        if need_bias:
            g_bias = g_y_sum.reshape(bias.shape).to(bias.dtype)
        return (g_x if need_x else None), g_s_in, g_s_out, g_bias, None


# What the int8 training path keeps for the gradient of s_out (``Σ g_y ⊙ u``, ``u = s_x (a ⊛ C)``): "recompute" (u
# again from the kept int8 input, one more integer matmul), "int8" (u quantized per token to int8) or "output" (the
# float output y, as the exact path keeps it: free when the next op keeps it too). Measured in
# docs/benchmarks/train_int8.md (benchmarks/train_int8_layers.py); the default is the one chosen there.
U_KEPT_CHOICES = ("recompute", "int8", "output")
U_KEPT = "recompute"
# How the int8 training backward computes the input gradient: "float" (the weight rebuilt, as in the exact path)
# or "int8" (``s_out ⊙ g_y`` quantized per token, one integer matmul: kernels.dynamic_input_grad; strided k x k
# convs stay float). Measured at SD-1.5 size (docs/benchmarks/train_int8.md): "int8" took the step from 1.09x to
# 0.97x the exact path's time, but its rounding of the gradient moved the scale gradients far from the exact ones
# (per-layer cosine down to 0.81, 67 of 564 below 0.99, against 0.985 and 21 with "float"), so it is not the default.
INPUT_GRAD_CHOICES = ("float", "int8")
INPUT_GRAD = "float"


class _Int8ScaledOp(torch.autograd.Function):
    """``y = s_out ⊙ u + b`` with ``u = s_x (a ⊛ (W_q − z))`` from the int8 ``a = q(x ⊙ s_in)`` (computed outside,
    without a graph); straight-through for the rounding. Kept for the backward: ``a`` and ``s_x`` (a quarter of a
    float32 input) and what ``U_KEPT`` says for ``u``::

        g_x    = (g_y ⊙ s_out) ⊛ᵀ C ⊙ s_in        (INPUT_GRAD: g_y ⊙ s_out in int8, or float)
        g_s_in = Σ (s_x a) ⊙ g_x / s_in²           (x ≈ s_x a / s_in)
        g_s_out = Σ g_y ⊙ u
    """

    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, layer, a, scale, holder, keep):
        u = holder.pop()  # handed over in a list: a tensor input returned modified would need mark_dirty
        dtype = _compute_dtype(x)
        need_s_in, need_s_out = ctx.needs_input_grad[1:3]
        ctx.layer, ctx.dtype, ctx.x_shape, ctx.x_dtype, ctx.keep = layer, dtype, x.shape, x.dtype, keep
        view = (-1,) if layer.channel_dim == -1 else (-1, 1, 1)
        kept = (None, None)
        if need_s_out and keep == "int8":
            steps, u_scale = dynamic_steps(u, layer.channel_dim)
            kept = (steps.to(torch.int8), u_scale)
            del steps
        y = u
        if bias is not None:
            torch.addcmul(bias.float().view(view), y, s_out.float().view(view), out=y)
        else:
            y.mul_(s_out.float().view(view))
        if need_s_out and keep == "output":
            kept = (y, None)  # the output is often saved by the next op too: shared storage
        ctx.save_for_backward(a if need_s_in or (need_s_out and keep == "recompute") else None, scale, *kept,
                              s_in, s_out, bias)
        return y if y.dtype == dtype else y.to(dtype)

    @staticmethod
    def backward(ctx, g_y):
        a, scale, kept, kept_scale, s_in, s_out, bias = ctx.saved_tensors
        need_x, need_s_in, need_s_out, need_bias = ctx.needs_input_grad[:4]
        layer, cdim = ctx.layer, ctx.layer.channel_dim
        g_y = g_y.float()
        g_x = g_s_in = g_s_out = g_bias = None
        g_y_sum = channel_sum(g_y, cdim) if (need_bias or (need_s_out and ctx.keep == "output")) else None
        integer_grad = layer.input_grad == "int8" and input_grad_reason(layer) is None
        grid = train_grid(layer) if integer_grad or (need_s_out and ctx.keep == "recompute") else None
        if need_x or need_s_in:
            if integer_grad:
                g_x = dynamic_input_grad(layer, g_y, s_out, s_in, grid)
            if g_x is None:
                for r in layer.row_blocks():
                    part = layer._op_input_grad(g_y[layer._channel_index(r)],
                                                layer._scaled_weight(s_out, s_in, torch.float32, rows=r), ctx.x_shape)
                    g_x = part if g_x is None else g_x.add_(part)
            if need_s_in:
                g_s_in = (channel_dot(a, g_x, cdim, scale) / s_in.float().square()).to(s_in.dtype)
        if need_s_out:
            if ctx.keep == "output":  # Σ g_y ⊙ (y − b) / s_out
                g_s_out = channel_dot(g_y, kept, cdim)
                if bias is not None:
                    g_s_out -= bias.float() * g_y_sum
                g_s_out /= s_out.float()
            elif ctx.keep == "int8":
                g_s_out = channel_dot(kept, g_y, cdim, kept_scale)
            else:
                g_s_out = channel_dot(g_y, dynamic_product(layer, a, scale, grid), cdim)
            g_s_out = g_s_out.to(s_out.dtype)
        if need_bias:
            g_bias = g_y_sum.reshape(bias.shape).to(bias.dtype)
        if g_x is not None:
            g_x = g_x.to(ctx.x_dtype) if need_x else None
        return g_x, g_s_in, g_s_out, g_bias, None, None, None, None, None


class QuantizedLayer(nn.Module):
    """Shared storage and scale logic of the quantized layers (the ``QModuleMixin`` of tuneqdm).

    Buffers: ``qweight`` (packed integers), ``zero_point`` (int8, per output channel), ``scale`` (the original
    quantization scale, float32, per output channel). Parameters: ``s_out[k]`` and, for methods with MCSU,
    ``s_in[k]``, one ``nn.Parameter`` per expert so that an expert absent from a batch gets no gradient at all
    (AdamW then leaves its moments and weights untouched); ``bias`` (frozen unless asked).
    """

    channel_dim: int  # the channel dimension of activations (-1 for Linear, 1 for Conv2d)
    # runtime entries, none of them state (quant.runtime: what installs each); read by forward
    router = runtime.RuntimeEntry(runtime.ROUTER)
    weight_cache = runtime.RuntimeEntry(runtime.WEIGHT_CACHE)
    kernels = runtime.RuntimeEntry(runtime.KERNELS, "auto")
    input_quantizer = runtime.RuntimeEntry(runtime.INPUT_QUANTIZER)
    grid = runtime.RuntimeEntry(runtime.GRID)
    grid_budget = runtime.RuntimeEntry(runtime.GRID_BUDGET)
    last_path = runtime.RuntimeEntry(runtime.LAST_PATH)

    def __init__(self, weight_shape, in_scale_features: int, bits: int, bias: bool, device=None):
        nn.Module.__init__(self)  # not the float class's __init__ (QLinear is an nn.Linear): it would build a weight
        self.bits = Bits(bits)
        self.weight_shape = torch.Size(weight_shape)
        self.in_scale_features = in_scale_features
        numel = self.weight_shape.numel()
        storage = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(packed_numel(numel, bits), dtype=storage, device=device))
        self.register_buffer("zero_point", torch.zeros(self.weight_shape[0], dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(self.weight_shape[0], dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.weight_shape[0], device=device), requires_grad=False)
        else:
            self.bias = None
        self.s_out = nn.ParameterList()
        self.s_in = nn.ParameterList()
        self.runtime = runtime.LayerRuntime()  # what the code driving the layer installs (the RuntimeEntry attributes)
        self.u_kept = U_KEPT  # what the int8 training backward keeps for s_out's gradient (U_KEPT_CHOICES)
        self.input_grad = INPUT_GRAD  # how the int8 training backward computes g_x (INPUT_GRAD_CHOICES)

    # ---- storage -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        if qw.q.shape != self.weight_shape:
            raise TuneQDMError(f"quantized weight of shape {tuple(qw.q.shape)} given to a layer of {tuple(self.weight_shape)}")
        self.set_packed(pack(qw.q, self.bits), qw.zero_point, qw.scale)

    @torch.no_grad()
    def set_packed(self, qweight: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> None:
        """Take already packed integers, zero-points and scales as the layer's storage (no float weight is ever
        built: e.g. a layer made with ``empty_like(..., device="meta")`` filled from a file or a generator)."""
        storage = torch.int8 if self.bits == 8 else torch.uint8
        rows, numel = self.weight_shape[0], packed_numel(self.weight_shape.numel(), self.bits)
        for what, t, n, dtype in (("qweight", qweight, numel, storage), ("zero_point", zero_point, rows, torch.int8)):
            if t.dtype != dtype or tuple(t.shape) != (n,):
                raise TuneQDMError(f"{what} of a W{self.bits} layer of {tuple(self.weight_shape)} must be {dtype} of "
                                   f"shape ({n},), got {t.dtype} of {tuple(t.shape)}")
        if tuple(scale.shape) != (rows,):
            raise TuneQDMError(f"scale of a layer of {tuple(self.weight_shape)} must have shape ({rows},), "
                               f"got {tuple(scale.shape)}")
        device = qweight.device if self.qweight.is_meta else self.qweight.device
        self.qweight = qweight.to(device)
        self.zero_point = zero_point.to(device)
        self.scale = scale.to(device, torch.float32)

    def centred_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_q − z`` as a new float tensor of the weight's shape (for export and tests; layers use scratch)."""
        return self._scaled_weight(torch.ones((), dtype=dtype, device=self.scale.device), None, dtype, into=None)

    def row_blocks(self) -> list[slice]:
        """Blocks of output channels whose rebuilt float weight fits ``_WEIGHT_CHUNK`` values (one block for all
        but the largest layers; SD 1.5's biggest conv, 1280x2560x3x3, takes 8). Block starts are multiples of 4 so
        that each block begins on a byte of the packed storage."""
        rows = self.weight_shape[0]
        per_row = self.weight_shape.numel() // rows
        step = max(4, _WEIGHT_CHUNK // per_row // 4 * 4)
        return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]

    def _channel_index(self, rows: slice):
        return (Ellipsis, rows) if self.channel_dim == -1 else (slice(None), rows)

    def _scaled_weight(self, s_out, s_in, dtype: torch.dtype, into: str | None = "weight",
                       rows: slice | None = None) -> torch.Tensor:
        """``diag(s_out) (W_q − z) diag(s_in)`` for the output channels ``rows`` (default all), written into the
        shared scratch buffer ``into`` (or a new tensor).

        Three passes over warm memory: codes -> float while unpacking, ``− (z + offset)`` per row, then one multiply
        by ``s_out ⊗ s_in`` (two row/column multiplies for a Linear, where that outer product is weight-sized).
        """
        rows = slice(0, self.weight_shape[0]) if rows is None else rows
        n_rows, per_row = rows.stop - rows.start, self.weight_shape.numel() // self.weight_shape[0]
        numel, per = n_rows * per_row, (1 if self.bits == 8 else values_per_byte(self.bits))
        packed = self.qweight[rows.start * per_row // per : -(-rows.stop * per_row // per)]
        device = packed.device
        stored = packed.numel() * per
        full = torch.empty(stored, dtype=dtype, device=device) if into is None else scratch(into, stored, dtype, device)
        if self._holds_grid():  # the same integers, unpacked once per sampling call (quant.kernels)
            full[:numel].view(n_rows, -1).copy_(signed_grid(self)[rows])
            offset = 0
        else:
            tmp = None if self.bits == 8 else scratch("bytes", packed.numel(), torch.uint8, device)
            unpack_codes_into(packed, self.bits, full, tmp)
            offset = code_offset(self.bits)
        w = full[:numel].view(n_rows, self.in_scale_features, -1)
        w.sub_((self.zero_point[rows].to(dtype) + offset)[:, None, None])
        s_out = s_out.to(dtype).expand(self.weight_shape[0])[rows]
        if s_in is None:
            w.mul_(s_out[:, None, None])
        elif w.shape[2] > 1:
            w.mul_((s_out[:, None] * s_in.to(dtype)[None, :])[:, :, None])
        else:
            w.mul_(s_out[:, None, None]).mul_(s_in.to(dtype)[None, :, None])
        w = w.view(n_rows, *self.weight_shape[1:])
        return w.clone() if into is None and stored != numel else w

    def _holds_grid(self) -> bool:
        if self.bits == 8 or self.kernels == "reference" or torch.is_grad_enabled():
            return False
        return self.grid is not None or (self.grid_budget is not None and self.grid_budget[0] >= self.weight_shape.numel())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the frozen weight storage: packed integers + zero-points + original scales."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.zero_point, self.scale))

    # ---- scales ----------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.s_out)

    @property
    def trains_s_in(self) -> bool:
        return len(self.s_in) > 0

    @torch.no_grad()
    def configure_scales(self, experts: int, train_s_in: bool, train_bias: bool = False) -> None:
        """(Re)create the trainable scale sets from the original quantization scales, ``s_in`` at 1."""
        device = self.scale.device
        self.s_out = nn.ParameterList([nn.Parameter(self.scale.detach().clone()) for _ in range(experts)])
        self.s_in = nn.ParameterList(
            [nn.Parameter(torch.ones(self.in_scale_features, device=device)) for _ in range(experts if train_s_in else 0)]
        )
        if self.bias is not None:
            self.bias.requires_grad_(train_bias)

    def scale_parameters(self) -> list[nn.Parameter]:
        return list(self.s_out) + list(self.s_in)

    def _expert_scales(self, k: int):
        if k < 0:  # the original quantization scales (S1 outside its intervals)
            return self.scale, None
        return self.s_out[k], (self.s_in[k] if self.trains_s_in else None)

    def route_experts(self) -> list[int]:
        """The distinct experts of this call's batch, sorted (one entry when the whole batch shares an expert)."""
        route = None if self.router is None else self.router.route
        if route is not None:
            return route.groups
        if self.num_experts > 1 or (self.router is not None and self.router.intervals):
            raise TuneQDMError(
                "no timestep for the scale experts: call the model with its `timestep` argument "
                "or set one with tuneqdm.set_timesteps(model, t)"
            )
        return [0]

    def dequantized_weight(self, expert: int = 0) -> torch.Tensor:
        """The float weight ``diag(s_out[k]) C diag(s_in[k])`` of one expert (−1: the original scales)."""
        with torch.no_grad():
            s_out, s_in = self._expert_scales(expert)
            return self._scaled_weight(s_out, s_in, torch.float32, into=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = None if self.input_quantizer is None else self.input_quantizer.params(x)
        if act is not None and act.kind != "dynamic" and not self._int_path_possible(act, x):
            x, act = self.input_quantizer.fake_quantize(x), None  # simulated, as DGQ's code does
        x = self._prepare_input(x)
        experts = self.route_experts()
        if len(experts) == 1:
            return self._expert_forward(x, experts[0], act)
        route = self.router.route
        if len(route.experts) != x.shape[0]:
            raise TuneQDMError(
                f"a quantized layer got a batch of {x.shape[0]} but the timestep routing has {len(route.experts)} samples"
            )
        members, inverse = route.members(x.device)
        ys = [self._expert_forward(x.index_select(0, idx), k, act) for k, idx in zip(experts, members)]
        return torch.cat(ys).index_select(0, inverse)

    def _int_path_possible(self, act, x) -> bool:
        """Whether every expert of this call can take the integer path (a calibrated quantizer is applied before
        the experts split the batch, so it is all or none)."""
        return all(int_path_reason(self, act, x, self._expert_scales(k)[1]) is None for k in self.route_experts())

    def _expert_forward(self, x: torch.Tensor, k: int, act=None) -> torch.Tensor:
        s_out, s_in = self._expert_scales(k)
        if act is not None and act.kind == "dynamic" and torch.is_grad_enabled():  # training in 8 bits
            y = self._int8_train_forward(x, s_in, s_out)
            if y is not None:
                self.last_path = INT8
                return y
            act = None  # this layer cannot: it trains on float activations (the exact path)
        if act is not None:
            if int_path_reason(self, act, x, s_in) is None:
                y = int_forward(self, x, s_in, s_out, act)
                if y is not None:
                    self.last_path = INT8
                    return y
            if act.kind == "dynamic":  # the dynamic quantizer's reference: x ⊙ s_in quantized, in float
                x = dynamic_fake_quantize(x if s_in is None else x * self._input_view(s_in), self)
                s_in = None
        self.last_path = GRID if self._holds_grid() else REFERENCE
        if self.weight_cache is not None and not torch.is_grad_enabled():
            y = self._cached_forward(x, s_in, s_out, k)
            if y is not None:
                return y
        if not torch.is_grad_enabled():  # sampling: the same forward without the autograd Function's overhead
            dtype = _compute_dtype(x)
            return self._blockwise_op(x, self.bias, dtype, lambda i, r: self._scaled_weight(s_out, s_in, dtype, rows=r))[1]
        return _ScaledOp.apply(x, s_in, s_out, self.bias, self)

    def _int8_train_forward(self, x, s_in, s_out, keep: str | None = None):
        """The training forward on int8 activations (``_Int8ScaledOp``), or None where this layer or device has no
        integer path."""
        if train_path_reason(self, x) is not None:
            return None
        with torch.no_grad():
            a, scale = dynamic_quantize(self, x, s_in)
            u = dynamic_product(self, a, scale)
        if u is None:
            return None
        return _Int8ScaledOp.apply(x, s_in, s_out, self.bias, self, a, scale, [u], keep or self.u_kept)

    def _cached_forward(self, x, s_in, s_out, k):
        """``_ScaledOp.forward`` with the weight blocks kept in the cache (same ops, same numbers)."""
        dtype = _compute_dtype(x)
        blocks = self.weight_cache.get(self, k, dtype, lambda: [
            self._scaled_weight(s_out, s_in, dtype, into=None, rows=r) for r in self.row_blocks()])
        if blocks is None:
            return None
        return self._blockwise_op(x, self.bias, dtype, lambda i, r: blocks[i])[1]

    def _blockwise_op(self, x, bias, dtype, weight):
        """``(x in dtype, op(x, W) + b)`` computed per block of output channels, ``weight(i, rows)`` giving block i's
        weight (rebuilt into scratch, or cached)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._blockwise_op(x, bias, dtype, weight)
        x = x.to(dtype)
        b = None if bias is None else bias.to(dtype)
        blocks = self.row_blocks()
        if len(blocks) == 1:
            return x, self._op(x, weight(0, blocks[0]), b)
        ys = [self._op(x, weight(i, r), None if b is None else b[r]) for i, r in enumerate(blocks)]
        return x, torch.cat(ys, dim=self.channel_dim)

    def _input_view(self, s_in: torch.Tensor) -> torch.Tensor:
        """``s_in`` shaped to multiply this layer's input (repeated over the groups of a grouped conv)."""
        if self.channel_dim == -1:
            return s_in
        return s_in.repeat(self.in_channels // s_in.numel())[:, None, None]

    # ---- per-op hooks (shapes and the op itself) -------------------------------------------------------------
    def _prepare_input(self, x):
        return x

    def _fold_in(self, g_s_in):
        return g_s_in


@register_qmodule(nn.Linear)
class QLinear(QuantizedLayer, nn.Linear):
    """Quantized Linear. It is an ``nn.Linear`` without a ``weight`` (as optimum-quanto's layers are the float class
    plus a mixin), so that PEFT's stock LoRA ``Linear`` wraps it — ``add_adapter``, ``pipe.load_lora_weights`` —
    calling this layer's forward and backward, which never hold a float weight. Merging a LoRA into it is not
    possible (there is no float weight to merge into)."""

    channel_dim = -1
    weight = None  # no float weight, by design: code that asks (PEFT does) gets None rather than an AttributeError

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None):
        super().__init__((out_features, in_features), in_features, bits, bias, device)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_module(cls, module: nn.Linear, bits: int, init: str = "minmax") -> QLinear:
        layer = cls.empty_like(module, bits, device=module.weight.device)
        layer.set_quantized_weight(quantize_weight(module.weight, bits, init))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    @classmethod
    def empty_like(cls, module: nn.Linear, bits: int, device="meta") -> QLinear:
        return cls(module.in_features, module.out_features, bits, module.bias is not None, device=device)

    def to_float(self, expert: int = 0) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.scale.device)
        out.weight.data.copy_(self.dequantized_weight(expert))
        if self.bias is not None:
            out.bias.data.copy_(self.bias.detach())
        return out

    def reset_parameters(self) -> None:
        """Nothing to initialise: the weight is data (packed integers), not parameters."""

    def _op(self, x, w, bias):
        return F.linear(x, w, bias)

    def _op_input_grad(self, g, w, x_shape):
        return g.matmul(w)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, experts={self.num_experts}"


@register_qmodule(nn.Conv2d)
class QConv2d(QuantizedLayer):
    """Quantized Conv2d; ``s_in`` has one entry per input channel of a group (the weight's dim 1)."""

    channel_dim = 1

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", bits: int = 4, device=None):
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode,
                        device="meta")
        super().__init__(ref.weight.shape, in_channels // groups, bits, bias, device)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = ref.kernel_size, ref.stride, ref.dilation
        self.padding, self.padding_mode = ref.padding, padding_mode
        # Non-zero padding modes and "same" padding are applied explicitly before the op; per-channel input scaling
        # commutes with any per-channel padding, so the math is unchanged.
        self.explicit_padding = padding_mode != "zeros" or isinstance(ref.padding, str)
        self._pad = ref._reversed_padding_repeated_twice
        self._op_padding = (0, 0) if self.explicit_padding else ref.padding

    @classmethod
    def empty_like(cls, module: nn.Conv2d, bits: int, device="meta") -> QConv2d:
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, module.bias is not None, module.padding_mode, bits, device=device)

    @classmethod
    def from_module(cls, module: nn.Conv2d, bits: int, init: str = "minmax") -> QConv2d:
        layer = cls.empty_like(module, bits, device=module.weight.device)
        layer.set_quantized_weight(quantize_weight(module.weight, bits, init))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    def to_float(self, expert: int = 0) -> nn.Conv2d:
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, self.groups, self.bias is not None, self.padding_mode, device=self.scale.device)
        out.weight.data.copy_(self.dequantized_weight(expert))
        if self.bias is not None:
            out.bias.data.copy_(self.bias.detach())
        return out

    def is_pointwise(self) -> bool:
        """A 1x1 conv that is a matmul over channels (the integer path takes it)."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not self.explicit_padding
                and self._op_padding == (0, 0))

    def row_blocks(self) -> list[slice]:
        if self.groups > 1:  # a block must hold whole groups; grouped convs are small, keep them whole
            return [slice(0, self.out_channels)]
        return super().row_blocks()

    def _prepare_input(self, x):
        if not self.explicit_padding:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad, mode=mode)

    def _fold_in(self, g_s_in):  # (Cin,) -> (Cin/groups,): a group-shared scale sums over groups
        return g_s_in.view(self.groups, -1).sum(0)

    def _op(self, x, w, bias):
        return F.conv2d(x, w, bias, self.stride, self._op_padding, self.dilation, self.groups)

    def _op_input_grad(self, g, w, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, w, g, self.stride, self._op_padding, self.dilation, self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, experts={self.num_experts}")
