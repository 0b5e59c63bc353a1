"""The quantized layers: exact init, gradients equal to plain autograd, and no weight kept for backward."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tuneqdm
from tuneqdm.quant.layers import QConv2d, QLinear
from tuneqdm.tuning.config import QuantConfig
from tuneqdm.tuning.routing import Router

CONVS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=9, kernel_size=3, stride=2, padding=2, dilation=2),
    dict(in_channels=6, out_channels=4, kernel_size=(1, 3), padding=(0, 1), bias=False),
    dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=3),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
    dict(in_channels=6, out_channels=8, kernel_size=3, padding="same", padding_mode="reflect"),
    dict(in_channels=6, out_channels=8, kernel_size=4, padding=1, padding_mode="circular", stride=2),
]


def _float_twin(layer):
    """A float layer with the quantized layer's dequantized weight (the reference)."""
    return layer.to_float(0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_init_matches_dequantized_float_layer(bits):
    lin = nn.Linear(24, 10)
    q = QLinear.from_module(lin, bits, "mse")
    q.configure_scales(1, train_s_in=True)
    x = torch.randn(3, 5, 24)
    y, ref = q(x), F.linear(x, q.dequantized_weight(-1), q.bias)
    assert ((y - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("kw", CONVS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_conv_init_matches_dequantized_float_layer(kw, bits):
    conv = nn.Conv2d(**kw)
    q = QConv2d.from_module(conv, bits, "minmax")
    q.configure_scales(1, train_s_in=True)
    assert q.s_in[0].shape == (kw["in_channels"] // kw.get("groups", 1),)
    x = torch.randn(2, kw["in_channels"], 9, 11)
    y, ref = q(x), _float_twin(q)(x)
    assert y.shape == conv(x).shape
    assert ((y - ref).norm() / ref.norm()) <= 1e-5


def _reference(layer, x, experts, s_out_sets, s_in_sets, bias):
    """Plain autograd: rebuild each sample's float weight and run the float op."""
    outs = []
    for b, k in enumerate(experts):
        c = layer.centred_weight()
        view = (-1,) + (1,) * (c.dim() - 1)
        w = c * s_out_sets[k].view(view) * s_in_sets[k].view((1, -1) + (1,) * (c.dim() - 2))
        xb = layer._prepare_input(x[b : b + 1])
        if isinstance(layer, QLinear):
            outs.append(F.linear(xb, w, bias))
        else:
            outs.append(F.conv2d(xb, w, bias, layer.stride, layer._op_padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def _make(kind, kw):
    if kind == "linear":
        return QLinear.from_module(nn.Linear(12, 7), 4, "minmax"), torch.randn(3, 5, 12)
    return QConv2d.from_module(nn.Conv2d(**kw), 4, "minmax"), torch.randn(3, kw["in_channels"], 7, 8)


@pytest.mark.parametrize("kind,kw", [("linear", None)] + [("conv", kw) for kw in CONVS])
@pytest.mark.parametrize("experts", [[0, 0, 0], [2, 0, 2]])
@pytest.mark.parametrize("weight_chunk", [None, 20], ids=["whole", "row-blocks"])
def test_gradients_equal_plain_autograd(kind, kw, experts, weight_chunk, monkeypatch):
    if weight_chunk is not None:  # rebuild and apply the weight 4 output channels at a time (as for SD's largest)
        monkeypatch.setattr("tuneqdm.quant.layers._WEIGHT_CHUNK", weight_chunk)
    layer, x = _make(kind, kw)
    if weight_chunk is not None and layer.weight_shape[0] > 4 and not (kind == "conv" and kw.get("groups", 1) > 1):
        assert len(layer.row_blocks()) > 1
    layer.configure_scales(3, train_s_in=True, train_bias=layer.bias is not None)
    for p in layer.scale_parameters():  # distinct experts
        p.data.mul_(1 + 0.3 * torch.rand(p.shape))
    router = Router(QuantConfig(method="tas", experts=3))
    router.set_experts(experts)
    layer.router = router
    x1 = x.clone().requires_grad_(True)
    g = torch.randn_like(layer(x1))
    (layer(x1) * g).sum().backward()
    ours = [x1.grad] + [p.grad for p in layer.scale_parameters()] + ([layer.bias.grad] if layer.bias is not None else [])

    # reference on leaf copies of the same tensors
    s_out = [p.detach().clone().requires_grad_(True) for p in layer.s_out]
    s_in = [p.detach().clone().requires_grad_(True) for p in layer.s_in]
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    (_reference(layer, x2, experts, s_out, s_in, bias) * g).sum().backward()
    refs = [x2.grad] + s_out + s_in + ([bias] if bias is not None else [])
    refs = [refs[0]] + [r.grad for r in refs[1:]]
    for got, want in zip(ours, refs):
        if want is None:  # an expert absent from the batch: no gradient at all, not a zero one
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    unused = set(range(3)) - set(experts)
    assert all(layer.s_out[k].grad is None and layer.s_in[k].grad is None for k in unused)


def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sizes, out


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_keeps_no_weight_sized_tensor(kind):
    if kind == "linear":
        layer, x = QLinear.from_module(nn.Linear(256, 384), 4, "minmax"), torch.randn(2, 3, 256)
    else:
        layer, x = QConv2d.from_module(nn.Conv2d(64, 96, 3, padding=1), 4, "minmax"), torch.randn(2, 64, 4, 4)
    layer.configure_scales(1, train_s_in=True)
    w_numel = layer.weight_shape.numel()
    sizes, y = _saved_numels(lambda: layer(x.requires_grad_(True)))
    assert w_numel not in sizes
    # input (for s_in), output (for s_out), the two scale vectors and the bias: nothing else
    small = layer.s_in[0].numel() + layer.s_out[0].numel() + layer.bias.numel()
    assert sum(sizes) == x.numel() + y.numel() + small
    # while the official-style layer (float weight rebuilt inside autograd) keeps at least one weight-sized tensor
    sizes_naive, _ = _saved_numels(
        lambda: F.linear(x, layer.dequantized_weight(0).requires_grad_(True)) if kind == "linear"
        else F.conv2d(x, layer.dequantized_weight(0).requires_grad_(True), padding=1)
    )
    assert w_numel in sizes_naive


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (4, 2), (8, 1)])
def test_storage_bytes(bits, per_byte):
    conv = QConv2d.from_module(nn.Conv2d(13, 7, 3), bits, "minmax")
    numel = 7 * 13 * 9
    assert conv.qweight.nbytes == math.ceil(numel / per_byte)
    assert conv.weight_bytes == math.ceil(numel / per_byte) + 7 * 1 + 7 * 4  # + int8 zero-points + fp32 scales
    assert not any(t.is_floating_point() and t.numel() >= numel for t in conv.state_dict().values())


def test_layers_have_only_scales_trainable_by_default():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Conv2d(6, 6, 1))
    tuneqdm.quantize_(m, tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=2))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {f"{i}.{s}.{k}" for i in (0, 2) for s in ("s_out", "s_in") for k in (0, 1)}
