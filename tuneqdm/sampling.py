"""Loading a pipeline (base, quantized base, trained adapter) and sampling it reproducibly (one seed per image)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import TuneQDMError

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
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_base_id(quantized_base) -> str | None:
    try:
        return json.loads((Path(quantized_base) / "quantization.json").read_text()).get("base_id")
    except (OSError, ValueError, AttributeError):
        return None


def _base_from_id(base_id_: str | None) -> str | None:
    return None if base_id_ in (None, DEFAULT_BASE_ID) else base_id_


def base_source(base: str | Path | None) -> tuple[str, dict]:
    """(what to pass to ``from_pretrained``, its extra kwargs) for a base, the embedded default checked first."""
    if base is None:
        from .toy.pipeline import DEFAULT_PIPELINE_DIR, check_pipeline_folder

        check_pipeline_folder(DEFAULT_PIPELINE_DIR)
        return str(DEFAULT_PIPELINE_DIR), {"local_files_only": True}
    return str(base), {}


def dtype_kwarg(dtype) -> dict:
    """``dtype=`` for diffusers that renamed ``torch_dtype`` (0.36+), ``torch_dtype=`` for older ones."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def pipeline_from(base: str | Path | None, device: str | torch.device = "cpu", dtype=torch.float32, **components):
    """The base pipeline with some components given instead of loaded (e.g. ``unet=...``)."""
    from diffusers import DiffusionPipeline

    _quiet_loading()
    source, extra = base_source(base)
    if "safety_checker" not in components and _has_component(source, "safety_checker"):
        components["safety_checker"] = None
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **dtype_kwarg(dtype), **extra, **components)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneQDMError(f"cannot load the pipeline {base if base is not None else source}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _quiet_loading() -> None:
    """No per-component loading bars (they are noise next to tuneqdm's own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


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
                  kernels: str = "auto"):
    """A ready diffusers pipeline.

    ``base``: a local diffusers folder or hub id (None: the adapter's own base, else the embedded default).
    ``quantized_base``: a folder of ``tuneqdm.save_quantized``: its UNet is used instead of the base's.
    ``adapter``: a ``tuneqdm train`` output folder: scales (the base's UNet is quantized as in training, or the
    quantized base is used, and the adapter's scales and timestep routing are loaded; another base is refused
    with both fingerprints named), LoRA (loaded into the float UNet) or a full fine-tuned UNet.
    ``kernels``: how a quantized UNet samples, ``auto`` (integer matmuls where activations are quantized, see
    ``tuneqdm.quant.kernels``) or ``reference`` (rebuild float weights, simulate activation quantization).
    """
    from .quant.kernels import check_kernels, set_kernels
    from .serialization import load_adapter, load_quantized, read_adapter_config

    check_kernels(kernels)

    kind, cfg, info = None, {}, {}
    if adapter is not None:
        from .train.outputs import adapter_kind, read_training_json

        kind = adapter_kind(adapter)
        info = read_training_json(adapter)
        cfg = read_adapter_config(adapter) if kind == "scales" else {}
        if base is None:
            base = _base_from_id(cfg.get("base_id") or info.get("base_id"))
        if quantized_base is None and kind == "scales" and cfg.get("quantized_base"):
            if Path(cfg["quantized_base"]).is_dir():
                quantized_base = cfg["quantized_base"]
    if base is None and quantized_base is not None and adapter is None:  # the quantized base's own base, if local
        recorded = _read_base_id(quantized_base)
        if recorded is not None and Path(recorded).is_dir():
            base = recorded
    if quantized_base is not None and kind in ("lora", "fp"):
        raise TuneQDMError(f"--quantized_base applies to scale adapters; {adapter} is a {kind} result")

    if quantized_base is not None:
        pipe = pipeline_from(base, device, dtype, unet=load_quantized(quantized_base, device=device))
    elif kind == "fp":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(adapter) / "unet", **dtype_kwarg(dtype))
        pipe = pipeline_from(base, device, dtype, unet=unet)
    else:
        pipe = pipeline_from(base, device, dtype)
    if kind == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise TuneQDMError("a LoRA adapter needs PEFT: pip install peft") from None
        expected, actual = info.get("base_fingerprint"), float_fingerprint(pipe.unet)
        if expected and expected != actual:
            raise TuneQDMError(f"LoRA {adapter} belongs to base fingerprint {expected} (base {info.get('base_id')!r}), "
                               f"but this model's fingerprint is {actual}")
        pipe.load_lora_weights(str(adapter))
    elif kind == "scales":
        if quantized_base is None:
            from .tuning import QuantConfig, quantize_

            quantize_(pipe.unet, QuantConfig(
                bits=cfg["bits"], init=cfg["init"], method=cfg["method"], experts=cfg["experts"],
                intervals=tuple(tuple(i) for i in cfg["intervals"]), num_train_timesteps=cfg["num_train_timesteps"]))
        load_adapter(pipe.unet, adapter)
    set_kernels(pipe.unet, kernels)
    pipe.unet.eval()
    return pipe


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
    from .quant import cached_weights
    from .quant.kernels import sampling_kernels

    if weight_cache_bytes is None:
        reference = any(getattr(m, "kernels", None) == "reference" for m in pipe.unet.modules())
        weight_cache_bytes = 256 * 2**20 if reference else 0
    images = []
    with cached_weights(pipe.unet, weight_cache_bytes), sampling_kernels(pipe.unet):
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            gens = [generator(seed + start + i) for i in range(n)]
            out = pipe([prompt] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       negative_prompt=None if negative_prompt is None else [negative_prompt] * n,
                       generator=gens, output_type="pil", height=height, width=width)
            images += out.images
    return images
