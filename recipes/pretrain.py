"""The recipe that trains the default pipeline: a tiny Stable Diffusion, in SD's own format, on the toy world.

    python -m recipes.pretrain --work runs/pretrain                # every stage, resumable
    python -m recipes.pretrain --work runs/pretrain --export tuneqdm/toy/default_pipeline

Stages, each skipped when its output exists and resumed from its last checkpoint when interrupted:
tokenizer (CLIP's BPE files) -> vae (AutoencoderKL, 64 px -> 16x16x4) -> latents (a fixed pool of scenes encoded
once) -> unet (UNet2DConditionModel and CLIPTextModel trained jointly, EMA, bf16 autocast on CPUs that have it) ->
export (a ``StableDiffusionPipeline`` folder, fp16). Seeds are fixed; the loss curve and wall time go to
``WORK/log.jsonl``. World seeds below 10,000,000 are the pipeline's (evaluators and gates use others).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tuneqdm.errors import TuneQDMError
from tuneqdm.files import write_file_atomically
from tuneqdm.toy.pipeline import MANIFEST, check_pipeline_folder, file_digests
from tuneqdm.toy.subjects import make_instance
from tuneqdm.toy.tokenizer import write_clip_tokenizer
from tuneqdm.toy.world import caption, render, sample_scene, seed_entropy

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=1, norm_num_groups=16,  # attention_head_dim acts as the head count
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=64,
)
SCHEDULER_CONFIG = dict(  # Stable Diffusion 1.x's noise schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


@dataclasses.dataclass
class Recipe:
    seed: int = 0
    vae_from: str = ""  # a pipeline folder whose tokenizer and VAE (upcast to fp32) replace those stages
    vae_pool: int = 20_000  # scenes the VAE trains on
    vae_steps: int = 1_500
    vae_batch: int = 24
    vae_lr: float = 1e-3
    latent_pool: int = 60_000  # scenes encoded once for the UNet
    p_instance: float = 0.2  # share of scenes showing a patterned unique instance (captioned without colour)
    unet_channels: str = "32,64,128"  # the UNet's block_out_channels (what sets its size)
    unet_steps: int = 20_000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 500
    p_uncond: float = 0.1  # caption dropout for classifier-free guidance
    snr_gamma: float = 5.0  # min-SNR loss weighting
    ema: float = 0.999
    checkpoint_minutes: float = 10.0
    # refinement of an exported pipeline (--refine_from): its VAE trained further, anchored to its latent space
    refine_vae_steps: int = 1_500
    refine_vae_lr: float = 3e-4
    refine_vae_batch: int = 32
    refine_pool: int = 12_000
    refine_p_instance: float = 0.5  # patterns are what the first VAE lost, so they get more of the batch
    refine_anchor: float = 0.02  # weight of ||z - z_source||^2: the UNet's latent space moves little
    refine_latent_noise: float = 1.0  # the decoder sees z + this x the source posterior's std x noise, as the first
    # VAE saw its posterior samples: latent 3 stays noise the UNet never had to get right (decoding clean latents, or
    # 0.1 x std(z) noise, let the decoder read it and a W4 min-max UNet's images turned magenta: place 74 %, 65 %)


# ---- data ---------------------------------------------------------------------------------------------------------
def pipeline_scenes(seed: int, n: int, p_instance: float):
    """``n`` (image, caption) pairs of the pipeline's training distribution."""
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "pretrain")))
    images = np.empty((n, 64, 64, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng)
        if rng.random() < p_instance:
            inst = make_instance(int(rng.integers(1_000_000, 10_000_000)))
            scene = dataclasses.replace(scene, noun=inst.noun, colour=None, instance=inst)
        images[i] = render(scene, rng)
        captions.append(caption(scene))
    return images, captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# ---- checkpoints (safetensors, step in the header, written atomically) -----------------------------------------------
CHECKPOINT_META = "tuneqdm_pretrain"  # a checkpoint's step and wall time, kept inside its safetensors header


def _save(path: Path, tensors: dict, meta: dict) -> None:
    """One file replaced atomically, its ``meta`` in the safetensors header: an interruption can never pair new
    tensors with an old step (as a sidecar JSON renamed after them could)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={CHECKPOINT_META: json.dumps(meta)})
    write_file_atomically(path, data)


def _load(path: Path):
    from safetensors import safe_open

    if not path.exists():
        return None, None
    with safe_open(str(path), "pt") as f:  # one read of the file: the header's meta and the tensors
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if CHECKPOINT_META in header:
        return tensors, json.loads(header[CHECKPOINT_META])
    # written before the meta moved into the header: the sidecar JSON beside it
    return tensors, json.loads(path.with_suffix(".json").read_text())


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict:
    out = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            out[f"{prefix}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str) -> None:
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{i}.")}
        if state:
            opt.state[p] = state


def _resume_model(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """(step, wall seconds) of a stage checkpoint holding one model and its optimizer, both restored in place;
    (0, 0.0) when there is none yet."""
    tensors, meta = _load(ckpt)
    if tensors is None:
        return 0, 0.0
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _restore_optimizer(opt, tensors, "opt")
    return meta["step"], meta["wall"]


def _save_model(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, wall: float) -> None:
    _save(ckpt, {f"model.{k}": v for k, v in model.state_dict().items()} | _optimizer_tensors(opt, "opt"),
          {"step": step, "wall": wall})


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


# ---- stages ---------------------------------------------------------------------------------------------------------
def stage_tokenizer(work: Path, source: Path | None = None) -> None:
    """CLIP's BPE files (from open-clip-torch), or the refined pipeline's own tokenizer."""
    if (work / "tokenizer" / "tokenizer_config.json").exists():
        return
    if source is not None:
        shutil.copytree(source / "tokenizer", work / "tokenizer", dirs_exist_ok=True)
    else:
        write_clip_tokenizer(work / "tokenizer")


def stage_vae(work: Path, r: Recipe, log: Log) -> None:
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        return
    if r.vae_from:  # a finished VAE (its scaling factor included; the folder checked by main): a copy, in fp32
        _atomic_save_pretrained(AutoencoderKL.from_pretrained(Path(r.vae_from) / "vae", torch_dtype=torch.float32),
                                final)
        return
    torch.manual_seed(r.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    ckpt = work / "vae_ckpt.safetensors"
    step, wall = _resume_model(ckpt, vae, opt)
    images, _ = pipeline_scenes(r.seed + 1, r.vae_pool, r.p_instance)
    pixels = to_pixels(images)
    gen = torch.Generator().manual_seed(r.seed * 1000 + step)
    amp = _autocast_dtype()
    t0, last_ckpt = time.perf_counter() - wall, time.perf_counter()
    while step < r.vae_steps:
        lr = r.vae_lr * 0.5 * (1 + math.cos(math.pi * step / r.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = pixels[torch.randint(0, len(pixels), (r.vae_batch,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample.float()
        mse = F.mse_loss(rec, x)
        loss = mse + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == r.vae_steps:
            psnr = 10 * math.log10(4.0 / mse.item())
            log(stage="vae", step=step, loss=round(loss.item(), 5), psnr_db=round(psnr, 2), lr=lr,
                wall_s=round(time.perf_counter() - t0, 1))
        if time.perf_counter() - last_ckpt > r.checkpoint_minutes * 60 or step == r.vae_steps:
            _save_model(ckpt, vae, opt, step, time.perf_counter() - t0)
            last_ckpt = time.perf_counter()
    vae.eval()
    with torch.no_grad():  # SD's convention: latents scaled to unit variance
        z = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode()
                       for i in range(0, min(4096, len(pixels)), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    _atomic_save_pretrained(vae, final)


def stage_vae_refine(work: Path, source: Path, r: Recipe, log: Log) -> None:
    """Train ``source``'s VAE further (encoder and decoder) with its frozen encoder as an anchor, so that the latents
    (the encoder's mode, what the UNet trains on) gain what the first VAE lost (colours and markings of patterned
    instances) while staying close enough for ``source``'s UNet to be kept. The decoder sees them plus the source
    posterior's noise, as the first VAE did. Keeps the scaling factor."""
    import copy

    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        return
    torch.manual_seed(r.seed)
    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=torch.float32)
    anchor = copy.deepcopy(vae).eval().requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.refine_vae_lr, weight_decay=0.0)
    ckpt = work / "vae_refine_ckpt.safetensors"
    step, wall = _resume_model(ckpt, vae, opt)
    images, _ = pipeline_scenes(r.seed + 3, r.refine_pool, r.refine_p_instance)
    pixels = to_pixels(images)
    gen = torch.Generator().manual_seed(r.seed * 1000 + 17 + step)
    amp = _autocast_dtype()
    vae.train()
    t0, last_ckpt = time.perf_counter() - wall, time.perf_counter()
    while step < r.refine_vae_steps:
        lr = r.refine_vae_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / r.refine_vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = pixels[torch.randint(0, len(pixels), (r.refine_vae_batch,), generator=gen)]
        with torch.no_grad():
            posterior = anchor.encode(x).latent_dist
            z_source = posterior.mode()
        noise = torch.randn(z_source.shape, generator=gen) * posterior.std * r.refine_latent_noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z + noise).sample.float()
        mse = F.mse_loss(rec, x)
        drift = F.mse_loss(z.float(), z_source)
        loss = mse + 0.5 * F.l1_loss(rec, x) + r.refine_anchor * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == r.refine_vae_steps:
            psnr = 10 * math.log10(4.0 / mse.item())
            log(stage="vae_refine", step=step, loss=round(loss.item(), 5), psnr_db=round(psnr, 2),
                drift=round(drift.item() / z_source.var().item(), 5), lr=lr, wall_s=round(time.perf_counter() - t0, 1))
        if time.perf_counter() - last_ckpt > r.checkpoint_minutes * 60 or step == r.refine_vae_steps:
            _save_model(ckpt, vae, opt, step, time.perf_counter() - t0)
            last_ckpt = time.perf_counter()
    vae.eval()
    _atomic_save_pretrained(vae, final)


def _atomic_save_pretrained(model, final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def stage_latents(work: Path, r: Recipe, log: Log) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    if (work / "latents.npy").exists():
        return
    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(work / "vae", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    latents = np.empty((r.latent_pool, 4, 16, 16), np.float16)
    all_captions = []
    chunk = 5_000
    for start in range(0, r.latent_pool, chunk):
        n = min(chunk, r.latent_pool - start)
        images, captions = pipeline_scenes(r.seed + 2 + start, n, r.p_instance)
        with torch.no_grad():
            for i in range(0, n, 500):
                z = vae.encode(to_pixels(images[i : i + 500])).latent_dist.mode() * vae.config.scaling_factor
                latents[start + i : start + i + len(z)] = z.numpy().astype(np.float16)
        all_captions += captions
        log(stage="latents", done=start + n, wall_s=round(time.perf_counter() - t0, 1))
    ids = tokenizer(all_captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids.astype(np.int32)
    np.save(work / "input_ids.npy", ids)
    (work / "captions.json").write_text(json.dumps(all_captions))
    np.save(work / "latents.tmp.npy", latents)
    os.replace(work / "latents.tmp.npy", work / "latents.npy")


def _build_unet_and_text(r: Recipe):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    channels = tuple(int(c) for c in r.unet_channels.split(","))
    return (UNet2DConditionModel(**UNET_CONFIG | {"block_out_channels": channels}),
            CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))


def _autocast_dtype() -> torch.dtype | None:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else None
    except OSError:
        return None


def _resume_unet(ckpt: Path, params: list, ema: list, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """(step, wall seconds) of the UNet stage's checkpoint, its parameters, EMA and optimizer state restored in
    place; (0, 0.0) when there is none yet."""
    tensors, meta = _load(ckpt)
    if tensors is None:
        return 0, 0.0
    for i, p in enumerate(params):
        p.data.copy_(tensors[f"param.{i}"])
        ema[i].copy_(tensors[f"ema.{i}"])
    _restore_optimizer(opt, tensors, "opt")
    return meta["step"], meta["wall"]


def _unet_state(params: list, ema: list, opt: torch.optim.Optimizer) -> dict:
    """What the UNet stage's checkpoint holds: parameters, their EMA and the optimizer state."""
    return ({f"param.{i}": p for i, p in enumerate(params)} | {f"ema.{i}": e for i, e in enumerate(ema)}
            | _optimizer_tensors(opt, "opt"))


def _noisy_batch(latents, ids, empty, sched, r: Recipe, gen: torch.Generator):
    """One UNet batch drawn from ``gen``: (noisy latents, timesteps, the noise, token ids with a ``p_uncond`` share
    of the captions dropped for classifier-free guidance)."""
    idx = torch.randint(0, len(latents), (r.unet_batch,), generator=gen)
    z0 = latents[idx].float()
    tok = ids[idx].clone()
    drop = torch.rand(r.unet_batch, generator=gen) < r.p_uncond
    tok[drop] = empty
    t = torch.randint(0, 1000, (r.unet_batch,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    return sched.add_noise(z0, noise, t), t, noise, tok


def _load_source_weights(source: Path, unet, text) -> None:
    """``source``'s UNet and text encoder weights (fp16 on disk) into the freshly built fp32 models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet.load_state_dict(UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32).state_dict())
    text.load_state_dict(CLIPTextModel.from_pretrained(source / "text_encoder", torch_dtype=torch.float32).state_dict())


def stage_unet(work: Path, r: Recipe, log: Log, source: Path | None = None) -> None:
    """Train the UNet and text encoder jointly; from ``source``'s weights (parameters and EMA) when refining."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    if (work / "unet_done.json").exists():
        return
    torch.manual_seed(r.seed)
    unet, text = _build_unet_and_text(r)
    if source is not None:
        _load_source_weights(source, unet, text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    ckpt = work / "unet_ckpt.safetensors"
    step, wall = _resume_unet(ckpt, params, ema, opt)
    latents = torch.from_numpy(np.load(work / "latents.npy"))
    ids = torch.from_numpy(np.load(work / "input_ids.npy")).long()
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=r.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    amp = _autocast_dtype()
    gen = torch.Generator().manual_seed(r.seed * 7919 + step)
    unet.train()
    text.train()
    t0, last_ckpt, smooth = time.perf_counter() - wall, time.perf_counter(), None
    while step < r.unet_steps:
        lr = r.unet_lr * min(1.0, (step + 1) / r.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        zt, t, noise, tok = _noisy_batch(latents, ids, empty, sched, r, gen)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            emb = text(tok).last_hidden_state
            pred = unet(zt, t, emb).sample.float()
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(r.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 100 == 0 or step == r.unet_steps:
            log(stage="unet", step=step, loss=round(smooth, 5), lr=lr, wall_s=round(time.perf_counter() - t0, 1))
        if time.perf_counter() - last_ckpt > r.checkpoint_minutes * 60 or step == r.unet_steps:
            _save(ckpt, _unet_state(params, ema, opt), {"step": step, "wall": time.perf_counter() - t0})
            last_ckpt = time.perf_counter()
    (work / "unet_done.json").write_text(json.dumps({"steps": step, "wall_s": time.perf_counter() - t0}))


def saved_recipe(work: Path) -> Recipe:
    """The recipe ``work``'s run was started with (``recipe.json``), checked before its checkpoints are trusted."""
    path = work / "recipe.json"
    try:
        return Recipe(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise TuneQDMError(f"{work} holds no recipe.json: start the run there first") from None
    except (ValueError, TypeError) as e:
        raise TuneQDMError(f"{path} is not a recipe this version of tuneqdm wrote ({e}): start again in a new "
                           "--work") from None


def export(work: Path, out: Path, use_ema: bool = True, source: Path | None = None) -> Path:
    """Write the ``StableDiffusionPipeline`` folder (fp16 weights) from the latest UNet checkpoint, or, when refining
    without a UNet stage, with ``source``'s UNet and text encoder unchanged."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    recipe = saved_recipe(work)
    unet, text = _build_unet_and_text(recipe)
    tensors, meta = _load(work / "unet_ckpt.safetensors")
    if tensors is None and source is None:
        raise TuneQDMError(f"no UNet checkpoint in {work}: run the unet stage first")
    if tensors is None:
        _load_source_weights(source, unet, text)
        meta = {"step": 0, "wall": 0.0}
    else:
        for i, p in enumerate(list(unet.parameters()) + list(text.parameters())):
            p.data.copy_(tensors[f"ema.{i}" if use_ema else f"param.{i}"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=text, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "tokenizer" / "NOTICE.md").write_text(
        "The vocabulary and merges in this folder are OpenAI CLIP's byte-pair encoding (bpe_simple_vocab_16e6.txt.gz,\n"
        "MIT License, Copyright (c) 2021 OpenAI), as distributed in the open-clip-torch wheel, rewritten by\n"
        "tuneqdm.toy.tokenizer.write_clip_tokenizer into vocab.json and merges.txt and saved by transformers'\n"
        "CLIPTokenizer in its own format.\n")

    manifest = {"unet_steps": meta["step"], "unet_wall_s": round(meta["wall"], 1),
                "recipe": dataclasses.asdict(recipe)}
    if (work / "refined_from.json").exists():  # the source pipeline's own manifest, less its file digests
        manifest["refined_from"] = json.loads((work / "refined_from.json").read_text())
    (tmp / MANIFEST).write_text(json.dumps(manifest | {"files": file_digests(tmp)}, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m recipes.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for stages, checkpoints and log.jsonl")
    ap.add_argument("--stages", nargs="+", default=["tokenizer", "vae", "latents", "unet"],
                    choices=["tokenizer", "vae", "latents", "unet"])
    ap.add_argument("--export", type=Path, help="write the pipeline folder here from the latest checkpoint")
    ap.add_argument("--refine_from", type=Path, default=None,
                    help="an exported pipeline folder to continue: its VAE is refined (refine_* settings), the "
                         "latents re-encoded and its UNet and text encoder trained further for --unet_steps")
    ap.add_argument("--threads", type=int, default=2)
    for f in dataclasses.fields(Recipe):
        ap.add_argument("--" + f.name, type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    if args.refine_from and (recipe.vae_from or recipe.unet_channels != Recipe.unet_channels):
        raise TuneQDMError("--refine_from continues its pipeline's own VAE and UNet: drop --vae_from and "
                           "--unet_channels, or start a new run without --refine_from")
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "recipe.json"
    if saved.exists() and not args.export:  # a resumed run continues the recipe its checkpoints were made with
        before = dataclasses.asdict(saved_recipe(args.work))
        changed = [k for k, v in dataclasses.asdict(recipe).items() if before[k] != v]
        if changed:
            raise TuneQDMError(f"{args.work} was started with --{changed[0]} {before[changed[0]]!r}, not "
                               f"{getattr(recipe, changed[0])!r}: resume with the same flags or choose a new --work")
    if not saved.exists():
        write_file_atomically(saved, json.dumps(dataclasses.asdict(recipe), indent=1))
    log = Log(args.work / "log.jsonl")
    source = args.refine_from
    if source is not None:
        source_manifest = {k: v for k, v in check_pipeline_folder(source).items() if k != "files"}
        (args.work / "refined_from.json").write_text(json.dumps(source_manifest, indent=1, sort_keys=True))
    reused = Path(recipe.vae_from) if recipe.vae_from else source  # the pipeline whose tokenizer is copied
    if recipe.vae_from:
        check_pipeline_folder(reused)  # before its tokenizer or VAE is copied
    stages = {"tokenizer": lambda: stage_tokenizer(args.work, reused),
              "vae": lambda: (stage_vae(args.work, recipe, log) if source is None
                              else stage_vae_refine(args.work, source, recipe, log)),
              "latents": lambda: stage_latents(args.work, recipe, log),
              "unet": lambda: stage_unet(args.work, recipe, log, source)}
    for name in args.stages if not args.export else []:
        stages[name]()
    if args.export:
        print(export(args.work, args.export, source=source))


if __name__ == "__main__":
    main()
