"""A float model's LoRA on tuneqdm's quantized UNet: how close are the images to the float model with that LoRA?

    python benchmarks/lora_composition.py                     # embedded default pipeline, 8 images, 25 DDIM steps

A LoRA (PEFT, rank 4, diffusers' targets) with random non-zero B (``--lora_std``) is made on the float UNet and
saved as diffusers' ``pytorch_lora_weights.safetensors``; then the same prompts and seeds are sampled by the float
model with it (the reference), by the W8 and W4 models (``tuneqdm.quantize_``, mse init) with it loaded through
``tuneqdm.load_pipeline(lora=...)`` (PEFT's LoRA Linear around tuneqdm's QLinear), and, for scale, by the float and
the W8 model without it. Reports the PSNR of each against the reference (mean and minimum over images) as JSON and
markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red star in the snow", "a blue box on the beach")


def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def make_lora(folder: Path, std: float, seed: int) -> tuple[Path, int]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from tuneqdm.loading import load_pipeline
    from tuneqdm.train.methods import LORA_TARGETS, add_lora

    pipe = load_pipeline()
    torch.manual_seed(seed)
    params = add_lora(pipe.unet, rank=4, targets=list(LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if p.requires_grad and ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors", sum(p.numel() for p in params)


def sample(pipe, images: int, steps: int) -> list:
    from tuneqdm.sampling import generate

    return [im for i, p in enumerate(PROMPTS)
            for im in generate(pipe, p, images // len(PROMPTS), steps, 7.5, seed=100 * i)]


def variant(bits: int | None, lora: Path | None):
    import tuneqdm

    pipe = tuneqdm.load_pipeline()
    if bits is not None:
        tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=bits, method="peqa", init="mse"))
    if lora is not None:
        from tuneqdm.loading import add_lora_file

        add_lora_file(pipe, lora)
    return pipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images in all, split over the prompts")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--lora_std", type=float, default=0.1, help="std of the random LoRA B matrices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "lora_composition"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        lora, lora_params = make_lora(Path(d), args.lora_std, args.seed)
        reference = sample(variant(None, lora), args.images, args.steps)
        rows = []
        for name, bits, with_lora in (("W8 + LoRA", 8, True), ("W4 + LoRA", 4, True),
                                      ("fp32 without LoRA", None, False), ("W8 without LoRA", 8, False)):
            imgs = sample(variant(bits, lora if with_lora else None), args.images, args.steps)
            scores = [psnr(a, b) for a, b in zip(reference, imgs)]
            rows.append({"model": name, "bits": bits, "lora": with_lora, "psnr_mean_db": float(np.mean(scores)),
                         "psnr_min_db": float(np.min(scores)), "psnr_db": scores})
            print(json.dumps(rows[-1]), flush=True)
    command = " ".join(["python benchmarks/lora_composition.py", *sys.argv[1:]])
    result = {"command": command, "settings": vars(args), "prompts": PROMPTS,
              "lora_params": lora_params, "seconds": time.time() - t0, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    md = ["# A float model's LoRA on tuneqdm's quantized UNet (embedded default pipeline)", "",
          f"Produced by `{command}` ({args.images} images over {len(PROMPTS)} prompts, "
          f"{args.steps} DDIM steps, guidance 7.5, fixed seeds; LoRA rank 4 on to_q/to_k/to_v/to_out.0 with random "
          f"B, std {args.lora_std}, {lora_params:,} parameters). PSNR against the fp32 model with the same LoRA.", "",
          "| model | PSNR mean (dB) | PSNR min (dB) |", "|---|---|---|"]
    md += [f"| {r['model']} | {r['psnr_mean_db']:.1f} | {r['psnr_min_db']:.1f} |" for r in rows]
    md += ["", "The LoRA file is loaded with `pipe.load_lora_weights` (through `tuneqdm.load_pipeline(lora=...)`, "
           "`tuneqdm generate --lora`): PEFT's stock LoRA Linear wraps tuneqdm's QLinear, so the LoRA runs beside "
           "the integer weights. The rows without the LoRA show how far the LoRA moves the images; the quantized rows "
           "with it show how much of the LoRA's effect survives quantizing the base (the base's own rounding error "
           f"stays). Took {result['seconds'] / 60:.0f} min on a shared 2-core CPU.", ""]
    Path(args.out + ".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
