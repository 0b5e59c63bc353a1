"""Methods are configuration; experts are independent under AdamW; S1 keeps the original scales outside its intervals."""

import pytest
import torch
from torch import nn

import tuneqdm
from tuneqdm import QuantConfig, TuneQDMError

from tiny_models import perturb_scales, tiny_unet


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))


@pytest.mark.parametrize(
    "method,experts,s_in,k",
    [("peqa", None, False, 1), ("tuneqdm", None, True, 4), ("tuneqdm", 2, True, 2), ("mcsu", None, True, 1),
     ("tas", None, False, 4), ("tas", 3, False, 3)],
)
def test_methods_select_scales(method, experts, s_in, k):
    m = tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, method=method, experts=experts))
    layer = m[0]
    assert layer.num_experts == k and layer.trains_s_in is s_in
    n = sum(p.numel() for p in tuneqdm.scale_parameters(m))
    assert n == k * (16 + 8) + (k * (8 + 16) if s_in else 0)  # s_out: out features; s_in: in features


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3), "unsupported bit width 3: choose one of 2, 4 or 8"),
        (dict(method="lora"), "unknown method 'lora': choose one of peqa, tuneqdm, mcsu, tas, s1"),
        (dict(experts=0), "experts must be an integer >= 1, got 0"),
        (dict(method="peqa", experts=4), "method 'peqa' uses one scale set; got experts=4"),
        (dict(method="tas", experts=1), "method 'tas' needs experts >= 2; got experts=1"),
        (dict(method="s1"), "method 's1' needs intervals, e.g. intervals=[(0, 250)]"),
        (dict(method="s1", intervals=[(900, 1001)]), "interval [900, 1001) is outside the timesteps [0, 1000): need 0 <= a < b <= 1000"),
        (dict(method="s1", intervals=[(-5, 10)]), "interval [-5, 10) is outside the timesteps [0, 1000)"),
        (dict(intervals=[(0, 10)]), "intervals apply to method 's1' only, not 'tuneqdm'"),
        (dict(init="absmax"), "unknown quantizer init 'absmax': choose 'minmax' or 'mse'"),
    ],
)
def test_bad_config_is_one_line_error(kwargs, message):
    with pytest.raises(TuneQDMError) as e:
        QuantConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_include_exclude_patterns():
    m = tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, include="0"))
    assert isinstance(m[0], tuneqdm.quant.QLinear) and type(m[2]) is nn.Linear
    m = tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, exclude=["0"]))
    assert type(m[0]) is nn.Linear and isinstance(m[2], tuneqdm.quant.QLinear)
    with pytest.raises(TuneQDMError, match="include pattern 'down_blocks.*' matches no Linear or Conv2d module of the model"):
        tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, include="down_blocks.*"))
    with pytest.raises(TuneQDMError, match="exclude pattern 'nope' matches no Linear or Conv2d module of the model"):
        tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, exclude="nope"))


def _train_step(unet, opt, t):
    x = torch.randn(len(t), 4, 16, 16)
    emb = torch.randn(len(t), 5, 32)
    loss = unet(x, torch.tensor(t), emb).sample.pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _expert_tensors(unet, k):
    return [p.detach().clone() for l in tuneqdm.quantized_layers(unet).values() for p in (l.s_out[k], l.s_in[k])]


def test_unsampled_experts_never_move_under_adamw():
    unet = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="minmax"))
    opt = torch.optim.AdamW(tuneqdm.scale_parameters(unet), lr=1e-2, weight_decay=0.1)
    init = {k: _expert_tensors(unet, k) for k in range(4)}
    _train_step(unet, opt, [300, 310])  # expert 1 (t*4/1000 = 1.2)
    after1 = _expert_tensors(unet, 1)
    assert not all(torch.equal(a, b) for a, b in zip(after1, init[1]))
    _train_step(unet, opt, [10, 20])  # expert 0 only: expert 1 keeps its AdamW moments and is not decayed
    _train_step(unet, opt, [100, 200])
    assert all(torch.equal(a, b) for a, b in zip(_expert_tensors(unet, 1), after1))
    assert not all(torch.equal(a, b) for a, b in zip(_expert_tensors(unet, 0), init[0]))
    for k in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(_expert_tensors(unet, k), init[k]))


def test_s1_uses_original_scales_outside_its_intervals():
    unet = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="s1", intervals=[(0, 250), (750, 1000)], init="minmax"))
    perturb_scales(unet)  # the tuned set now differs from the original scales
    ref = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="peqa", init="minmax"))  # original scales
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, emb).sample, ref(x, 500, emb).sample, rtol=0, atol=0)
        assert not torch.allclose(unet(x, 100, emb).sample, ref(x, 100, emb).sample)
        assert not torch.allclose(unet(x, 800, emb).sample, ref(x, 800, emb).sample)
    # trained only when t falls inside: no gradient at all from a step outside
    assert not unet(x, torch.tensor([500]), emb).sample.requires_grad
    unet(x, torch.tensor([100]), emb).sample.sum().backward()
    assert all(p.grad is not None for p in tuneqdm.scale_parameters(unet))


def test_configure_switches_method_from_the_same_base():
    unet = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="peqa", init="minmax"))
    before = tuneqdm.fingerprint(unet)
    tuneqdm.configure_(unet, method="tuneqdm", experts=4)
    layer = next(iter(tuneqdm.quantized_layers(unet).values()))
    assert layer.num_experts == 4 and layer.trains_s_in and tuneqdm.fingerprint(unet) == before
    with pytest.raises(TuneQDMError, match="configure_ cannot change bits/init"):
        tuneqdm.configure_(unet, bits=8)


@pytest.mark.parametrize("method", ["peqa", "tuneqdm"])
def test_scale_param_groups_are_relative_and_cover_every_scale(method):
    m = tuneqdm.quantize_(_mlp(), QuantConfig(bits=4, method=method))
    groups = tuneqdm.scale_param_groups(m, lr=1e-2)
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, tuneqdm.scale_parameters(m)))  # each scale exactly once
    for layer in (m[0], m[2]):
        (g,) = [g for g in groups if g["params"][0] is layer.s_out[0]]
        assert g["lr"] == pytest.approx(1e-2 * layer.scale.float().pow(2).mean().sqrt().item(), rel=1e-6)
    assert all(g["weight_decay"] == 0.0 for g in groups)
    if method == "tuneqdm":
        assert groups[-1]["lr"] == 1e-2 and any(p is m[0].s_in[0] for p in groups[-1]["params"])
