"""Fast sampling paths of the quantized layers: integer matmuls for quantized activations, held integer grids for
weight-only sampling. Measured first (docs/benchmarks/kernel_shapes.md): on this CPU ``torch._int_mm`` beats the fp32
matmul at diffusion shapes, and rebuilding a float weight from 4-bit codes costs more than the matmul for layers with
few rows (cross-attention, low resolutions).

Integer path (Linear and 1x1 conv, no gradient). With the activation ``x̂ = (q − z_x) s_x`` (``q`` uint8) and the
weight ``Ŵ = diag(s_out) (W_q − z) diag(s_in)``, rows ``r`` = tokens/pixels, ``a = q − 128`` (int8)::

    y = s_out ⊙ s_x ⊙ (a @ W_qᵀ − Σ_k a ⊗ z − (z_x − 128) ⊗ Σ_k (W_q − z)) + b

exactly when ``s_x`` is constant along the reduction: per-position groups (DGQ) and dynamic per-token scales factor
out by rows; per-channel groups split the reduction into one integer matmul per group. ``s_in`` cannot factor out of
a calibrated quantizer (it scales ``x̂``'s channels inside the sum), so such a layer takes the reference path; the
dynamic quantizer quantizes ``x ⊙ s_in`` instead. A k x k conv with dynamic activations (one scale per sample) is
one integer matmul of the im2col'd int8 input; with calibrated per-pixel scales, one per kernel tap. Up to 4 bits
the weight goes in as the centred grid ``W_q − z`` (the ``z`` terms vanish).

Weight-only path: inside :func:`sampling_kernels` with a ``grid_bytes`` budget, each layer keeps its signed integers
unpacked as int8 (1 B/param, 4-bit ones unpacked once instead of every step), and the float weight is rebuilt from
them with the reference's own operations, so images are bit-identical to the reference path. Not the default: it
measured slower and larger than rebuilding from the packed codes (see ``DEFAULT_GRID_BYTES``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..errors import TuneQDMError
from ..files import first_line
from . import runtime
from .packing import code_offset, unpack, unpack_codes

KERNEL_MODES = ("auto", "int8", "reference")
DYNAMIC_BITS = 8  # the dynamic (uncalibrated, per-token) quantizer is int8 only: torch._int_mm's operands
FLOAT_BITS = 16  # "--activation_bits 16": activations stay in floating point
DYNAMIC_CHOICES = (DYNAMIC_BITS, FLOAT_BITS)  # what --activation_bits can be for dynamic (train-time) activations
# "auto" takes the integer path everywhere it applies on accelerators (not measured: no GPU was lent). On CPU it
# takes it for dynamic activations into layers of at least CPU_AUTO_MIN_MACS multiply-adds per call (input rows x
# weight size), where it measured faster than simulating them (docs/benchmarks/sampling_kernels.md, section 4, idle
# cores): the SD-1.5-size W4A8 step took 0.58x float vs 1.04x simulated. On the embedded toy pipeline (median layer
# 2 M multiply-adds, where the per-call passes dominate) every-layer integer, auto and simulated tied (1.99x, 2.05x,
# 2.08x float; 2.29x vs 1.98x for integer vs simulated in the contended section 3). Calibrated (DGQ) quantizers,
# whose per-pixel k x k path needs one matmul and one dequantization pass per kernel tap, measured 4x slower than
# simulating them on the toy world (0.54 vs 0.13 s/image), so "auto" simulates them on CPU; "int8" forces the
# integer path.
INT8_AUTO_DEVICES = ("cuda",)
CPU_AUTO_MIN_MACS = 2**25
INT8, GRID, REFERENCE = "int8", "int8-grid", "reference"  # the paths a layer can take
# int8 grids held during a sampling call: none by default. Measured (docs/benchmarks/sampling_kernels.md): on idle
# cores they gained nothing on the toy pipeline (1.53x float vs 1.52x rebuilding from the packed codes) and 5 % on
# an SD-size W4 step (one run) for 0.34 GiB more peak RSS; contended, they were slower (toy 1.42x vs 1.07x, SD-size
# 1.55x vs 1.36x, CPU time). Pass grid_bytes to sampling_kernels() to hold them anyway.
DEFAULT_GRID_BYTES = 0

# torch 2.13's CPU _int_mm returns wrong sums for a reduction of length 1 (seen with M = 512, N = 32); short
# reductions (a channel group of a few channels) are computed exactly in float instead.
_MIN_INT_MM_K = 8
_unavailable: set[str] = set()  # device types whose integer matmul failed (told once)


def check_kernels(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise TuneQDMError(f"unknown kernels {mode!r}: choose auto, int8 or reference")
    return mode


def check_dynamic_bits(bits) -> int:
    """``--activation_bits`` of dynamic activations (training, and sampling what was trained): 8 (int8, integer
    matmuls) or 16 (float). The one check of that setting."""
    if isinstance(bits, bool) or bits not in DYNAMIC_CHOICES:
        raise TuneQDMError(f"--activation_bits {bits!r} is not supported here: choose {DYNAMIC_BITS} (int8 activations, "
                           f"integer matmuls) or {FLOAT_BITS} (float activations)")
    return int(bits)


@dataclass
class ActInput:
    """How one call's input is quantized: ``dynamic`` (symmetric int8 per row of ``x ⊙ s_in``), or calibrated
    asymmetric uint8 with per-``position`` or per-``channel`` (scale, zero) vectors; ``labels``/``group_scale``/
    ``group_zero`` describe channel groups. ``mixed``: samples at different steps (reference path only)."""

    kind: str  # "dynamic", "position" or "channel"
    bits: int = 8
    scale: torch.Tensor | None = None  # (positions,) or (channels,)
    zero: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # (channels,) group of each channel
    group_scale: torch.Tensor | None = None  # (groups,)
    group_zero: torch.Tensor | None = None
    mixed: bool = False


def signed_grid(layer) -> torch.Tensor:
    """The layer's signed integers ``W_q`` as int8, shape (out, rest): the held grid, the int8 storage itself for
    8 bits, or a fresh unpack (kept if a sampling session's budget allows)."""
    if layer.grid is not None:
        return layer.grid
    rows = layer.weight_shape[0]
    if layer.bits == 8:
        return layer.qweight.view(rows, -1)
    grid = unpack(layer.qweight, layer.bits, layer.weight_shape.numel()).view(rows, -1)
    budget = layer.grid_budget
    if budget is not None and budget[0] >= grid.numel() and not torch.is_grad_enabled():
        budget[0] -= grid.numel()
        layer.runtime.install(runtime.GRID, grid)
    return grid


# ---- the integer path ---------------------------------------------------------------------------------------------
def int_path_reason(layer, act: ActInput, x: torch.Tensor, s_in) -> str | None:
    """Why ``layer`` cannot take the integer path for this call (None: it can)."""
    if layer.kernels == "reference" or torch.is_grad_enabled():
        return "reference requested"
    if layer.kernels == "auto" and x.device.type not in INT8_AUTO_DEVICES:
        if act.kind != "dynamic":
            return "auto: simulated calibrated activations measured faster on this device"
        if x.numel() // x.shape[layer.channel_dim] * layer.weight_shape.numel() < CPU_AUTO_MIN_MACS:
            return "auto: a small layer, simulated measured faster on this device"
    if act.mixed or act.bits != 8:
        return "mixed steps or not 8-bit"
    if x.dtype != torch.float32:
        return "not float32"
    if act.kind != "dynamic" and s_in is not None:
        return "s_in inside a calibrated quantizer"
    if layer.channel_dim == 1 and not layer.is_pointwise():
        if layer.groups != 1 or layer.explicit_padding:
            return "grouped conv or explicit padding"
        if act.kind == "channel":
            return "channel groups in a k x k conv"
    if x.device.type in _unavailable:
        return "integer matmul unavailable"
    return None


def per_sample_scale(layer) -> bool:
    """Whether dynamic activations into ``layer`` take one scale per sample (k x k convs: a per-pixel scale would not
    factor out of the sum over kernel taps) rather than one per token or pixel (Linear, 1x1 conv)."""
    return layer.channel_dim == 1 and not layer.is_pointwise()


def _int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``a @ wᵀ`` in int32, or None (with one line, once per device type) where this build has no such kernel."""
    if a.shape[1] < _MIN_INT_MM_K:  # exact in float32 at this depth (|sum| < 2^24)
        return (a.float() @ w.float().t()).to(torch.int32)
    try:
        return torch._int_mm(a, w.t())
    except (RuntimeError, NotImplementedError) as e:
        kind = a.device.type
        if kind not in _unavailable:
            _unavailable.add(kind)
            print(f"tuneqdm: no integer matmul on {kind} ({first_line(e, 120)}); using the reference path", file=sys.stderr)
        return None


def _rows(layer, x: torch.Tensor) -> torch.Tensor:
    """The input as (rows, channels): tokens of a Linear, pixels of a 1x1 conv (a view where the layout allows)."""
    if layer.channel_dim == -1:
        return x.reshape(-1, x.shape[-1])
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _quantize(layer, x2d: torch.Tensor, act: ActInput, s_in, positions: int):
    """(a int8, row scale or None, row zero − 128 or None, channel zero − 128 or None) of the input rows."""
    if act.kind == "dynamic":
        xs = x2d * s_in if s_in is not None else x2d
        steps, scale = dynamic_steps(xs, 1)
        return steps.to(torch.int8), scale.view(-1), None, None
    shape = (-1, 1) if act.kind == "position" else (1, -1)
    scale, zero = act.scale.view(shape), act.zero.view(shape)
    if act.kind == "position":  # the calibrated vector covers one sample; rows run over samples
        repeats = x2d.shape[0] // positions
        scale, zero = scale.repeat(repeats, 1), zero.repeat(repeats, 1)
    q = torch.div(x2d, scale).round_().add_(zero).clamp_(0, 2**act.bits - 1).sub_(128).to(torch.int8)
    if act.kind == "position":
        return q, scale.view(-1), zero.view(-1) - 128, None
    return q, None, None, act.zero - 128


def int_forward(layer, x: torch.Tensor, s_in, s_out, act: ActInput) -> torch.Tensor | None:
    """``layer``'s output for the quantized input by integer matmuls (see the module docstring); None if the
    integer matmul is unavailable here."""
    if act.kind == "dynamic" and per_sample_scale(layer):
        y = _conv_im2col(layer, x, s_in)
        return None if y is None else _finish(layer, y, s_out)
    positions = x.shape[1:-1].numel() if layer.channel_dim == -1 else x.shape[2:].numel()
    a, row_scale, row_zero, chan_zero = _quantize(layer, _rows(layer, x), act, s_in, positions)
    wq = signed_grid(layer)
    z = layer.zero_point.float()
    if layer.channel_dim == 1 and not layer.is_pointwise():
        y = _conv_taps(layer, x.shape, a, row_scale, row_zero, wq, z)
        return None if y is None else _finish(layer, y, s_out)
    if act.kind == "channel":
        y = _grouped_matmul(a, wq, z, act, chan_zero)
    else:
        w, wz = _centred(layer)
        y = _int_mm(a, w)
        if y is None:
            return None
        y = _zero_point_corrected(y, a, w, wz, row_zero)
    if y is None:
        return None
    if row_scale is not None:
        y.mul_(row_scale[:, None])
    if layer.channel_dim == -1:
        return _finish(layer, y, s_out).view(*x.shape[:-1], y.shape[1])
    return _finish(layer, y.view(x.shape[0], *x.shape[2:], -1), s_out)


def _centred(layer, taps: int = 1):
    """The weight matrix as (int8 ``w``, float zero-point ``z`` or None) with ``W_q − z = w − z``, rows = output
    channels, columns tap-major (``taps`` > 1: a k x k conv's (out, in, k, k) as (out, k, k, in), the im2col order).
    Up to 4 bits ``w`` is the centred grid itself (``|W_q − z| ≤ 2^bits − 1`` fits int8), which saves the zero-point
    passes over the input and the output, computed from the packed codes in one pass (with the transposition);
    ``W_q`` and ``z`` for 8 bits."""
    n = layer.weight_shape[0]
    if layer.bits == 8 or layer.grid is not None:
        w = signed_grid(layer)
        w = w if taps == 1 else w.view(n, -1, taps).transpose(1, 2).reshape(n, -1)
        return (w, layer.zero_point.float()) if layer.bits == 8 else (w.sub(layer.zero_point[:, None]), None)
    codes = unpack_codes(layer.qweight, layer.bits, layer.weight_shape.numel()).view(torch.int8).view(n, -1, taps)
    shift = (layer.zero_point + code_offset(layer.bits)).view(-1, 1, 1)  # codes = W_q + offset, both below 2^4
    w = codes.new_empty(n, taps, codes.shape[1])
    torch.sub(codes.transpose(1, 2), shift, out=w)
    return w.view(n, -1), None


def _zero_point_corrected(y: torch.Tensor, a: torch.Tensor, w: torch.Tensor, z, row_zero):
    """``(a − row_zero)(w − z)ᵀ`` in float from the int32 product ``a wᵀ``: the zero-point terms factor out as
    one rank-1 update each (``z``: None for a centred ``w``; ``row_zero``: the input's zero-point per row, None for
    symmetric inputs)."""
    y = y.float()
    if z is not None:
        y.addr_(a.sum(dim=1, dtype=torch.int32).float(), z, alpha=-1)
    if row_zero is not None:
        w_sum = w.sum(dim=1, dtype=torch.int32).float()
        y.addr_(row_zero, w_sum if z is None else w_sum - w.shape[1] * z, alpha=-1)
    return y


def _finish(layer, y: torch.Tensor, s_out) -> torch.Tensor:
    """``s_out ⊙ y + b``; a conv's (B, H, W, N) result goes back to (B, N, H, W)."""
    if layer.bias is not None:
        torch.addcmul(layer.bias.float(), y, s_out.float(), out=y)  # one pass over the output, not two
    else:
        y.mul_(s_out.float())
    return y if layer.channel_dim == -1 else y.permute(0, 3, 1, 2).contiguous()


def _conv_geometry(layer, h: int, w: int) -> tuple[int, int]:
    """The output's (height, width)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer._op_padding
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _tap_slices(layer, ho: int, wo: int, stride=None):
    """Per kernel tap (i, j), tap-major: the (batch, row, column) slices of the padded input that it reads."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, stride or layer.stride, layer.dilation
    return [(slice(None), slice(i * dh, i * dh + (ho - 1) * sh + 1, sh), slice(j * dw, j * dw + (wo - 1) * sw + 1, sw))
            for i in range(kh) for j in range(kw)]


def _conv_im2col(layer, x: torch.Tensor, s_in) -> torch.Tensor | None:
    """A k x k conv of dynamically quantized activations (symmetric int8, one scale per sample: the same integers
    as :func:`dynamic_fake_quantize`) as ONE integer matmul of the im2col'd int8 input, scaled once per output
    row. Returns (B, H_out, W_out, out) before ``s_out`` and the bias."""
    xs = x * s_in[:, None, None] if s_in is not None else x
    steps, scale = dynamic_steps(xs, (1, 2, 3))
    return _im2col_product(layer, steps.to(torch.int8), scale.view(-1))


def _im2col(layer, a: torch.Tensor, padding: tuple[int, int], out_hw: tuple[int, int], stride=None) -> torch.Tensor:
    """The (B·H_out·W_out, taps·C) tap-major columns of an int8 (B, C, H, W) input under ``layer``'s kernel and
    dilation, with this ``padding`` and ``stride`` (default the layer's)."""
    b, c, h, w = a.shape
    (kh, kw), (ph, pw), (ho, wo) = layer.kernel_size, padding, out_hw
    a_pad = a.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
    a_pad[:, ph:ph + h, pw:pw + w] = a.permute(0, 2, 3, 1)
    cols = a.new_empty(b, ho, wo, kh * kw, c)
    for t, rows in enumerate(_tap_slices(layer, ho, wo, stride)):
        cols[:, :, :, t] = a_pad[rows]
    return cols.view(b * ho * wo, kh * kw * c)


def _im2col_product(layer, a: torch.Tensor, scale: torch.Tensor, grid=None) -> torch.Tensor | None:
    """``scale ⊙ conv(a, W_q − z)`` of an int8 (B, C, H, W) input with one scale per sample, as one integer matmul
    of its im2col'd columns: (B, H_out, W_out, out). ``grid``: the layer's :func:`_centred` tap-major grid if the
    caller already has it."""
    b, _, h, w = a.shape
    (kh, kw) = layer.kernel_size
    ho, wo = _conv_geometry(layer, h, w)
    cols = _im2col(layer, a, layer._op_padding, (ho, wo))
    w_mat, z = grid or _centred(layer, kh * kw)
    y = _int_mm(cols, w_mat)
    if y is None:
        return None
    y = _zero_point_corrected(y, cols, w_mat, z, None)
    return y.mul_(scale.repeat_interleave(ho * wo)[:, None]).view(b, ho, wo, -1)


def _conv_taps(layer, shape, a, row_scale, row_zero, wq, z) -> torch.Tensor | None:
    """A k x k conv as one integer matmul per kernel tap: tap (i, j) multiplies the input pixels it reads (each with
    its own row scale, so per-pixel scales stay exact) by the weight's (out, in) slice at (i, j). Zero padding
    gets a zero scale. Returns (B, H_out, W_out, out) before ``s_out`` and the bias."""
    b, c, h, w = shape
    (kh, kw), (ph, pw) = layer.kernel_size, layer._op_padding
    ho, wo = _conv_geometry(layer, h, w)
    a_pad = a.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
    a_pad[:, ph:ph + h, pw:pw + w] = a.view(b, h, w, c)
    s_pad = row_scale.new_zeros(b, h + 2 * ph, w + 2 * pw)
    s_pad[:, ph:ph + h, pw:pw + w] = row_scale.view(b, h, w)
    z_pad = None
    if row_zero is not None:
        z_pad = row_zero.new_zeros(b, h + 2 * ph, w + 2 * pw)
        z_pad[:, ph:ph + h, pw:pw + w] = row_zero.view(b, h, w)
    wq = wq.view(-1, c, kh * kw)
    out = None
    for t, rows in enumerate(_tap_slices(layer, ho, wo)):
        at, wt = a_pad[rows].reshape(-1, c), wq[:, :, t].contiguous()
        y = _int_mm(at, wt)
        if y is None:
            return None
        y = _zero_point_corrected(y, at, wt, z, None if z_pad is None else z_pad[rows].reshape(-1))
        y.mul_(s_pad[rows].reshape(-1, 1))
        out = y if out is None else out.add_(y)
    return out.view(b, ho, wo, -1)


def _grouped_matmul(a, wq, z, act: ActInput, chan_zero) -> torch.Tensor | None:
    """``Σ_g s_g (a_g − z_g)(W_q,g − z)ᵀ`` over channel groups: one integer matmul per group."""
    y = None
    for g in range(act.group_scale.numel()):
        cols = torch.nonzero(act.labels == g).flatten()
        if cols.numel() == 0:
            continue
        ag, wg = a.index_select(1, cols), wq.index_select(1, cols)
        part = _int_mm(ag, wg)
        if part is None:
            return None
        part = part.float()
        part.addr_(ag.sum(dim=1, dtype=torch.int32).float(), z, alpha=-1)
        zg = float(act.group_zero[g]) - 128
        if zg:
            part.sub_(zg * (wg.sum(dim=1, dtype=torch.int32).float() - cols.numel() * z))
        part.mul_(float(act.group_scale[g]))
        y = part if y is None else y.add_(part)
    return y


def dynamic_fake_quantize(x: torch.Tensor, layer) -> torch.Tensor:
    """Reference of the dynamic quantizer, in float: symmetric int8 per token (Linear) or pixel (1x1 conv), per
    sample into a k x k conv (:func:`per_sample_scale`)."""
    dims = tuple(range(1, x.dim())) if per_sample_scale(layer) else layer.channel_dim
    steps, scale = dynamic_steps(x, dims)
    return steps.mul_(scale)


def dynamic_steps(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """(``round(x / s)`` in float, ``s``) with ``s = max |x| / 127`` over ``dims`` (kept): the integers of the
    dynamic quantizer, one code for the integer path and the reference. ``|x / s| ≤ 127`` by construction, so no
    clamp; ``max |x|`` as max(max, −min), two reductions instead of an input-sized ``|x|`` (4x faster measured)."""
    scale = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_()).clamp_min_(1e-8) / 127
    return torch.div(x, scale).round_(), scale


# ---- training: the same quantizer and integer matmuls, with a gradient ----------------------------------------------
def train_path_reason(layer, x: torch.Tensor) -> str | None:
    """Why ``layer`` cannot train through the integer path (None: it can); it then trains on float activations."""
    if layer.channel_dim == 1 and not layer.is_pointwise() and (layer.groups != 1 or layer.explicit_padding):
        return "grouped conv or explicit padding"
    if x.device.type in _unavailable:
        return "integer matmul unavailable"
    return None


def dynamic_quantize(layer, x: torch.Tensor, s_in) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ``a``, float32 ``s_x``) with ``x ⊙ s_in ≈ s_x a``, both in ``x``'s layout (``s_x`` broadcasts: one per
    token, pixel of a 1x1 conv, or sample into a k x k conv): the integers of :func:`dynamic_fake_quantize`."""
    xs = x.float() if s_in is None else x.float() * (s_in.float() if layer.channel_dim == -1 else s_in.float()[:, None, None])
    dims = tuple(range(1, x.dim())) if per_sample_scale(layer) else layer.channel_dim
    steps, scale = dynamic_steps(xs, dims)
    del xs
    return steps.to(torch.int8), scale


def train_grid(layer):
    """The layer's centred integer grid as its integer training matmuls take it (:func:`_centred`, tap-major for a
    k x k conv): unpacked once per backward for both of its products."""
    return _centred(layer, layer.weight_shape[2:].numel() if per_sample_scale(layer) else 1)


def dynamic_product(layer, a: torch.Tensor, scale: torch.Tensor, grid=None) -> torch.Tensor | None:
    """``u = s_x ⊙ (a ⊛ (W_q − z))`` in float32, in the layer's output layout, by integer matmuls (None where this
    build has none): the layer's output before ``s_out`` and the bias."""
    if per_sample_scale(layer):
        y = _im2col_product(layer, a, scale.reshape(-1), grid)
        return None if y is None else y.permute(0, 3, 1, 2).contiguous()
    rows = _rows(layer, a)
    w, z = grid or _centred(layer)
    y = _int_mm(rows, w)
    if y is None:
        return None
    y = _zero_point_corrected(y, rows, w, z, None)
    y.mul_(_rows(layer, scale))
    if layer.channel_dim == -1:
        return y.view(*a.shape[:-1], y.shape[1])
    return y.view(a.shape[0], *a.shape[2:], -1).permute(0, 3, 1, 2).contiguous()


def input_grad_reason(layer) -> str | None:
    """Why ``layer``'s input gradient cannot be an integer matmul (None: it can); it is then the float one."""
    if per_sample_scale(layer):
        (kh, kw), (dh, dw), (ph, pw) = layer.kernel_size, layer.dilation, layer._op_padding
        if layer.stride != (1, 1) or dh * (kh - 1) < ph or dw * (kw - 1) < pw:
            return "strided k x k conv"
    return None


def dynamic_input_grad(layer, g_y: torch.Tensor, s_out, s_in, grid) -> torch.Tensor | None:
    """``g_x = s_in ⊙ ((s_out ⊙ g_y) ⊛ᵀ (W_q − z))`` by one integer matmul (as SwitchBack does), with ``s_out ⊙ g_y``
    quantized to int8 like an activation: per token (Linear) or pixel (1x1 conv); per sample into a k x k conv, whose
    input gradient is the stride-1 conv of ``g_y`` with the flipped, transposed kernel, im2col'd as in the forward.
    ``grid``: :func:`train_grid`. None where this build has no integer matmul."""
    h = g_y * (s_out.float() if layer.channel_dim == -1 else s_out.float()[:, None, None])
    w, z = grid
    if per_sample_scale(layer):
        steps, scale = dynamic_steps(h, (1, 2, 3))
        del h
        b = steps.to(torch.int8)
        del steps
        (kh, kw), (dh, dw), (ph, pw) = layer.kernel_size, layer.dilation, layer._op_padding
        n_out, taps = w.shape[0], kh * kw
        w_t = w.view(n_out, kh, kw, -1).flip(1, 2).permute(3, 1, 2, 0).reshape(-1, taps * n_out)
        hx, wx = b.shape[2] + 2 * ph - dh * (kh - 1), b.shape[3] + 2 * pw - dw * (kw - 1)
        cols = _im2col(layer, b, (dh * (kh - 1) - ph, dw * (kw - 1) - pw), (hx, wx), stride=(1, 1))
        y = _int_mm(cols, w_t)
        if y is None:
            return None
        y = y.float()
        if z is not None:  # Σ over taps and output channels of cols ⊙ z[out]
            y.sub_((cols.view(-1, taps, n_out).sum(dim=1, dtype=torch.int32).float() @ z)[:, None])
        y.mul_(scale.reshape(-1).repeat_interleave(hx * wx)[:, None])
        y = y.view(b.shape[0], hx, wx, -1)
    else:
        steps, scale = dynamic_steps(_rows(layer, h), 1)
        del h
        b = steps.to(torch.int8)
        del steps
        y = _int_mm(b, w.t())
        if y is None:
            return None
        y = y.float()
        if z is not None:
            y.sub_((b.float() @ z)[:, None])
        y.mul_(scale)
        y = y.view(*g_y.shape[:-1], -1) if layer.channel_dim == -1 else y.view(g_y.shape[0], *g_y.shape[2:], -1)
    if s_in is not None:
        y.mul_(s_in.float())
    return y if layer.channel_dim == -1 else y.permute(0, 3, 1, 2).contiguous()
