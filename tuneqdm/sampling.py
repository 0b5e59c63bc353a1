"""Loading a pipeline (base, quantized base, trained adapter) and sampling it reproducibly (one seed per image)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from .errors import TuneQDMError
from .files import first_line
from .loading import dtype_kwarg, quiet_loading
from .progress import pipeline_progress, progress, stage
from .quant import cached_weights
from .quant.kernels import check_kernels
from .quant.paths import sampling_kernels, set_kernels
from .results import adapter_kind, read_training_json
from .serialization import check_timesteps, fingerprint, load_adapter, load_quantized, read_adapter_config
from .tuning import QuantConfig, quantize_

SCHEDULERS = {  # CLI name -> diffusers scheduler class name
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
DEFAULT_BASE_ID = "tuneqdm-toy-default"  # the base id recorded for the embedded default pipeline


def base_id(base: str | Path | None) -> str:
    """How a base is recorded in adapters: the embedded default by name, a local folder by absolute path."""
    if base is None:
        return DEFAULT_BASE_ID
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def float_fingerprint(model) -> str:
    """SHA-256 (16 hex digits) of a float model's parameter names, shapes and first 4096 values of each: cheap even
    for SD-size UNets, and different for any two trained bases (used to match LoRA results to their base)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_base_id(quantized_base) -> str | None:
    try:
        recorded = json.loads((Path(quantized_base) / "quantization.json").read_text()).get("base_id")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None  # load_quantized reports a malformed file


def _base_from_id(base_id_: str | None) -> str | None:
    return None if not isinstance(base_id_, str) or base_id_ == DEFAULT_BASE_ID else base_id_


def base_source(base: str | Path | None, revision: str | None = None, variant: str | None = None) -> tuple[str, dict]:
    """(what to pass to ``from_pretrained``, its extra kwargs) for a base, the embedded default checked first.

    ``revision`` (a hub commit, branch or tag) and ``variant`` (e.g. "fp16": ``*.fp16.safetensors``) go to diffusers;
    a revision of a local folder would be ignored by diffusers, so it is refused instead."""
    if base is None:
        if revision is not None or variant is not None:
            raise TuneQDMError("--revision and --variant apply to the model of --pretrained_model_name_or_path; the "
                               "embedded pipeline has one version: drop them or name the model")
        from .toy.pipeline import DEFAULT_PIPELINE_DIR, check_pipeline_folder  # on use: toy/ loads PIL

        check_pipeline_folder(DEFAULT_PIPELINE_DIR)
        return str(DEFAULT_PIPELINE_DIR), {"local_files_only": True}
    if revision is not None and Path(base).exists():
        raise TuneQDMError(f"--revision {revision} names a version of a hub repository, but {base} is a local folder: "
                           "drop --revision (the folder holds one version)")
    extra = {"revision": revision} if revision is not None else {}
    return str(base), {**extra, **({"variant": variant} if variant is not None else {})}


def pipeline_from(base: str | Path | None, device: str | torch.device = "cpu", dtype=torch.float32, *,
                  revision: str | None = None, variant: str | None = None, **components):
    """The base pipeline (at ``revision``, in ``variant``: see ``base_source``) with some components given instead of
    loaded (e.g. ``unet=...``): the one place a pipeline is loaded by name."""
    from diffusers import DiffusionPipeline

    quiet_loading()
    source, extra = base_source(base, revision, variant)
    if "safety_checker" not in components and _has_component(source, "safety_checker"):
        components["safety_checker"] = None
    try:
        with _without_logged_errors("diffusers"), \
                stage(f"loading {'the embedded toy pipeline' if base is None else base}"):
            pipe = DiffusionPipeline.from_pretrained(source, **dtype_kwarg(dtype), **extra, **components)
    except (OSError, ValueError) as e:
        raise TuneQDMError(f"cannot load the pipeline {base if base is not None else source}: "
                           f"{first_line(e, None)} (check "
                           "--pretrained_model_name_or_path, and --variant for a folder saved in one)") from None
    pipeline_progress(pipe)
    return pipe.to(device)


@contextlib.contextmanager
def _without_logged_errors(library: str):
    """diffusers logs a failed load at ERROR level before raising; the exception becomes tuneqdm's one line, so the
    logged copy is dropped (warnings still show)."""
    handlers = logging.getLogger(library).handlers

    def below_error(record) -> bool:
        return record.levelno < logging.ERROR

    for handler in handlers:
        handler.addFilter(below_error)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(below_error)


def _has_component(source: str, name: str) -> bool:
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return name == "safety_checker"  # hub ids: SD 1.x repos have one; passing None is harmless for the others
    try:
        return name in json.loads(index.read_text())
    except ValueError:
        return False


def load_pipeline(base: str | Path | None = None, adapter: str | Path | None = None,
                  quantized_base: str | Path | None = None, device: str | torch.device = "cpu", dtype=torch.float32,
                  revision: str | None = None, variant: str | None = None, lora: str | Path | None = None,
                  lora_scale: float = 1.0, kernels: str = "auto"):
    """A ready diffusers pipeline.

    ``base``: a local diffusers folder or hub id (None: the adapter's own base, else the embedded default), at
    ``revision`` and in ``variant`` (None and the base read from the adapter: those it was trained with).
    ``quantized_base``: a folder of ``tuneqdm.save_quantized``: its UNet is used instead of the base's.
    ``adapter``: a ``tuneqdm train`` output folder: scales (the base's UNet is quantized as in training, or the
    quantized base is used, and the adapter's scales and timestep routing are loaded; another base is refused
    with both fingerprints named), LoRA (loaded into the float UNet; qlora: into the UNet quantized as in training,
    or its quantized base, checked by fingerprint) or a full fine-tuned UNet.
    ``lora``: a diffusers/PEFT LoRA file added on top of all that, weighted by ``lora_scale`` (see ``add_lora_file``).
    ``kernels``: how a quantized UNet samples, ``auto`` (integer matmuls where activations are quantized, on the
    devices where they measured faster), ``int8`` (wherever they apply; see ``tuneqdm.quant.kernels``) or ``reference`` (rebuild float weights, simulate activation quantization).
    """
    if lora is not None:
        check_lora_scale(lora_scale)

    check_kernels(kernels)

    kind, cfg, info = None, {}, {}
    chosen_base, chosen_quantized = base is not None, quantized_base is not None  # given, not read from the adapter
    if adapter is not None:
        kind = adapter_kind(adapter)
        info = read_training_json(adapter)
        cfg = read_adapter_config(adapter) if kind == "scales" else {}  # checked with its tensors, before any loading
        if base is None:
            base = _base_from_id(cfg.get("base_id") or info.get("base_id"))
            trained = info.get("settings") if isinstance(info.get("settings"), dict) else {}
            revision = trained.get("revision") if revision is None and base is not None else revision
            variant = trained.get("variant") if variant is None and base is not None else variant
        if quantized_base is None and kind == "scales" and cfg.get("quantized_base"):
            if Path(cfg["quantized_base"]).is_dir():
                quantized_base = cfg["quantized_base"]
    if base is None and quantized_base is not None and adapter is None:  # the quantized base's own base, if local
        recorded = _read_base_id(quantized_base)
        if recorded is not None and Path(recorded).is_dir():
            base = recorded
    qlora = kind == "lora" and info.get("tuneqdm_method") == "qlora"
    if qlora and quantized_base is None and info.get("quantized_base") and Path(info["quantized_base"]).is_dir():
        quantized_base = info["quantized_base"]
    if quantized_base is not None and kind in ("lora", "fp") and not qlora:
        raise TuneQDMError(f"--quantized_base applies to scale adapters; {adapter} is a {kind} result: "
                           "drop --quantized_base")

    version = {"revision": revision, "variant": variant}
    if quantized_base is not None:
        pipe = pipeline_from(base, device, dtype, **version, unet=load_quantized(quantized_base, device=device))
    elif kind == "fp":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(adapter) / "unet", **dtype_kwarg(dtype))
        pipe = pipeline_from(base, device, dtype, **version, unet=unet)
    else:
        pipe = pipeline_from(base, device, dtype, **version)
    if kind == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise TuneQDMError("a LoRA adapter needs PEFT: pip install peft") from None
        if qlora and quantized_base is None:
            _quantize_as_trained(pipe.unet, info.get("settings") or {})
        expected = info.get("base_fingerprint")
        actual = fingerprint(pipe.unet) if qlora else float_fingerprint(pipe.unet)
        if expected and expected != actual:
            raise TuneQDMError(f"LoRA {adapter} belongs to base fingerprint {expected} (base {info.get('base_id')!r}), "
                               f"but this model's fingerprint is {actual}: "
                               f"{_base_fix(info.get('base_id'), chosen_base)}")
        pipe.load_lora_weights(str(adapter))
    elif kind == "scales":
        timesteps = pipe.scheduler.config.get("num_train_timesteps")  # what the adapter's routing must agree with
        check_timesteps(cfg, timesteps, adapter)
        if quantized_base is None:
            with stage(f"quantizing the UNet to {cfg['bits']} bits"):
                quantize_(pipe.unet, QuantConfig(
                    bits=cfg["bits"], init=cfg["init"], method=cfg["method"], experts=cfg["experts"],
                    intervals=tuple(tuple(i) for i in cfg["intervals"]),
                    num_train_timesteps=cfg["num_train_timesteps"]))
        _check_adapter_base(pipe.unet, cfg, adapter, quantized_base, chosen_base, chosen_quantized)
        load_adapter(pipe.unet, adapter, num_train_timesteps=timesteps)
    if lora is not None:
        add_lora_file(pipe, lora, lora_scale)
    set_kernels(pipe.unet, kernels)
    pipe.unet.eval()
    return pipe


def _check_adapter_base(unet, cfg: dict, adapter, quantized_base, chosen_base: bool, chosen_quantized: bool) -> None:
    """Refuse a scale adapter on integers it was not trained on, in one line that names the fix."""
    expected, actual = cfg.get("base_fingerprint"), fingerprint(unet)
    if expected == actual:
        return
    problem = (f"adapter {adapter} belongs to base fingerprint {expected} (base {cfg.get('base_id')!r}), "
               f"but this model's fingerprint is {actual}")
    if chosen_quantized:
        fix = (f"drop --quantized_base (the adapter's own base is then quantized as in training), or train with "
               f"--quantized_base {quantized_base} to use that one")
    elif quantized_base is not None:
        fix = f"the quantized base {quantized_base} it was trained on has changed since: train again"
    else:
        fix = _base_fix(cfg.get("base_id"), chosen_base)
    raise TuneQDMError(f"{problem}: {fix}")


def _base_fix(recorded: str | None, chosen_base: bool) -> str:
    if not chosen_base:
        return f"its base {recorded} has changed since training: train again"
    if recorded in (None, DEFAULT_BASE_ID):
        return "drop --pretrained_model_name_or_path (it was trained on the embedded pipeline), or train again"
    return f"pass --pretrained_model_name_or_path {recorded} (the base it was trained on), or train again on this one"


def check_lora_scale(scale) -> float:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TuneQDMError(f"--lora_scale must be a finite number, got {scale}")
    return float(scale)


def add_lora_file(pipe, path, scale: float = 1.0, name: str = "lora") -> None:
    """Load a diffusers/PEFT LoRA (a ``.safetensors`` file or a folder holding one) into the pipeline, on a float or a
    tuneqdm-quantized UNet (PEFT wraps the quantized Linear layers; its LoRA runs beside their integer weights), and
    weight it by ``scale`` next to any LoRA the pipeline already has (those keep weight 1)."""
    import diffusers.utils.logging as dlog

    scale, path = check_lora_scale(scale), Path(path)
    if not path.exists():
        raise TuneQDMError(f"--lora {path} does not exist")
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)  # diffusers logs a failed load at length before raising: one line is ours
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        raise TuneQDMError(f"--lora {path} does not fit this model's UNet ({first[:200]}): "
                           "was it made for another architecture?") from None
    finally:
        dlog.set_verbosity(level)
    names = pipe.get_list_adapters().get("unet", [])
    if name not in names:
        raise TuneQDMError(f"--lora {path} has no LoRA weights for this model's UNet: "
                           "was it made for another architecture?")
    pipe.set_adapters(names, adapter_weights=[scale if n == name else 1.0 for n in names])


def _quantize_as_trained(unet, settings: dict) -> None:
    """qlora's base: the UNet quantized as ``tuneqdm train --method qlora`` did (its original scales, frozen)."""
    quantize_(unet, QuantConfig(bits=settings.get("bits", 4), init=settings.get("quant_init", "mse"), method="peqa"))


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise TuneQDMError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def generator(seed: int) -> torch.Generator:
    """A CPU generator for any integer seed: negative and huge ones wrap modulo 2**64 (as torch does for negatives)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int = 1, num_inference_steps: int = 25, guidance_scale: float = 7.5,
             seed: int = 0, batch_size: int = 4, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, weight_cache_bytes: int | None = None):
    """``num_images`` PIL images of ``prompt``; image ``i`` depends only on ``seed + i``.

    A quantized UNet in ``reference`` kernels keeps up to ``weight_cache_bytes`` (default 256 MiB; 0 rebuilds every
    weight at every step) of rebuilt float weights (``tuneqdm.quant.cached_weights``); in ``auto`` kernels it keeps
    none unless asked (no float copies by default; see ``tuneqdm.quant.kernels``)."""
    if weight_cache_bytes is None:
        reference = any(getattr(m, "kernels", None) == "reference" for m in pipe.unet.modules())
        weight_cache_bytes = 256 * 2**20 if reference else 0
    images = []
    bar = progress(desc="images", total=num_images, unit="image", leave=False, disable=num_images <= batch_size)
    with cached_weights(pipe.unet, weight_cache_bytes), sampling_kernels(pipe.unet), bar:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            gens = [generator(seed + start + i) for i in range(n)]
            out = pipe([prompt] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       negative_prompt=None if negative_prompt is None else [negative_prompt] * n,
                       generator=gens, output_type="pil", height=height, width=width)
            images += out.images
            bar.update(n)
    return images
