"""A one-minute tour on a tiny random SD-format model: quantize to W4, train the scales, save, reload, sample.

The weights are random (the embedded pretrained default arrives with the toy world), so the image is noise; what the
demo shows is the mechanics and the numbers: bytes per weight, trainable scales, adapter size, loss going down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .progress import pipeline_progress, progress
from .serialization import load_adapter, load_quantized, save_adapter, save_quantized
from .tuning import QuantConfig, quantize_, scale_parameters
from .tuning.model import weight_bytes


def tiny_pipeline_parts(seed: int = 0):
    """A small UNet2DConditionModel + AutoencoderKL + DDIM scheduler in Stable Diffusion's format."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return unet, vae, scheduler


DEMO_FILES = ("quantized-base", "adapter", "sample.png", "summary.json")  # what run_demo writes into its folder


def run_demo(out: Path, steps: int = 40, bits: int = 4, seed: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    t0 = time.perf_counter()
    unet, vae, scheduler = tiny_pipeline_parts(seed)
    n_float = sum(p.numel() for p in unet.parameters())
    quantize_(unet, QuantConfig(bits=bits, method="tuneqdm", experts=4, init="mse"))
    save_quantized(unet, out / "quantized-base", base_id="tuneqdm-demo-random-unet")

    # "personalize": a red square on blue, encoded once, and a fixed prompt embedding
    image = torch.zeros(1, 3, 32, 32)
    image[:, 2] = 0.6
    image[:, :, 8:24, 8:24] = torch.tensor([0.9, -0.8, -0.8])[:, None, None]
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    prompt = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(scale_parameters(unet), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for _ in progress(range(steps), desc="demo: train the scales", unit="step"):
        noise = torch.randn(4, *latents.shape[1:], generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)  # each sample routed to its own expert
        noisy = scheduler.add_noise(latents.expand(4, -1, -1, -1), noise, t)
        loss = F.mse_loss(unet(noisy, t, prompt.expand(4, -1, -1)).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    save_adapter(unet, out / "adapter", extra={"prompt": "demo embedding"})

    # reload from disk (no float weights are built) and sample with classifier-free guidance
    unet = load_adapter(load_quantized(out / "quantized-base"), out / "adapter").eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline_progress(pipe, "demo: sample")
    img = pipe(prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt), num_inference_steps=20,
               guidance_scale=5.0, height=32, width=32, generator=torch.Generator().manual_seed(seed)).images[0]
    img.resize((128, 128)).save(out / "sample.png")
    wbytes, wnumel = weight_bytes(unet)
    summary = {
        "float_params": n_float, "weight_bits": bits, "weight_bytes_per_param": round(wbytes / wnumel, 4),
        "trainable_scales": sum(p.numel() for p in scale_parameters(unet)),
        "adapter_bytes": (out / "adapter" / "adapter.safetensors").stat().st_size,
        "loss_first_10": round(sum(losses[:10]) / 10, 4), "loss_last_10": round(sum(losses[-10:]) / 10, 4),
        "seconds": round(time.perf_counter() - t0, 1), "outputs": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
