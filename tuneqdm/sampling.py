"""Loading a pipeline (base, quantized base, trained adapter) and sampling it reproducibly (one seed per image)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from pathlib import Path

import torch

from .denoisers import (
    call_kwargs,
    denoiser,
    denoiser_component,
    denoiser_word,
    family,
    family_named,
    is_flow_matching,
    t5_overflow,
    without_truncation_logs,
)
from .errors import TuneQDMError, TuneQDMWarning
from .files import first_line, read_json
from .loading import dtype_kwarg, quiet_loading
from .progress import pipeline_progress, progress, stage
from .quant import cached_weights
from .quant.kernels import check_kernels
from .quant.paths import sampling_kernels, set_kernels
from .results import FP_UNET, adapter_kind, read_training_json
from .serialization import check_timesteps, fingerprint, load_adapter, load_quantized, read_adapter_config
from .tuning import QuantConfig, quantize_
from .tuning.streaming import INDEX_NAME, WEIGHTS_NAME, diffusers_model_class, weight_files

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


def pipeline_fingerprint(pipe) -> str:
    """:func:`float_fingerprint` over every model of a pipeline (denoiser, VAE, text encoders): two pipelines that
    differ only in their VAE differ here."""
    h = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            h.update(f"{name}={float_fingerprint(component)};".encode())
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
                  revision: str | None = None, variant: str | None = None, denoiser_model=None, **components):
    """The base pipeline (at ``revision``, in ``variant``: see ``base_source``) with some components given instead of
    loaded (e.g. ``unet=...``; ``denoiser_model``: its UNet or transformer, whichever the pipeline has): the one place
    a pipeline is loaded by name. Its class is checked first (``tuneqdm.denoisers``), and a local folder's denoiser
    files against their index, so that neither is found out half-way through loading."""
    from diffusers import DiffusionPipeline

    quiet_loading()
    source, extra = base_source(base, revision, variant)
    if denoiser_model is not None:
        components[_denoiser_attribute(source, revision)] = denoiser_model
    check_pipeline_files(source, revision, variant)
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
    family(pipe)  # a hub pipeline whose index could not be read before loading
    pipeline_progress(pipe)
    return pipe.to(device)


def _pipeline_class(source: str, revision: str | None) -> str | None:
    """The pipeline class named by ``source``'s model_index.json (None when it cannot be read before loading:
    ``from_pretrained`` then reports why)."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        name = read_json(index, "diffusers pipeline").get("_class_name")
        return name if isinstance(name, str) else None
    if Path(source).exists():
        return None
    from diffusers import DiffusionPipeline

    try:  # a hub id: its model_index.json only
        name = DiffusionPipeline.load_config(source, **({"revision": revision} if revision else {})).get("_class_name")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) else None


def _denoiser_attribute(source: str, revision: str | None) -> str:
    name = _pipeline_class(source, revision)
    if name is None:
        raise TuneQDMError(f"cannot tell which pipeline {source} is (no readable model_index.json): pass a diffusers "
                           "pipeline folder or hub id")
    return family_named(name).attribute


def check_base(base: str | Path | None, revision: str | None = None, variant: str | None = None) -> None:
    """``check_pipeline_files`` for a base named by the user (the embedded pipeline needs none): commands call it
    before work that does not need the model (evaluators, calibration prompts), so a bad base is the first error."""
    if base is not None:
        check_pipeline_files(base_source(base, revision, variant)[0], revision, variant)


def check_pipeline_files(source: str, revision: str | None = None, variant: str | None = None) -> None:
    """One line, before any loading, for a pipeline class tuneqdm does not support and for a local denoiser checkpoint
    whose shards do not match their index, lack a shard or cannot be read."""
    name = _pipeline_class(source, revision)
    if name is None:
        return
    folder = Path(source) / family_named(name).attribute
    suffix = f".{variant}" if variant else ""
    if any((folder / file.replace(".safetensors", f"{suffix}.safetensors", 1)).is_file()
           for file in (WEIGHTS_NAME, INDEX_NAME)):  # else diffusers says what is missing
        weight_files(folder, variant)


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
    ``quantized_base``: a folder of ``tuneqdm.save_quantized``: its denoiser (UNet or transformer) is used instead of
    the base's. ``adapter``: a ``tuneqdm train`` output folder: scales (the base's denoiser is quantized as in
    training, or the quantized base is used, and the adapter's scales and timestep routing are loaded; another base
    is refused with both fingerprints named), LoRA (loaded into the float denoiser; qlora: into the denoiser
    quantized as in training, or its quantized base, checked by fingerprint) or a full fine-tuned denoiser.
    ``lora``: a diffusers/PEFT LoRA file added on top of all that, weighted by ``lora_scale`` (see ``add_lora_file``).
    ``kernels``: how a quantized denoiser samples, ``auto`` (integer matmuls where activations are quantized, on the
    devices and layer sizes where they measured faster), ``int8`` (wherever they apply; see
    ``tuneqdm.quant.kernels``) or ``reference`` (rebuild float weights, simulate activation quantization).
    """
    if lora is not None:
        check_lora_scale(lora_scale)

    check_kernels(kernels)

    chosen_base, chosen_quantized = base is not None, quantized_base is not None  # given, not read from the adapter
    kind, cfg, info, qlora = None, {}, {}, False
    if adapter is not None:
        kind, cfg, info = _read_adapter(adapter)
        qlora = kind == "lora" and info.get("tuneqdm_method") == "qlora"
        base, quantized_base, revision, variant = _adapter_sources(kind, cfg, info, base, quantized_base, revision,
                                                                   variant)
    elif base is None and quantized_base is not None:  # the quantized base's own base, if local
        recorded = _read_base_id(quantized_base)
        base = recorded if recorded is not None and Path(recorded).is_dir() else None
    if quantized_base is not None and kind in ("lora", "fp") and not qlora:
        raise TuneQDMError(f"--quantized_base applies to scale adapters; {adapter} is a {kind} result: "
                           "drop --quantized_base")

    version = {"revision": revision, "variant": variant}
    if quantized_base is not None:
        pipe = pipeline_from(base, device, dtype, **version,
                             denoiser_model=load_quantized(quantized_base, device=device))
    elif kind == "fp":
        pipe = pipeline_from(base, device, dtype, **version, denoiser_model=_fine_tuned(adapter, dtype))
    else:
        pipe = pipeline_from(base, device, dtype, **version)
    model = denoiser(pipe)
    if kind == "lora":
        _load_lora_adapter(pipe, adapter, info, qlora and quantized_base is None, chosen_base)
    elif kind == "scales":
        _load_scales(pipe, adapter, cfg, quantized_base, chosen_base, chosen_quantized)
    if lora is not None:
        add_lora_file(pipe, lora, lora_scale)
    set_kernels(model, kernels)
    model.eval()
    return pipe


def _fine_tuned(adapter, dtype) -> torch.nn.Module:
    """The whole fine-tuned denoiser of an ``fp`` result, of the class its config names (diffusers' own model
    classes only)."""
    folder = Path(adapter) / FP_UNET
    name = read_json(folder / "config.json", "fine-tuned model").get("_class_name")
    cls = diffusers_model_class(name)
    if cls is None:
        raise TuneQDMError(f"{folder}/config.json names the model class {name!r}, which is no diffusers model: "
                           "train the adapter again")
    return cls.from_pretrained(folder, **dtype_kwarg(dtype))


def _read_adapter(adapter) -> tuple[str, dict, dict]:
    """(kind, adapter_config.json of a scale adapter, training.json) of a ``tuneqdm train`` result, checked before
    any loading."""
    kind = adapter_kind(adapter)
    info = read_training_json(adapter)
    return kind, read_adapter_config(adapter) if kind == "scales" else {}, info


def _adapter_sources(kind: str, cfg: dict, info: dict, base, quantized_base, revision, variant) -> tuple:
    """(base, quantized_base, revision, variant) for an adapter: those given, else the ones it was trained with (a
    recorded quantized base only while its folder exists)."""
    if base is None:
        base = _base_from_id(cfg.get("base_id") or info.get("base_id"))
        trained = info.get("settings") if isinstance(info.get("settings"), dict) else {}
        revision = trained.get("revision") if revision is None and base is not None else revision
        variant = trained.get("variant") if variant is None and base is not None else variant
    recorded = cfg.get("quantized_base") if kind == "scales" else None
    if kind == "lora" and info.get("tuneqdm_method") == "qlora":
        recorded = info.get("quantized_base")
    if quantized_base is None and recorded and Path(recorded).is_dir():
        quantized_base = recorded
    return base, quantized_base, revision, variant


def _load_lora_adapter(pipe, adapter, info: dict, quantize: bool, chosen_base: bool) -> None:
    """A ``lora``/``qlora`` result into the pipeline's denoiser (qlora's quantized as trained unless ``quantize`` is
    False: its quantized base is already there), checked against the base's fingerprint."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise TuneQDMError("a LoRA adapter needs PEFT: pip install peft") from None
    model = denoiser(pipe)
    qlora = info.get("tuneqdm_method") == "qlora"
    if quantize:
        _quantize_as_trained(model, info.get("settings") or {})
    expected = info.get("base_fingerprint")
    actual = fingerprint(model) if qlora else float_fingerprint(model)
    if expected and expected != actual:
        raise TuneQDMError(f"LoRA {adapter} belongs to base fingerprint {expected} (base {info.get('base_id')!r}), "
                           f"but this model's fingerprint is {actual}: {_base_fix(info.get('base_id'), chosen_base)}")
    pipe.load_lora_weights(str(adapter))


def _load_scales(pipe, adapter, cfg: dict, quantized_base, chosen_base: bool, chosen_quantized: bool) -> None:
    """A scale adapter onto the pipeline's denoiser: quantized as in training (unless a quantized base is already
    there), checked against the adapter's base fingerprint, then its scales and timestep routing loaded."""
    model = denoiser(pipe)
    timesteps = pipe.scheduler.config.get("num_train_timesteps")  # what the adapter's routing must agree with
    check_timesteps(cfg, timesteps, adapter)
    if quantized_base is None:
        with stage(f"quantizing the {denoiser_word(pipe)} to {cfg['bits']} bits"):
            quantize_(model, QuantConfig(
                bits=cfg["bits"], init=cfg["init"], method=cfg["method"], experts=cfg["experts"],
                intervals=tuple(tuple(i) for i in cfg["intervals"]), num_train_timesteps=cfg["num_train_timesteps"]))
    _check_adapter_base(model, cfg, adapter, quantized_base, chosen_base, chosen_quantized)
    load_adapter(model, adapter, num_train_timesteps=timesteps)


def _check_adapter_base(model, cfg: dict, adapter, quantized_base, chosen_base: bool, chosen_quantized: bool) -> None:
    """Refuse a scale adapter on integers it was not trained on, in one line that names the fix."""
    expected, actual = cfg.get("base_fingerprint"), fingerprint(model)
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
    names = pipe.get_list_adapters().get(denoiser_component(pipe), [])
    if name not in names:
        raise TuneQDMError(f"--lora {path} has no LoRA weights for this model's UNet: "
                           "was it made for another architecture?")
    pipe.set_adapters(names, adapter_weights=[scale if n == name else 1.0 for n in names])


def _quantize_as_trained(model, settings: dict) -> None:
    """qlora's base: the UNet quantized as ``tuneqdm train --method qlora`` did (its original scales, frozen)."""
    quantize_(model, QuantConfig(bits=settings.get("bits", 4), init=settings.get("quant_init", "mse"), method="peqa"))


def set_scheduler(pipe, name: str | None) -> str:
    """Sample with ``name`` (None: ddim, or a flow-matching pipeline's own scheduler: the others solve another ODE);
    returns what it samples with (the CLI name, or the flow-matching scheduler's class)."""
    import diffusers

    own = type(pipe.scheduler).__name__
    if is_flow_matching(own):
        if name is not None:
            raise TuneQDMError(f"--scheduler {name} does not apply to {type(pipe).__name__}, a flow-matching pipeline "
                               f"(it samples with its {own}): drop --scheduler")
        return own
    name = name or "ddim"
    if name not in SCHEDULERS:
        raise TuneQDMError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return name


def generator(seed: int) -> torch.Generator:
    """A CPU generator for any integer seed: negative and huge ones wrap modulo 2**64 (as torch does for negatives)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int = 1, num_inference_steps: int = 25, guidance_scale: float | None = None,
             seed: int = 0, batch_size: int = 4, negative_prompt: str | None = None, height: int | None = None,
             width: int | None = None, weight_cache_bytes: int | None = None, max_sequence_length: int | None = None):
    """``num_images`` PIL images of ``prompt``; image ``i`` depends only on ``seed + i``.

    ``guidance_scale`` None: the pipeline family's default (Flux's is its distilled guidance). ``max_sequence_length``:
    the T5 prompt length of Flux, SD3 and PixArt (None: the pipeline's default); a longer prompt is cut, with one
    warning. A quantized denoiser in ``reference`` kernels keeps up to ``weight_cache_bytes`` (default 256 MiB; 0
    rebuilds every weight at every step) of rebuilt float weights (``tuneqdm.quant.cached_weights``); in ``auto``
    kernels it keeps none unless asked (no float copies by default; see ``tuneqdm.quant.kernels``)."""
    model = denoiser(pipe)
    if guidance_scale is None:
        guidance_scale = family(pipe).guidance
    if weight_cache_bytes is None:
        reference = any(getattr(m, "kernels", None) == "reference" for m in model.modules())
        weight_cache_bytes = 256 * 2**20 if reference else 0
    warn_truncation(pipe, prompt, max_sequence_length)
    extra = call_kwargs(pipe, height, width, max_sequence_length)
    images = []
    bar = progress(desc="images", total=num_images, unit="image", leave=False, disable=num_images <= batch_size)
    with cached_weights(model, weight_cache_bytes), sampling_kernels(model), bar, without_truncation_logs(pipe):
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            gens = [generator(seed + start + i) for i in range(n)]
            negative = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * n}
            out = pipe([prompt] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=gens, output_type="pil", **negative, **extra)
            images += out.images
            bar.update(n)
    return images


def warn_truncation(pipe, prompt: str, max_sequence_length: int | None = None) -> None:
    """One warning when ``prompt`` is longer than what the pipeline's T5 encoder reads (diffusers' own notices, one
    per text encoder, are dropped by ``denoisers.without_truncation_logs``)."""
    overflow = t5_overflow(pipe, prompt, max_sequence_length)
    if overflow is not None:
        tokens, limit, _ = overflow
        warnings.warn(f"the prompt is {tokens} T5 tokens, longer than max_sequence_length {limit}: the model reads "
                      f"only its first {limit} (shorten it, or raise --max_sequence_length)", TuneQDMWarning,
                      stacklevel=3)
