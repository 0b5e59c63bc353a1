"""How far `train --activation_bits 8` moves the scale gradients from the exact path's, layer by layer, on an
SD-1.5-size UNet (random weights, W4 TuneQDM K=4, scales moved by 2 % as training moves them), one fixed batch
(64x64 latents, 77 text tokens, t = 500), for each way the 8-bit backward computes the input gradient
(``tuneqdm.quant.layers.INPUT_GRAD_CHOICES``). The issue-29 target: cosine >= 0.99 per layer.

    python benchmarks/train_int8_gradients.py > docs/benchmarks/train_int8_gradients.json

The tiny-UNet version of this check is a test (tests/test_train_int8.py); this is the same at real width, where a
test would take minutes.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import tuneqdm
from tuneqdm.memory import pin_mmap_threshold
from tuneqdm.quant.layers import INPUT_GRAD_CHOICES
from tuneqdm.quant.paths import DynamicActivations

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from train_memory import quantized_base  # noqa: E402  (the same cached SD-1.5-size W4 base)


def main() -> None:
    pin_mmap_threshold()
    unet = tuneqdm.load_quantized(quantized_base(4))
    tuneqdm.configure_(unet, method="tuneqdm", experts=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuneqdm.scale_parameters(unet):
            p.mul_(1 + 0.02 * torch.randn(p.shape, generator=g))
    latents, text = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 768, generator=g)
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([500])

    def grads() -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        F.mse_loss(unet(latents + noise, t, encoder_hidden_states=text).sample, noise).backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    exact = grads()
    DynamicActivations().install(unet)
    out = {"model": "SD-1.5-size UNet, random weights, W4 TuneQDM K=4", "parameters": len(exact), "rows": []}
    for choice in INPUT_GRAD_CHOICES:
        for layer in tuneqdm.quantized_layers(unet).values():
            layer.input_grad = choice
        got = grads()
        cos = {n: float(F.cosine_similarity(exact[n].flatten(), got[n].flatten(), dim=0)) for n in exact}
        values = sorted(cos.values())
        row = {"input_grad": choice, "min": values[0], "median": values[len(values) // 2],
               "below_0.99": sum(v < 0.99 for v in values), "lowest": sorted(cos.items(), key=lambda kv: kv[1])[:10],
               "cosine": cos}
        out["rows"].append(row)
        print(f"input_grad={choice}: min {row['min']:.4f}, median {row['median']:.5f}, "
              f"{row['below_0.99']} of {len(values)} below 0.99", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
