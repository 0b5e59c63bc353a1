"""Quantized Linear and Conv2d whose only trainable parameters are separable, per-expert scales.

The layer stores frozen packed integers ``W_q``, zero-points ``z`` and the original per-channel scales. The weight it
represents for expert ``k`` is ``Ŵ_k = diag(s_out[k]) · (W_q − z) · diag(s_in[k])``. Because the scales are diagonal
they act on activations instead::

    y = s_out[k] ⊙ ((x ⊙ s_in[k]) ∗ C) + b,        C = W_q − z  (the centred integer grid)

so a custom autograd function computes every gradient from the layer's input and output alone: the float grid ``C``
is unpacked for the duration of one forward or backward and dropped, never held between them (the official TuneQDM
code lets autograd keep a dequantized float weight per layer, which costs nearly full-precision memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TuneQDMError
from .packing import check_bits, code_offset, pack, packed_numel, unpack_codes
from .quantizer import QuantizedWeight, quantize_weight

QUANTIZED_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {}


def register_qmodule(float_class: type[nn.Module]):
    """Class decorator: ``quantize_`` replaces modules of exactly ``float_class`` by the decorated class."""

    def wrapper(cls):
        QUANTIZED_CLASSES[float_class] = cls
        return cls

    return wrapper


def _reduce(t: torch.Tensor, rows: int, channel_dim: int) -> torch.Tensor:
    """Sum ``t`` to shape (rows, channels): per sample when rows > 1, over the whole batch when rows == 1."""
    channel_dim %= t.dim()
    dims = [d for d in range(t.dim()) if d != channel_dim and (rows == 1 or d != 0)]
    out = t.sum(dim=dims) if dims else t
    return out.reshape(rows, -1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _ScaledOp(torch.autograd.Function):
    """``y = s_out ⊙ op(x ⊙ s_in, C) + b`` with gradients for x, s_in, s_out and b that need no saved weight."""

    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, layer):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            s_in_b = None if s_in is None else layer._broadcast_in(s_in.to(dtype), x)
            xs = x if s_in_b is None else x * s_in_b
            y = layer._op(xs, layer.centred_weight(dtype))
            del xs
            y.mul_(layer._broadcast_out(s_out.to(dtype), y))
            if bias is not None:
                y.add_(layer._broadcast_bias(bias.to(dtype), y))
        need_x, need_s_in, need_s_out, _ = ctx.needs_input_grad[:4]
        ctx.layer = layer
        ctx.dtype = dtype
        ctx.x_shape = x.shape
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
        layer, dtype = ctx.layer, ctx.dtype
        g_y = g_y.to(dtype)
        cdim = layer.channel_dim
        g_x = g_s_in = g_s_out = g_bias = None
        s_out_b = layer._broadcast_out(s_out.to(dtype), g_y)
        if need_x or need_s_in:
            g_xs = layer._op_input_grad(g_y * s_out_b, layer.centred_weight(dtype), ctx.x_shape)
            if need_s_in:
                g_s_in = layer._fold_in(_reduce(g_xs * x, s_in.shape[0], cdim)).to(s_in.dtype)
            if need_x:
                g_x = g_xs if s_in is None else g_xs.mul_(layer._broadcast_in(s_in.to(dtype), g_xs))
            del g_xs
        if need_s_out:  # y_pre = (y − b) / s_out, built in one temporary (this is the peak of the backward)
            tmp = y.clone() if bias is None else y - layer._broadcast_bias(bias.to(dtype), y)
            g_s_out = _reduce(tmp.div_(s_out_b).mul_(g_y), s_out.shape[0], cdim).to(s_out.dtype)
            del tmp
        if need_bias:
            g_bias = _reduce(g_y, 1, cdim).reshape(bias.shape).to(bias.dtype)
        return g_x, g_s_in, g_s_out, g_bias, None


class QuantizedLayer(nn.Module):
    """Shared storage and scale logic of the quantized layers (the ``QModuleMixin`` of tuneqdm).

    Buffers: ``qweight`` (packed integers), ``zero_point`` (int8, per output channel), ``scale`` (the original
    quantization scale, float32, per output channel). Parameters: ``s_out[k]`` and, for methods with MCSU,
    ``s_in[k]``, one ``nn.Parameter`` per expert so that an expert absent from a batch gets no gradient at all
    (AdamW then leaves its moments and weights untouched); ``bias`` (frozen unless asked).
    """

    channel_dim: int  # the channel dimension of activations (-1 for Linear, 1 for Conv2d)

    def __init__(self, weight_shape, in_scale_features: int, bits: int, bias: bool, device=None):
        super().__init__()
        self.bits = check_bits(bits)
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
        self.router = None  # a tuning.routing.Router shared by the model's layers, set by quantize_

    # ---- storage -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        if qw.q.shape != self.weight_shape:
            raise TuneQDMError(f"quantized weight of shape {tuple(qw.q.shape)} given to a layer of {tuple(self.weight_shape)}")
        self.qweight = pack(qw.q, self.bits).to(self.qweight.device)
        self.zero_point = qw.zero_point.to(self.zero_point.device)
        self.scale = qw.scale.to(self.scale.device, torch.float32)

    def centred_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_q − z`` as a float tensor of the weight's shape (built on demand, never stored)."""
        codes = unpack_codes(self.qweight, self.bits, self.weight_shape.numel()).to(dtype)
        shift = self.zero_point.to(dtype) + code_offset(self.bits)  # codes − (z + offset) = q − z
        return codes.view(self.weight_shape[0], -1).sub_(shift[:, None]).view(self.weight_shape)

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

    def routed_scales(self, batch: int):
        """Per-sample scales for this call: (s_in (R, in) or None, s_out (R, out)), R = 1 or the batch size."""
        route = None if self.router is None else self.router.route
        if route is None:
            if self.num_experts > 1 or (self.router is not None and self.router.intervals):
                raise TuneQDMError(
                    "no timestep for the scale experts: call the model with its `timestep` argument "
                    "or set one with tuneqdm.set_timesteps(model, t)"
                )
            experts = [0]
        else:
            experts = route.groups
        if len(experts) == 1:
            s_out, s_in = self._expert_scales(experts[0])
            return (None if s_in is None else s_in.unsqueeze(0)), s_out.unsqueeze(0)
        if len(route.experts) != batch:
            raise TuneQDMError(
                f"a quantized layer got a batch of {batch} but the timestep routing has {len(route.experts)} samples"
            )
        pairs = [self._expert_scales(k) for k in experts]
        index = route.index(self.scale.device)
        s_out = torch.stack([p[0] for p in pairs])[index]
        if not self.trains_s_in:
            return None, s_out
        ones = self.scale.new_ones(self.in_scale_features)
        s_in = torch.stack([ones if p[1] is None else p[1] for p in pairs])[index]
        return s_in, s_out

    def dequantized_weight(self, expert: int = 0) -> torch.Tensor:
        """The float weight ``diag(s_out[k]) C diag(s_in[k])`` of one expert (−1: the original scales)."""
        with torch.no_grad():
            s_out, s_in = self._expert_scales(expert)
            view = (-1,) + (1,) * (len(self.weight_shape) - 1)
            w = self.centred_weight(torch.float32) * s_out.float().view(view)
            if s_in is not None:
                w = w * s_in.float().view((1, -1) + (1,) * (len(self.weight_shape) - 2))
            return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare_input(x)
        s_in, s_out = self.routed_scales(x.shape[0])
        return _ScaledOp.apply(x, s_in, s_out, self.bias, self)

    # ---- per-op hooks (shapes and the op itself) -------------------------------------------------------------
    def _prepare_input(self, x):
        return x

    def _fold_in(self, g_s_in):
        return g_s_in


@register_qmodule(nn.Linear)
class QLinear(QuantizedLayer):
    channel_dim = -1

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

    @staticmethod
    def _rows_view(s, x):  # (R, C) -> broadcastable against x (R|B, ..., C)
        return s.view(s.shape[0], *([1] * (x.dim() - 2)), s.shape[1]) if x.dim() >= 2 else s.view(-1)

    def _broadcast_in(self, s, x):
        return self._rows_view(s, x)

    def _broadcast_out(self, s, y):
        return self._rows_view(s, y)

    def _broadcast_bias(self, b, y):
        return b

    def _op(self, xs, c):
        return xs.matmul(c.t())

    def _op_input_grad(self, g, c, x_shape):
        return g.matmul(c)

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
        self._explicit_pad = padding_mode != "zeros" or isinstance(ref.padding, str)
        self._pad = ref._reversed_padding_repeated_twice
        self._op_padding = (0, 0) if self._explicit_pad else ref.padding

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

    def _prepare_input(self, x):
        if not self._explicit_pad:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pad, mode=mode)

    def _broadcast_in(self, s, x):  # (R, Cin/groups) -> (R, Cin, 1, 1)
        return s.repeat(1, self.groups)[:, :, None, None]

    def _broadcast_out(self, s, y):
        return s[:, :, None, None]

    def _broadcast_bias(self, b, y):
        return b[:, None, None]

    def _fold_in(self, g_s_in):  # (R, Cin) -> (R, Cin/groups): a group-shared scale sums over groups
        return g_s_in.view(g_s_in.shape[0], self.groups, -1).sum(1)

    def _op(self, xs, c):
        return F.conv2d(xs, c, None, self.stride, self._op_padding, self.dilation, self.groups)

    def _op_input_grad(self, g, c, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, c, g, self.stride, self._op_padding, self.dilation, self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, experts={self.num_experts}")
