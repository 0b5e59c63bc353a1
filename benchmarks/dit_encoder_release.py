"""Does the training loop's peak memory leave out the text encoders and the VAE of a DiT pipeline?

A tiny FluxPipeline (the test suite's) whose T5 encoder is made big (d_model 1024, 12 layers, about 150 M parameters,
0.6 GB in fp32, the part of FLUX.1 that dominates its text side) is trained for a few steps with ``--memory_savers``
(the default for the scale methods: prompts encoded once, every text encoder and the VAE released before step 1) and
with ``--no-memory_savers`` (they stay loaded and encode each batch). Each run is its own process; the peak is the
training loop's own (``peak_mem_mib`` of ``train_log.jsonl``, VmHWM reset at the loop's start).

    python benchmarks/dit_encoder_release.py            # writes docs/benchmarks/dit_encoder_release.{json,md}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "tuneqdm-bench-dit-release"
STEPS = 4


def build(folder: Path) -> dict:
    """The tiny Flux pipeline with a big T5 encoder; the parameter counts of its parts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import DiffusionPipeline
    from tiny_pipelines import tiny_flux_pipeline
    from transformers import T5Config, T5EncoderModel

    if not (folder / "model_index.json").is_file():
        from diffusers import FluxTransformer2DModel

        tiny_flux_pipeline(folder)
        pipe = DiffusionPipeline.from_pretrained(folder)
        vocab = pipe.text_encoder_2.config.vocab_size
        torch.manual_seed(0)
        pipe.text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=vocab, d_model=1024, d_kv=64, d_ff=4096, num_layers=12, num_heads=16, pad_token_id=vocab - 1,
            eos_token_id=vocab - 1, decoder_start_token_id=0))
        pipe.transformer = FluxTransformer2DModel(**{**pipe.transformer.config, "joint_attention_dim": 1024})
        pipe.save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    count = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
             for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    return count


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        a = np.full((32, 32, 3), (40, 200, 60), np.uint8)
        a[4 + 3 * i:20 + 3 * i, 6:22] = (220, 30, 200)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def run(base: Path, images: Path, savers: bool) -> dict:
    out = WORK / ("savers" if savers else "no-savers")
    cmd = [sys.executable, "-m", "tuneqdm.cli", "train", "--pretrained_model_name_or_path", str(base),
           "--instance_data_dir", str(images), "--instance_prompt", "a sks box", "--output_dir", str(out),
           "--resolution", "32", "--max_train_steps", str(STEPS), "--max_sequence_length", "64", "--quiet",
           "--force", "--quant_init", "minmax", "--memory_savers" if savers else "--no-memory_savers"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"memory_savers": savers, "peak_mib": max(r["peak_mem_mib"] for r in rows),
            "s_per_step": round(float(np.median([r["s_per_step"] for r in rows])), 4), "command": " ".join(cmd[1:])}


def main():
    base = WORK / "flux-big-t5"
    count = build(base)
    images = photos(WORK / "photos")
    rows = [run(base, images, True), run(base, images, False)]
    encoders_mib = 4 * sum(count[k] for k in ("text_encoder", "text_encoder_2", "vae")) / 2**20
    result = {"parameters": count, "fp32_encoders_and_vae_mib": round(encoders_mib, 1), "steps": STEPS, "rows": rows,
              "peak_difference_mib": round(rows[1]["peak_mib"] - rows[0]["peak_mib"], 1)}
    docs = ROOT / "docs" / "benchmarks"
    (docs / "dit_encoder_release.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Text encoders and VAE released before training (tiny Flux with a 0.6 GB T5)", "",
             "`python benchmarks/dit_encoder_release.py` (one run; each mode in its own process, tuneqdm W4 K=4, "
             f"{STEPS} steps, 32 px, fp32 CPU). Peak RSS of the training loop from `train_log.jsonl`.", "",
             "| memory savers | loop peak RSS (MiB) | s/step (median) |", "|---|---|---|"]
    lines += [f"| {'on' if r['memory_savers'] else 'off'} | {r['peak_mib']:.0f} | {r['s_per_step']} |" for r in rows]
    lines += ["", f"Text encoders + VAE in fp32: {encoders_mib:.0f} MiB; the loop's peak with the savers off is "
              f"{result['peak_difference_mib']:.0f} MiB higher."]
    (docs / "dit_encoder_release.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
