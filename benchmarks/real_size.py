"""Whole-process memory of tuneqdm's commands on real-size pipelines read from disk (random weights, bf16 shards).

Each model is generated once as a diffusers pipeline folder as real checkpoints ship it (bf16 safetensors shards of
at most 2 GiB, configs, tokenizers built in code), tensor by tensor so that the generator itself never holds a model.
Then each command runs as its own process, exactly as a user runs it, and is measured from outside: its peak
resident set from the kernel at exit (``wait4``: nothing in tuneqdm resets it), and every 50 ms its RSS split into
anonymous memory and file pages (``RssAnon`` / ``RssFile``: clean mmap'd pages the kernel may drop), to say what the
peak is made of. Beside it: the training loop's own peak (``train_log.jsonl``) and every phase's (``training.json``).

    python benchmarks/real_size.py make --model sd15 --out /data/sd15          # generate a pipeline folder
    python benchmarks/real_size.py run --model sd15 --folder /data/sd15 --command train   # one row, JSON on stdout
    python benchmarks/real_size.py all --models sd15 flux-width sdxl --work /data   # every row; docs/ JSON + table
    python benchmarks/real_size.py quantize-time --folder /data/flux-dev/transformer  # s per billion, alone

Models: ``sd15`` (SD-1.5's UNet, CLIP-L, VAE), ``sdxl`` (SDXL's UNet, CLIP-L + OpenCLIP-bigG, VAE), ``flux-width``
(FLUX.1-dev's transformer width with ``--flux_blocks`` double/single blocks, T5-XXL's width with ``--t5_layers``
layers, CLIP-L, FLUX's VAE) and ``flux-dev`` (FLUX.1-dev's whole size: 19 + 38 blocks, 11.9 B; T5-XXL 24 layers, 4.76 B).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
SHARD_BYTES = 2 * GiB
PHOTOS = ROOT.parent / "shared" / "datasets" / "dreambooth" / "dog"
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
FLUX_VAE = dict(VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
NATIVE = {"sd15": 512, "sdxl": 1024, "flux-width": 512, "flux-dev": 512}


# ---- making a pipeline folder, tensor by tensor ---------------------------------------------------------------
def _random(name: str, shape, generator) -> torch.Tensor:
    """A weight of RMS about 1/sqrt(fan_in), norm weights 1, biases 0: activations stay in range through the model."""
    if len(shape) == 1:
        return (torch.ones if "norm" in name and name.endswith("weight") else torch.zeros)(shape, dtype=torch.bfloat16)
    fan_in = torch.Size(shape[1:]).numel()
    return (torch.randn(shape, generator=generator) * fan_in ** -0.5).to(torch.bfloat16)


def write_weights(model: torch.nn.Module, folder: Path, weights_name: str, seed: int) -> int:
    """Random bf16 weights for ``model`` (built on the meta device) in shards of at most SHARD_BYTES, each shard drawn
    and written before the next (the generator never holds more than one); returns the number of parameters. Tied
    parameters are written once, under their first name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    stem, ext = weights_name.rsplit(".", 1)
    plan, current, size = [], [], 0  # the shards' parameter names, planned from the shapes alone
    for name, p in model.named_parameters():
        if current and size + p.numel() * 2 > SHARD_BYTES:
            plan.append(current)
            current, size = [], 0
        current.append((name, tuple(p.shape)))
        size += p.numel() * 2
    if current:
        plan.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        file = weights_name if len(plan) == 1 else f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}"
        tensors = {name: _random(name, shape, g) for name, shape in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(plan) > 1:
        (folder / f"{weights_name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _meta(build):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _text_encoder(folder: Path, config: dict, cls_name: str, seed: int) -> int:
    import transformers

    cls = getattr(transformers, cls_name)
    config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
    config = config_cls(**config)
    model = _meta(lambda: cls(config))
    model.tie_weights()
    config.save_pretrained(folder)
    return write_weights(model, folder, "model.safetensors", seed)


def _diffusers_model(folder: Path, cls_name: str, config: dict, seed: int) -> int:
    import diffusers

    cls = getattr(diffusers, cls_name)
    model = _meta(lambda: cls(**config))
    model.save_config(folder)
    return write_weights(model, folder, "diffusion_pytorch_model.safetensors", seed)


def _tokenizer(folder: Path, max_length: int):
    """A CLIP tokenizer over single characters (the weights are random: what a prompt says does not matter here)."""
    import string

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-<>")
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(folder, model_max_length=max_length).save_pretrained(folder)


def make(model: str, out: Path, flux_blocks=(1, 2), t5_layers: int = 2) -> dict:
    """Write the pipeline folder of ``model``; returns its parameter counts by component."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    tmp = out.with_name(out.name + ".making")
    shutil.rmtree(tmp, ignore_errors=True)
    counts, index = {}, {"_diffusers_version": "0.42.0"}
    if model in ("sd15", "sdxl"):
        sdxl = model == "sdxl"
        index["_class_name"] = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        counts["unet"] = _diffusers_model(tmp / "unet", "UNet2DConditionModel", SDXL_UNET if sdxl else SD15_UNET, 1)
        counts["text_encoder"] = _text_encoder(tmp / "text_encoder", CLIP_L, "CLIPTextModel", 2)
        _tokenizer(tmp / "tokenizer", 77)
        if sdxl:
            counts["text_encoder_2"] = _text_encoder(tmp / "text_encoder_2", CLIP_G, "CLIPTextModelWithProjection", 3)
            _tokenizer(tmp / "tokenizer_2", 77)
        counts["vae"] = _diffusers_model(tmp / "vae", "AutoencoderKL", dict(VAE, sample_size=1024 if sdxl else 512,
                                                                             scaling_factor=0.13025 if sdxl else 0.18215), 4)
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(tmp / "scheduler")
        index.update(unet=["diffusers", "UNet2DConditionModel"], text_encoder=["transformers", "CLIPTextModel"],
                     tokenizer=["transformers", "CLIPTokenizer"], vae=["diffusers", "AutoencoderKL"],
                     scheduler=["diffusers", "DDIMScheduler"])
        if sdxl:
            index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        layers = (19, 38) if model == "flux-dev" else flux_blocks
        t5 = dict(T5_XXL, num_layers=24 if model == "flux-dev" else t5_layers)
        index["_class_name"] = "FluxPipeline"
        counts["transformer"] = _diffusers_model(tmp / "transformer", "FluxTransformer2DModel",
                                                 dict(FLUX_DEV, num_layers=layers[0], num_single_layers=layers[1]), 1)
        counts["text_encoder"] = _text_encoder(tmp / "text_encoder", CLIP_L, "CLIPTextModel", 2)
        counts["text_encoder_2"] = _text_encoder(tmp / "text_encoder_2", t5, "T5EncoderModel", 3)
        _tokenizer(tmp / "tokenizer", 77)
        _tokenizer(tmp / "tokenizer_2", 512)
        counts["vae"] = _diffusers_model(tmp / "vae", "AutoencoderKL", FLUX_VAE, 4)
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(tmp / "scheduler")
        index.update(transformer=["diffusers", "FluxTransformer2DModel"], text_encoder=["transformers", "CLIPTextModel"],
                     tokenizer=["transformers", "CLIPTokenizer"], text_encoder_2=["transformers", "T5EncoderModel"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], vae=["diffusers", "AutoencoderKL"],
                     scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    (tmp / "params.json").write_text(json.dumps(counts))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts


# ---- measuring one command from outside ---------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measure(argv: list[str], env: dict, cwd: Path, name: str = "command", interval: float = 0.05) -> dict:
    """Run ``argv`` and measure its whole process tree: the kernel's peak RSS of the process at exit (``wait4``),
    and the peak sampled every ``interval`` seconds with its anonymous / file-backed split."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        peak, hwm = {"VmRSS": 0}, {"VmHWM": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                tree, seen = [proc.pid], {}
                while tree:
                    pid = tree.pop()
                    tree += _children(pid)
                    for k, v in _status(pid).items():
                        seen[k] = seen.get(k, 0) + v
                if seen.get("VmRSS", 0) > peak["VmRSS"]:
                    peak.update(seen, at=time.perf_counter() - t0)
                if seen.get("VmHWM", 0) > hwm["VmHWM"]:  # when the kernel's own peak last rose
                    hwm.update(VmHWM=seen["VmHWM"], at=time.perf_counter() - t0)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({code}):\n{log.read_text()[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 3),
            "sampled_peak_gib": round(peak["VmRSS"] / GiB, 3),
            "anon_at_peak_gib": round(peak.get("RssAnon", 0) / GiB, 3),
            "file_at_peak_gib": round(peak.get("RssFile", 0) / GiB, 3), "peak_at_s": round(peak.get("at", 0), 1),
            "last_hwm_gib": round(hwm["VmHWM"] / GiB, 3), "hwm_rose_last_at_s": round(hwm.get("at", 0), 1)}


# ---- the commands, as a user runs them ----------------------------------------------------------------------
def _tuneqdm() -> list[str]:
    return [sys.executable, "-m", "tuneqdm.cli"]


def run(model: str, folder: Path, command: str, work: Path, resolution: int | None = None, checkpointing: bool = True,
        method: str = "tuneqdm", bits: int = 4, steps: int = 1, inference_steps: int = 2) -> dict:
    """One command on the pipeline in ``folder``, measured (the train row's adapter is what generate and evaluate
    sample)."""
    resolution = resolution or NATIVE[model]
    env = {**os.environ, "TUNEQDM_CACHE": str(work / "cache")}
    run_dir = work / f"{method}-w{bits}-{resolution}{'-ckpt' if checkpointing else ''}"
    base = ["--pretrained_model_name_or_path", str(folder)]
    prompt = "a sks dog in the snow"
    if command == "train":
        argv = [*_tuneqdm(), "train", *base, "--instance_data_dir", str(PHOTOS), "--instance_prompt", "a sks dog",
                "--method", method, "--bits", str(bits), "--max_train_steps", str(steps), "--resolution",
                str(resolution), "--output_dir", str(run_dir / "adapter"), "--force", "--quiet",
                *(["--gradient_checkpointing"] if checkpointing else [])]
    elif command == "generate":
        argv = [*_tuneqdm(), "generate", "--adapter", str(run_dir / "adapter"), "--prompt", prompt, "--num_images", "1",
                "--num_inference_steps", str(inference_steps), "--height", str(resolution), "--width",
                str(resolution), "--out", str(run_dir / "images"), "--force", "--quiet"]
    elif command == "evaluate":
        prompts = work / "prompts.txt"
        prompts.write_text("a {0} {1} in the snow\n")
        argv = [*_tuneqdm(), "evaluate", "--adapter", str(run_dir / "adapter"), "--instance_data_dir", str(PHOTOS),
                "--class_word", "dog", "--prompts", str(prompts), "--images_per_prompt", "1", "--evaluator", "toy",
                "--num_inference_steps", str(inference_steps), "--out", str(run_dir / "evaluation"), "--force",
                "--quiet"]
    else:
        raise SystemExit(f"unknown command {command!r}")
    row = {"model": model, "command": command, "method": method, "bits": bits, "resolution": resolution,
           "checkpointing": checkpointing, **measure(argv, env, run_dir, command)}
    if command == "train":
        row.update(_training_record(run_dir / "adapter"))
    row["params"] = json.loads((folder / "params.json").read_text())
    return row


def _training_record(out: Path) -> dict:
    """The loop's own peak (train_log.jsonl) and every phase's (training.json), in GiB."""
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    memory = json.loads((out / "training.json").read_text())["memory"]
    return {"loop_peak_gib": round(max(r["peak_mem_mib"] for r in log) / 1024, 3),
            "s_per_step": log[-1]["s_per_step"],
            "phases_gib": {k: round(v / 1024, 3) for k, v in memory["phases_mib"].items()},
            "phases_seconds": memory.get("phases_seconds", {}), "recorded_peak_gib": round(memory["peak_mib"] / 1024, 3)}


def class_images(folder: Path | None, denoiser: str, out: Path, images: int, steps: int, resolution: int,
                 bits: int = 4, cache=None) -> dict:
    """Prior preservation's class images drawn by the base's float denoiser (``resident``: loaded whole; ``streamed``:
    read module by module as it runs, what ``tuneqdm train`` does) or by its quantized base (``quantized``)."""
    from tuneqdm.loading import assemble, float_denoiser, quantized_denoiser, resolve
    from tuneqdm.memory import pin_mmap_threshold
    from tuneqdm.train.prior import ensure_class_images
    from tuneqdm.tuning import QuantConfig

    pin_mmap_threshold()  # as tuneqdm train, where class images are drawn, runs
    source = resolve(None if folder is None else str(folder))
    if denoiser == "quantized":
        model = quantized_denoiser(source, QuantConfig(bits=bits, init="mse", method="peqa"), cache=cache)
    else:
        model = float_denoiser(source, stream=denoiser == "streamed")
    pipe = assemble(source, model)
    t0 = time.perf_counter()
    ensure_class_images(pipe, out, "a photo of a dog", images, resolution, num_inference_steps=steps, batch_size=1)
    return {"seconds_per_image": round((time.perf_counter() - t0) / images, 2)}


def encoder_error(folder: Path, component: str, prompts: list[str]) -> dict:
    """The text encoder as tuneqdm runs it (streamed, float32 compute) against the encoder loaded whole in bf16 (how
    a bf16 pipeline runs it) and streamed in bf16 (streaming itself: no difference expected): cosine similarity per
    token of the last hidden state, and seconds per prompt of each."""
    from tuneqdm.loading import resolve
    from tuneqdm.loading.components import resident, streamed

    source = resolve(str(folder))
    from diffusers import DiffusionPipeline

    tokenizer = DiffusionPipeline.from_pretrained(str(folder), **{n: None for n in source.model_components()})
    tokenizer = getattr(tokenizer, component.replace("text_encoder", "tokenizer"))
    ids = [tokenizer(p, padding="max_length", max_length=min(tokenizer.model_max_length, 512), truncation=True,
                     return_tensors="pt").input_ids for p in prompts]
    outputs, seconds = {}, {}
    for name, build in (("streamed_fp32", lambda: streamed(source, component, "cpu")),
                        ("resident_bf16", lambda: resident(source, component, "cpu", torch.bfloat16)),
                        ("streamed_bf16", lambda: streamed(source, component, "cpu", torch.bfloat16))):
        model = build()
        t0 = time.perf_counter()
        with torch.no_grad():
            outputs[name] = [model(i)[0].float()[0] for i in ids]
        seconds[name] = round((time.perf_counter() - t0) / len(ids), 2)
        del model

    def cosines(a, b):
        c = torch.cat([torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in zip(outputs[a], outputs[b])])
        return {"min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6)}

    return {"component": component, "prompts": len(prompts), "seconds_per_prompt": seconds,
            "cosine_fp32_vs_bf16": cosines("streamed_fp32", "resident_bf16"),
            "streamed_bf16_equals_resident_bf16": all(torch.equal(x, y) for x, y in
                                                      zip(outputs["streamed_bf16"], outputs["resident_bf16"]))}


def quantize_time(folder: Path) -> dict:
    """The streamed mse W4 quantization of one model folder, timed alone (no cache, nothing written)."""
    from tuneqdm.shards import parameter_count, weight_files
    from tuneqdm.tuning import QuantConfig, quantize_pretrained

    params = parameter_count(weight_files(folder))
    t0 = time.perf_counter()
    quantize_pretrained(folder, QuantConfig(bits=4, init="mse"))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 1), "params": params, "seconds_per_billion": round(seconds / params * 1e9, 1),
            "threads": torch.get_num_threads()}


def compare_images(a: Path, b: Path) -> float:
    """PSNR (dB) between two folders of the same class images."""
    import numpy as np
    from PIL import Image

    pairs = [(np.asarray(Image.open(p), np.float64), np.asarray(Image.open(b / p.name), np.float64))
             for p in sorted(a.glob("*.png"))]
    mse = np.mean([np.mean((x - y) ** 2) for x, y in pairs])
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")


DOC = ROOT / "docs" / "benchmarks" / "real_size"


def run_all(models: list[str], work: Path, flux_blocks, t5_layers: int, only: list[str] | None = None) -> dict:
    """Every row of ``models`` (one process per command, one after another), merged into docs/.../real_size.json:
    train from an empty cache (the quantization is part of what is measured), generate and evaluate the adapter,
    train again without checkpointing (the cache hit), and for SD-1.5 size the class images of prior preservation by
    each kind of denoiser; for the FLUX width the T5 encoder's error in float32 against bf16."""
    path = DOC.with_suffix(".json")
    result = json.loads(path.read_text()) if path.is_file() else {"rows": [], "class_images": [], "encoders": []}
    for model in models:
        folder = work / model
        if not (folder / "params.json").is_file():
            make(model, folder, flux_blocks, t5_layers)
        runs = work / f"runs-{model}"
        shutil.rmtree(runs / "cache", ignore_errors=True)
        result["rows"] = [r for r in result["rows"] if r["model"] != model]
        commands = [("train", True), ("generate", True), ("train", False)]
        if model == "sd15":
            commands.insert(2, ("evaluate", True))
        if only:  # e.g. FLUX.1-dev size: the checkpointed train and generate only (an hour each on a CPU)
            commands = [(c, k) for c, k in commands if c in only and k]
        for command, checkpointing in commands:
            row = run(model, folder, command, runs, checkpointing=checkpointing or command != "train")
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(result, indent=1))
        if model == "sd15" and not only:
            result["class_images"] = class_image_rows(folder, runs)
        if model == "flux-width" and not only:
            result["encoders"] = [encoder_error(folder, "text_encoder_2", PROMPTS)]
        path.write_text(json.dumps(result, indent=1))
    DOC.with_suffix(".table.md").write_text(table(result))
    return result


def class_image_rows(folder: Path, runs: Path) -> list[dict]:
    """Time per image and whole-process peak of drawing class images with each kind of denoiser, at SD-1.5 size,
    and how far the quantized base's images are from the float model's on the embedded toy model (PSNR)."""
    rows = []
    script = [sys.executable, str(Path(__file__).resolve()), "class-images"]
    for denoiser in ("resident", "streamed", "quantized"):
        out = runs / f"class-{denoiser}"
        shutil.rmtree(out, ignore_errors=True)
        measured = measure([*script, "--folder", str(folder), "--denoiser", denoiser, "--out", str(out)],
                           {**os.environ, "TUNEQDM_CACHE": str(runs / "cache")}, runs, f"class-{denoiser}")
        rows.append({"model": "sd15", "denoiser": denoiser, **measured,
                     **json.loads((runs / f"class-{denoiser}.log").read_text().splitlines()[-1])})
    toy = {}
    for denoiser, bits in (("resident", 4), ("streamed", 4), ("quantized", 4), ("quantized", 2)):
        out = runs / f"toy-{denoiser}-{bits}"
        shutil.rmtree(out, ignore_errors=True)
        class_images(None, denoiser, out, 8, 25, 64, bits, cache=False)
        toy[(denoiser, bits)] = out
    for (denoiser, bits), out in toy.items():
        if denoiser != "resident":
            rows.append({"model": "toy", "denoiser": denoiser, "bits": bits if denoiser == "quantized" else None,
                         "psnr_db_vs_float": round(compare_images(out, toy[("resident", 4)]), 2)})
    return rows


PROMPTS = ["a sks dog on the beach", "a photo of a dog", "a sks dog in the snow, wearing a red hat",
           "an oil painting of a sks dog in a field of sunflowers at sunset"]


def table(result: dict) -> str:
    lines = ["| model | command | checkpointing | whole-process peak RSS (GiB) | anon / file pages at the peak (GiB) | "
             "the loop's own peak (GiB) | whole / loop | peak phase | s | quantize s |", "|" + "---|" * 10]
    for r in result["rows"]:
        phases = r.get("phases_gib") or {}
        top = max(phases, key=phases.get) if phases else "-"
        ratio = f"{r['peak_rss_gib'] / r['loop_peak_gib']:.2f}" if r.get("loop_peak_gib") else "-"
        quantize = (r.get("phases_seconds") or {}).get("denoiser", "-")
        lines.append(f"| {r['model']} | {r['command']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['peak_rss_gib']:.2f} | {r['anon_at_peak_gib']:.2f} / {r['file_at_peak_gib']:.2f} | "
                     f"{r.get('loop_peak_gib', '-')} | {ratio} | {top} | {r['seconds']:.0f} | {quantize} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--model", choices=list(NATIVE), required=True)
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--flux_blocks", type=int, nargs=2, default=(1, 2))
    mk.add_argument("--t5_layers", type=int, default=2)
    rn = sub.add_parser("run")
    rn.add_argument("--model", choices=list(NATIVE), required=True)
    rn.add_argument("--folder", type=Path, required=True)
    rn.add_argument("--command", choices=("train", "generate", "evaluate"), required=True)
    rn.add_argument("--work", type=Path, required=True)
    rn.add_argument("--resolution", type=int, default=None)
    rn.add_argument("--no_checkpointing", action="store_true")
    rn.add_argument("--method", default="tuneqdm")
    rn.add_argument("--bits", type=int, default=4)
    rn.add_argument("--inference_steps", type=int, default=2)
    ci = sub.add_parser("class-images")
    ci.add_argument("--folder", type=Path, default=None, help="a pipeline folder (default: the embedded toy one)")
    ci.add_argument("--denoiser", choices=("resident", "streamed", "quantized"), required=True)
    ci.add_argument("--out", type=Path, required=True)
    ci.add_argument("--images", type=int, default=2)
    ci.add_argument("--steps", type=int, default=5)
    ci.add_argument("--resolution", type=int, default=512)
    ci.add_argument("--bits", type=int, default=4)
    ci.add_argument("--compare", type=Path, default=None, help="another --out: print the PSNR between the two")
    al = sub.add_parser("all")
    al.add_argument("--models", nargs="+", choices=list(NATIVE), required=True)
    al.add_argument("--work", type=Path, required=True)
    al.add_argument("--flux_blocks", type=int, nargs=2, default=(1, 2))
    al.add_argument("--t5_layers", type=int, default=2)
    al.add_argument("--commands", nargs="+", choices=("train", "generate", "evaluate"), default=None,
                    help="only these (checkpointed) rows; default: every row")
    qt = sub.add_parser("quantize-time", help="seconds per billion parameters of the streamed mse quantization alone")
    qt.add_argument("--folder", type=Path, required=True, help="a model folder, e.g. /data/flux-dev/transformer")
    ee = sub.add_parser("encoder-error")
    ee.add_argument("--folder", type=Path, required=True)
    ee.add_argument("--component", default="text_encoder_2")
    args = parser.parse_args()
    if args.what == "all":
        run_all(args.models, args.work, tuple(args.flux_blocks), args.t5_layers, args.commands)
        return
    if args.what == "quantize-time":
        print(json.dumps(quantize_time(args.folder)))
        return
    if args.what == "encoder-error":
        print(json.dumps(encoder_error(args.folder, args.component, PROMPTS)))
        return
    if args.what == "class-images":
        if args.compare is not None:
            print(json.dumps({"psnr_db": round(compare_images(args.out, args.compare), 2)}))
            return
        print(json.dumps(class_images(args.folder, args.denoiser, args.out, args.images, args.steps, args.resolution,
                                      args.bits)))
        return
    if args.what == "make":
        print(json.dumps(make(args.model, args.out, tuple(args.flux_blocks), args.t5_layers)))
        return
    print(json.dumps(run(args.model, args.folder, args.command, args.work, args.resolution,
                         not args.no_checkpointing, args.method, args.bits, inference_steps=args.inference_steps)))


if __name__ == "__main__":
    main()
