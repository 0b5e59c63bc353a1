"""quantize_ on diffusers denoisers (SD 1.x/2.x and SDXL UNets, SD3 and DiT transformers), gradient checkpointing."""

import pytest
import torch

import tuneqdm
from tuneqdm import QuantConfig

from tiny_models import perturb_scales, tiny_dit, tiny_sd3_transformer, tiny_sdxl_unet, tiny_unet


def _unet_call(model, batch, t):
    g = torch.Generator().manual_seed(1)
    return lambda: model(torch.randn(batch, 4, 16, 16, generator=g), t, torch.randn(batch, 5, 32, generator=g)).sample


def _sdxl_call(model, batch, t):
    g = torch.Generator().manual_seed(1)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                "time_ids": torch.randn(batch, 6, generator=g)}}
    return lambda: model(torch.randn(batch, 4, 16, 16, generator=g), t, torch.randn(batch, 5, 32, generator=g), **kw).sample


def _sd3_call(model, batch, t):
    g = torch.Generator().manual_seed(1)
    return lambda: model(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                         encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                         pooled_projections=torch.randn(batch, 16, generator=g), timestep=t).sample


def _dit_call(model, batch, t):
    g = torch.Generator().manual_seed(1)
    return lambda: model(torch.randn(batch, 4, 8, 8, generator=g), timestep=t,
                         class_labels=torch.randint(0, 10, (batch,), generator=g)).sample


ARCHS = {
    "sd1": (tiny_unet, _unet_call),
    "sd2": (lambda: tiny_unet(use_linear_projection=True, attention_head_dim=(2, 4)), _unet_call),
    "sdxl": (tiny_sdxl_unet, _sdxl_call),
    "sd3": (tiny_sd3_transformer, _sd3_call),
    "dit": (tiny_dit, _dit_call),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_denoiser_equals_its_dequantized_twin_per_expert(arch):
    build, call = ARCHS[arch]
    float_model = build().eval()  # eval: DiT drops class labels at random in training mode
    n_linear_conv = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in float_model.modules())
    model = tuneqdm.quantize_(float_model, QuantConfig(bits=4, method="tuneqdm", experts=4, init="mse"))
    assert len(tuneqdm.quantized_layers(model)) == n_linear_conv  # every Linear and Conv2d
    perturb_scales(model)
    t = torch.tensor([700, 700])  # expert 2 for both samples
    with torch.no_grad():
        got = call(model, 2, t)()
        twin = tuneqdm.dequantize_(model, expert=2)
        want = call(twin, 2, t)()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "dit"])
def test_mixed_timesteps_route_per_sample(arch):
    build, call = ARCHS[arch]
    model = tuneqdm.quantize_(build().eval(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="minmax"))
    perturb_scales(model)
    with torch.no_grad():
        both = call(model, 2, torch.tensor([50, 950]))()
        first = call(model, 2, torch.tensor([50, 50]))()
        second = call(model, 2, torch.tensor([950, 950]))()
    # float summation order depends on the batch's composition (BLAS blocking): 1e-4 relative, while the wrong
    # expert moves outputs by orders of magnitude more (asserted below)
    torch.testing.assert_close(both[0], first[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], second[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first[1], second[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    build, call = ARCHS[arch]
    grads = []
    for ckpt in (False, True):
        model = tuneqdm.quantize_(build(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="minmax"))
        perturb_scales(model)
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        call(model, 2, torch.tensor([100, 900]))().pow(2).mean().backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in tuneqdm.scale_parameters(model)])
    assert sum(g is not None for g in grads[0]) > 0
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
