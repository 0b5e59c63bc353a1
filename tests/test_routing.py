"""Per-sample timestep routing: the formula, batch-of-2 == 2 x batch-of-1, and routing inside diffusers pipelines."""

import pytest
import torch

import tuneqdm
from tuneqdm import QuantConfig, TuneQDMError
from tuneqdm.tuning.routing import expert_for_timestep

from tiny_models import perturb_scales, tiny_unet


def test_expert_formula():
    t = torch.tensor([0, 249, 250, 499, 500, 999, 1000, 1500, -3])
    assert expert_for_timestep(t, 4, 1000).tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 0]
    assert expert_for_timestep(torch.tensor([998.9, 333.33]), 3, 1000).tolist() == [2, 0]
    assert expert_for_timestep(torch.tensor(999), 1, 1000).tolist() == [0]


@pytest.fixture
def unet():
    u = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="minmax"))
    perturb_scales(u)
    return u


def test_mixed_batch_equals_samples_alone(unet):
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    t = torch.tensor([900, 10])  # experts 3 and 0
    y = unet(x, t, emb).sample
    y.pow(2).sum().backward()
    batch_grads = [p.grad.clone() if p.grad is not None else None for p in tuneqdm.scale_parameters(unet)]
    unet.zero_grad(set_to_none=True)
    ys = []
    for i in range(2):
        yi = unet(x[i : i + 1], t[i : i + 1], emb[i : i + 1]).sample
        yi.pow(2).sum().backward()  # gradients accumulate over the two single-sample calls
        ys.append(yi)
    torch.testing.assert_close(y, torch.cat(ys), rtol=1e-5, atol=1e-6)
    for got, want in zip(batch_grads, [p.grad for p in tuneqdm.scale_parameters(unet)]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)  # fp32 sums in another order
    # experts 1 and 2 were not sampled: no gradient; 0 and 3 were
    layer = unet.conv_in
    assert layer.s_out[1].grad is None and layer.s_out[2].grad is None
    assert layer.s_out[0].grad is not None and layer.s_out[3].grad is not None


def test_routing_changes_outputs_and_scalar_timestep_broadcasts(unet):
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        a = unet(x, 100, emb).sample
        b = unet(x, torch.tensor([100, 100]), emb).sample
        c = unet(x, 600, emb).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_model_without_timestep_argument_needs_one():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    tuneqdm.quantize_(m, QuantConfig(bits=8, experts=2))
    with pytest.raises(TuneQDMError, match="no timestep for the scale experts: call the model with its `timestep` argument"):
        m(torch.randn(1, 4))
    tuneqdm.set_timesteps(m, torch.tensor([0, 999]))
    assert m(torch.randn(2, 4)).shape == (2, 4)
    with pytest.raises(TuneQDMError, match="a quantized layer got a batch of 3 but the timestep routing has 2 samples"):
        m(torch.randn(3, 4))


def _pipeline(unet, scheduler_name):
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline)

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    cls = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[scheduler_name]
    scheduler = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_pipeline_routes_each_step_with_cfg(unet, scheduler):
    pipe = _pipeline(unet, scheduler)
    router = tuneqdm.tuning.model.quant_state(unet).router
    seen = []
    unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[1], router.route)), with_kwargs=True)
    emb, neg = torch.randn(1, 5, 32), torch.zeros(1, 5, 32)
    pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=6, guidance_scale=5.0,
         output_type="pt", generator=torch.Generator().manual_seed(0))
    assert len(seen) == 6
    experts_seen = set()
    for t, route in seen:
        expected = expert_for_timestep(t, 4, 1000).tolist()
        assert route.experts == expected * 2 if len(expected) == 1 else route.experts == expected  # CFG doubles the batch
        experts_seen.update(route.experts)
    assert experts_seen == {0, 1, 2, 3}  # a 6-step schedule visits every interval
