"""``load_pipeline``: a base, a quantized base and a trained result (scales, LoRA, a fine-tuned denoiser), ready to
sample; and LoRA files added on top.

A scale adapter's denoiser is the base quantized as in training: the packed integers of the cache of quantized bases
or of its recorded ``--quantized_base``, or streamed from the base's files (``tuneqdm.loading.denoiser``); the float
denoiser is never built for it. Every combination is checked by fingerprint before the adapter is applied.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..families import denoiser, denoiser_component, denoiser_word
from ..errors import TuneQDMError
from ..files import file_tensor_digests, first_line, read_json
from ..quant.kernels import check_kernels
from ..quant.layers import QConv2d
from ..quant.paths import set_kernels
from ..results import FP_UNET, LORA_WEIGHTS, check_result
from ..shards import header
from ..serialization import check_timesteps, fingerprint, load_adapter, read_adapter_config
from ..tuning.config import QuantConfig
from ..tuning.streaming import diffusers_model_class
from ..libraries import dtype_kwarg, load_lora_weights
from .cache import QuantizedCache
from .denoiser import float_denoiser, quantized_denoiser, saved_quantized_denoiser
from .pipeline import assemble, check_sizes, float_fingerprint
from .resolver import resolve
from .source import DEFAULT_BASE_ID, base_from_id, read_base_id


def load_pipeline(base: str | Path | None = None, adapter: str | Path | None = None,
                  quantized_base: str | Path | None = None, device: str | torch.device = "cpu", dtype=torch.float32,
                  revision: str | None = None, variant: str | None = None,
                  single_file_config: str | None = None, lora: str | Path | None = None,
                  lora_scale: float = 1.0, kernels: str = "auto", text_encoders: str = "stream",
                  quantized_cache: str | Path | bool | None = None, height: int | None = None,
                  width: int | None = None, vae_encoder: bool = True):
    """A ready diffusers pipeline.

    ``base``: a local diffusers folder or hub id (None: the adapter's own base, else the embedded default), at
    ``revision`` and in ``variant`` (None and the base read from the adapter: those it was trained with); a
    single-file checkpoint with the configs of ``single_file_config`` (``tuneqdm.loading.single_file``).
    ``quantized_base``: a folder of ``tuneqdm.save_quantized``: its denoiser (UNet or transformer) is used instead of
    the base's. ``adapter``: a ``tuneqdm train`` output folder: scales (the base's denoiser quantized as in training,
    from the cache of quantized bases or streamed from its files, or the quantized base; its scales and timestep
    routing loaded; another base is refused with both fingerprints named), LoRA (loaded into the float denoiser;
    qlora: into the denoiser quantized as in training, or its quantized base, checked by fingerprint) or a full
    fine-tuned denoiser. ``lora``: a diffusers/PEFT LoRA file added on top of all that, weighted by ``lora_scale``
    (see ``add_lora_file``). ``kernels``: how a quantized denoiser samples, ``auto`` (integer matmuls where
    activations are quantized, on the devices and layer sizes where they measured faster), ``int8`` (wherever they
    apply; see ``tuneqdm.quant.kernels``) or ``reference`` (rebuild float weights, simulate activation
    quantization). ``text_encoders``: ``stream`` (read module by module from their files as they run) or
    ``resident``. ``vae_encoder`` False: the VAE's encoder holds no weights (the commands that only sample: text-to-
    image never encodes an image). ``quantized_cache``: the folder quantized bases are reused from and written to
    (None: the default, see ``tuneqdm.loading.cache``; False: none). ``height``/``width``: the image size the caller will sample at,
    checked against the models' configs before any weight is read.
    """
    if lora is not None:
        check_lora_scale(lora_scale)
    check_kernels(kernels)
    chosen_base, chosen_quantized = base is not None, quantized_base is not None  # given, not read from the adapter
    kind, cfg, info, qlora = None, {}, {}, False
    if adapter is not None:
        kind, cfg, info = _read_adapter(adapter)
        qlora = kind == "lora" and info.get("tuneqdm_method") == "qlora"
        base, quantized_base, revision, variant, single_file_config = _adapter_sources(
            kind, cfg, info, base, quantized_base, revision, variant, single_file_config)
    elif base is None and quantized_base is not None:  # the quantized base's own base, if local
        recorded = read_base_id(quantized_base)
        base = recorded if recorded is not None and Path(recorded).is_dir() else None
    if quantized_base is not None and kind in ("lora", "fp") and not qlora:
        raise TuneQDMError(f"--quantized_base applies to scale adapters; {adapter} is a {kind} result: "
                           "drop --quantized_base")
    source = resolve(base, revision, variant, single_file_config)
    check_sizes(source, height, width)
    if kind == "scales":  # the adapter's timestep routing must agree with the scheduler before the model is built
        check_timesteps(cfg, _train_timesteps(source), adapter)
    model = _denoiser(source, kind, cfg, info, adapter, quantized_base, device, dtype, quantized_cache)
    pipe = assemble(source, model, device, dtype, text_encoders, vae_encoder=vae_encoder)
    if kind == "lora":
        _load_lora_adapter(pipe, adapter, info, chosen_base)
    elif kind == "scales":
        _check_adapter_base(model, cfg, adapter, quantized_base, chosen_base, chosen_quantized)
        load_adapter(model, adapter, num_train_timesteps=_train_timesteps(source))
    if lora is not None:
        add_lora_file(pipe, lora, lora_scale)
    set_kernels(model, kernels)
    model.eval()
    return pipe


def _denoiser(source, kind, cfg: dict, info: dict, adapter, quantized_base, device, dtype, quantized_cache):
    """The denoiser a result samples with: its quantized base; a fine-tuned one; the base quantized as trained
    (scales, qlora: cached or streamed packed integers); the float base's own."""
    if quantized_base is not None:
        return saved_quantized_denoiser(quantized_base, source.config(source.denoiser), device)
    if kind == "fp":
        return fine_tuned_denoiser(adapter, dtype).to(device)
    if kind == "scales" or (kind == "lora" and info.get("tuneqdm_method") == "qlora"):
        return quantized_denoiser(source, _base_config(kind, cfg, info), device, QuantizedCache.of(quantized_cache))
    return float_denoiser(source, device, dtype)


def _train_timesteps(source) -> int | None:
    return source.config("scheduler").get("num_train_timesteps")


def _base_config(kind: str, cfg: dict, info: dict) -> QuantConfig:
    """The quantization a result was trained on: a scale adapter's bits and init, qlora's (its original scales,
    frozen, as ``tuneqdm train --method qlora`` quantized them)."""
    if kind == "scales":
        return QuantConfig(bits=cfg["bits"], init=cfg["init"], method="peqa")
    settings = info.get("settings") or {}
    return QuantConfig(bits=settings.get("bits", 4), init=settings.get("quant_init", "mse"), method="peqa")


def fine_tuned_denoiser(adapter, dtype=torch.float32) -> torch.nn.Module:
    """The whole fine-tuned denoiser of an ``fp`` result, of the class its config names (diffusers' own model
    classes only); a config diffusers cannot build (an edited result written before digests) is one line."""
    folder = Path(adapter) / FP_UNET
    name = read_json(folder / "config.json", "fine-tuned model").get("_class_name")
    cls = diffusers_model_class(name)
    if cls is None:
        raise TuneQDMError(f"{folder}/config.json names the model class {name!r}, which is no diffusers model: "
                           "train the adapter again")
    try:
        model = cls.from_pretrained(folder, **dtype_kwarg(dtype))
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, AttributeError) as e:
        raise TuneQDMError(f"cannot build the fine-tuned model of {folder} ({first_line(e)}): train the adapter "
                           "again") from None
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:  # diffusers leaves a weight its files lack on the meta device, with a warning only
        raise TuneQDMError(f"{folder} lacks the weight {missing[0]!r} of its model: train the adapter again")
    return model


def _read_adapter(adapter) -> tuple[str, dict, dict]:
    """(kind, adapter_config.json of a scale adapter, training.json) of a ``tuneqdm train`` result, checked before
    any loading."""
    kind, info = check_result(adapter)
    return kind, read_adapter_config(adapter) if kind == "scales" else {}, info


def _adapter_sources(kind: str, cfg: dict, info: dict, base, quantized_base, revision, variant,
                     single_file_config) -> tuple:
    """(base, quantized_base, revision, variant, single_file_config) for an adapter: those given, else the ones it was trained with (a
    recorded quantized base only while its folder exists)."""
    if base is None:
        base = base_from_id(cfg.get("base_id") or info.get("base_id"))
        trained = info.get("settings") if isinstance(info.get("settings"), dict) else {}
        revision = trained.get("revision") if revision is None and base is not None else revision
        variant = trained.get("variant") if variant is None and base is not None else variant
        if single_file_config is None and base is not None:
            single_file_config = trained.get("single_file_config")
    recorded = cfg.get("quantized_base") if kind == "scales" else None
    if kind == "lora" and info.get("tuneqdm_method") == "qlora":
        recorded = info.get("quantized_base")
    if quantized_base is None and recorded and Path(recorded).is_dir():
        quantized_base = recorded
    return base, quantized_base, revision, variant, single_file_config


def _load_lora_adapter(pipe, adapter, info: dict, chosen_base: bool) -> None:
    """A ``lora``/``qlora`` result into the pipeline's denoiser (qlora's already quantized as trained), checked
    against the base's fingerprint."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise TuneQDMError("a LoRA adapter needs PEFT: pip install peft") from None
    model = denoiser(pipe)
    qlora = info.get("tuneqdm_method") == "qlora"
    expected = info.get("base_fingerprint")
    actual = fingerprint(model) if qlora else float_fingerprint(model)
    if expected and expected != actual:
        raise TuneQDMError(f"LoRA {adapter} belongs to base fingerprint {expected} (base {info.get('base_id')!r}), "
                           f"but this model's fingerprint is {actual}: {_base_fix(info.get('base_id'), chosen_base)}")
    load_lora_weights(pipe, str(adapter))


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


def _check_quantized_convs(pipe, path, keys: list[str]) -> None:
    """One line when a LoRA file wraps a Conv2d that is quantized here: PEFT wraps the quantized Linear layers only,
    and failed with a cut-off message blaming "another architecture". The layer is found by its name in the file's
    keys (diffusers' and PEFT's ``name.lora...``, kohya's ``name_with_underscores.lora...``)."""
    model = denoiser(pipe)
    for name, module in model.named_modules():
        if not isinstance(module, QConv2d):
            continue
        dotted, flat = f"{name}.lora", f"{name.replace('.', '_')}.lora"
        if any(dotted in k or flat in k for k in keys):
            raise TuneQDMError(f"--lora {path} adapts the Conv2d {name}, which is quantized in this "
                               f"{denoiser_word(pipe)}: a LoRA on a quantized model wraps Linear layers only: use a "
                               "LoRA of Linear layers (e.g. --lora_targets to_q,to_k,to_v,to_out.0), or the float "
                               "base (no --adapter of a quantized method, no --quantized_base)")


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
    weights = path if path.is_file() else path / LORA_WEIGHTS
    if weights.suffix == ".safetensors" and weights.is_file():  # readable and finite before it is loaded
        file_tensor_digests([weights], "LoRA", "use an undamaged copy of the LoRA")
        _check_quantized_convs(pipe, path, list(header(weights)))
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)  # diffusers logs a failed load at length before raising: one line is ours
    try:
        load_lora_weights(pipe, str(path), adapter_name=name)
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
