"""Calibrating DGQ activation parameters on a pipeline, and their files.

Calibration runs the pipeline (full-precision or weight-quantized UNet) on calibration prompts with classifier-free
guidance through the whole sampling schedule, records every layer's per-channel and per-position input ranges at
every step (hooks, see :class:`~tuneqdm.ptq.activations.ActivationObserver`), then fits the groups. The statistics
are taken from unquantized activations (one pass; DGQ's code also calibrates a layer from the activations its
predecessors produce). Default prompts for the embedded toy pipeline: captions of toy-world scenes from seed
40,000,000 (the PTQ calibration range [40M, 50M) of the seed convention; evaluation uses [50M, 60M)).

Folder (written atomically; by default next to the quantized base, ``BASE/activations-a8-k16/``)::

    activations.json         format version, bits, groups, timesteps, model fingerprint, layers, calibration info
    activations.safetensors  per layer: dims (S,), channel_labels (S, C), position_labels (S, P), lo/hi (S, K)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..families import call_kwargs, denoiser, family, guidance_kwargs
from ..errors import TuneQDMError
from ..files import (FORMAT_VERSION, atomic_dir, check_digests, check_fields, check_version, digests, load_tensors,
                     read_json, read_prompt_file)
from ..progress import progress, stage
from ..loading import float_fingerprint
from ..sampling import check_sampling, finite_sampling, generator
from ..serialization import fingerprint
from ..tuning.model import is_quantized
from .activations import ActivationObserver, ActivationQuantizer, LayerParams
from .calibration import CALIBRATION_SEED, toy_calibration_prompts
from .config import ACTIVATION_BITS, DEFAULT_EXCLUDE, ActivationConfig

CONFIG_FILE, TENSORS_FILE = "activations.json", "activations.safetensors"
ACTIVATION_FILES = (CONFIG_FILE, TENSORS_FILE)


def folder_name(bits: int, groups: int) -> str:
    return f"activations-a{bits}-k{groups}"


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise TuneQDMError(f"calibration prompts file {path} does not exist: pass a text file with one prompt per line")
    return read_prompt_file(path, "--calib_prompts")


def model_fingerprint(model) -> str:
    """The quantized base's fingerprint for a tuneqdm-quantized model, else the float fingerprint."""
    if is_quantized(model):
        return fingerprint(model)

    return float_fingerprint(model)


@torch.no_grad()
def observe_activations(pipe, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float | None = None,
                        seed: int = CALIBRATION_SEED, batch_size: int = 4, height: int | None = None,
                        width: int | None = None, exclude=DEFAULT_EXCLUDE,
                        max_sequence_length: int | None = None) -> ActivationObserver:
    """Run ``pipe`` on ``prompts`` (classifier-free guidance, latents only, prompt ``i`` with seed ``seed + i``) and
    record every layer's input ranges at every step. The returned observer's hooks are already removed; its
    statistics serve any number of :meth:`~ActivationObserver.fit` calls (bits, groups)."""
    check_sampling(guidance_scale, num_inference_steps, height, width, max_sequence_length)
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    extra = call_kwargs(pipe, height, width, max_sequence_length)
    observer = ActivationObserver(denoiser(pipe), exclude)
    try:
        with finite_sampling(pipe):
            for i in progress(range(0, len(prompts), batch_size), desc="observing activations", unit="batch"):
                chunk = prompts[i:i + batch_size]
                pipe(prompt=chunk, num_inference_steps=num_inference_steps,
                     **guidance_kwargs(pipe, guidance_scale, len(chunk)),
                     generator=[generator(seed + i + j) for j in range(len(chunk))], output_type="latent", **extra)
    finally:
        observer.remove()
    return observer


def calibrate_activations(pipe, prompts: list[str], config: ActivationConfig, num_inference_steps: int = 25,
                          guidance_scale: float | None = None, seed: int = CALIBRATION_SEED, batch_size: int = 4,
                          height: int | None = None, width: int | None = None, info: dict | None = None,
                          max_sequence_length: int | None = None) -> ActivationQuantizer:
    """Run ``pipe`` on ``prompts`` (classifier-free guidance, latents only) and fit DGQ parameters for every step of
    its ``num_inference_steps`` schedule. The pipeline is left as it was (no hooks stay)."""
    if not prompts:
        raise TuneQDMError("no calibration prompts: pass at least one")
    if num_inference_steps < 1 or batch_size < 1:
        raise TuneQDMError("--num_inference_steps and the batch size must be at least 1")
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    start = time.perf_counter()
    observer = observe_activations(pipe, prompts, num_inference_steps, guidance_scale, seed, batch_size, height,
                                   width, config.exclude, max_sequence_length)
    meta = {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "seed": seed, "scheduler": type(pipe.scheduler).__name__, **(info or {})}
    with stage(f"fitting A{config.bits} K={config.groups} activation groups"):
        quantizer = observer.fit(config, meta)
    quantizer.info["calibration_seconds"] = round(time.perf_counter() - start, 2)
    quantizer.info["fingerprint"] = model_fingerprint(denoiser(pipe))
    return quantizer


_RECALIBRATE = "calibrate the activations again (tuneqdm quantize-activations)"
_FIELDS = {"format_version": int, "bits": int, "groups": int, "exclude": list, "timesteps": list, "layers": dict,
           "info?": dict, "digests?": dict}
_LAYER_FIELDS = {"kind": str, "channels": int, "positions": int}


def _settings(meta: dict) -> dict:
    """What the loader builds the quantizers from (everything but the digests and the layout note)."""
    return {k: v for k, v in meta.items() if k not in ("digests", "layout")}


def _check_ranges(name: str, p: LayerParams, where, fix: str) -> None:
    """Every group range finite and ordered (lo <= hi): a NaN range makes every quantized activation NaN."""
    if not (bool(torch.isfinite(p.lo).all()) and bool(torch.isfinite(p.hi).all())):
        raise TuneQDMError(f"{where}: layer {name!r} has NaN or infinite activation ranges: {fix}")
    if bool((p.lo > p.hi).any()):
        raise TuneQDMError(f"{where}: layer {name!r} has a group whose lower bound exceeds its upper bound: {fix}")


def save_activations(quantizer: ActivationQuantizer, directory) -> Path:
    """Write the parameters (safetensors + JSON, with SHA-256 digests of every tensor and of the settings)
    atomically: the folder appears whole or not at all. Non-finite ranges (a calibration run that produced NaN) are
    refused before anything is written."""
    c = quantizer.config
    tensors, layers = {}, {}
    for name, p in quantizer.layers.items():
        _check_ranges(name, p, "cannot save the activation parameters",
                      "the calibration produced NaN or infinite activations: check --guidance_scale and the model")
        tensors[f"{name}.dims"] = p.dims.contiguous()
        tensors[f"{name}.channel_labels"] = p.channel_labels.contiguous()
        if p.position_labels.shape[1]:
            tensors[f"{name}.position_labels"] = p.position_labels.contiguous()
        tensors[f"{name}.lo"] = p.lo.float().contiguous()
        tensors[f"{name}.hi"] = p.hi.float().contiguous()
        layers[name] = {"kind": "conv" if p.conv else "linear", "channels": p.channel_labels.shape[1],
                        "positions": p.position_labels.shape[1]}
    meta = {
        "format_version": FORMAT_VERSION, "method": "dgq" if c.groups > 1 else "minmax", "bits": c.bits,
        "groups": c.groups, "exclude": list(c.exclude), "timesteps": quantizer.timesteps.tolist(),
        "dims": quantizer.dim_counts(), "info": quantizer.info, "layers": layers,
        "layout": "per layer: dims (S,) 0=channel 1=position; channel_labels (S, C) and position_labels (S, P) "
                  "uint8 group of each vector; lo/hi (S, K) each group's range; step s = timesteps[s]",
    }
    meta["digests"] = digests(tensors, {CONFIG_FILE: _settings(meta)})
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / TENSORS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def _read_meta(directory: Path) -> dict:
    """activations.json, its schema checked before any value is used."""
    path = directory / CONFIG_FILE
    meta = read_json(path, "activation parameters")
    check_version(meta, path)
    check_fields(meta, _FIELDS, path, _RECALIBRATE)
    try:
        ActivationConfig(bits=meta["bits"], groups=meta["groups"])
    except TuneQDMError as e:
        raise TuneQDMError(f"{path}: {e}") from None
    steps = meta["timesteps"]
    if not steps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                            for t in steps):
        raise TuneQDMError(f"{path}: 'timesteps' must be a non-empty list of finite numbers: {_RECALIBRATE}")
    if not all(isinstance(p, str) for p in meta["exclude"]):
        raise TuneQDMError(f"{path}: 'exclude' must be a list of layer name patterns: {_RECALIBRATE}")
    for name, info in meta["layers"].items():
        check_fields(info, _LAYER_FIELDS, f"{path} (layer {name!r})", _RECALIBRATE)
        if info["kind"] not in ("conv", "linear") or info["channels"] < 1 or info["positions"] < 0:
            raise TuneQDMError(f"{path}: layer {name!r} has kind {info['kind']!r}, {info['channels']} channels and "
                               f"{info['positions']} positions: {_RECALIBRATE}")
    return meta


def _layer(name: str, info: dict, tensors: dict, steps: int, groups: int, directory: Path) -> LayerParams:
    """One layer's checked parameters: dtypes, shapes, dims 0/1, labels below the group count, ranges finite."""
    positions = info["positions"]
    want = {"dims": ((steps,), torch.int8), "channel_labels": ((steps, info["channels"]), torch.uint8),
            "lo": ((steps, groups), torch.float32), "hi": ((steps, groups), torch.float32)}
    if positions:
        want["position_labels"] = ((steps, positions), torch.uint8)
    got = {}
    for part, (shape, dtype) in want.items():
        t = tensors.get(f"{name}.{part}")
        if t is None:
            raise TuneQDMError(f"{directory / TENSORS_FILE} lacks '{name}.{part}': {_RECALIBRATE}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise TuneQDMError(f"{directory}: tensor '{name}.{part}' is {t.dtype} of shape {tuple(t.shape)}, its "
                               f"{CONFIG_FILE} implies {dtype} of shape {shape}: {_RECALIBRATE}")
        got[part] = t
    p_labels = got.get("position_labels", torch.zeros(steps, 0, dtype=torch.uint8))
    if not bool(((got["dims"] == 0) | (got["dims"] == 1)).all()) or (positions == 0 and bool(got["dims"].any())):
        raise TuneQDMError(f"{directory}: tensor '{name}.dims' holds a dimension other than channel (0) or "
                           f"position (1{'' if positions else ', and this layer has no positions'}): {_RECALIBRATE}")
    for labels, part in ((got["channel_labels"], "channel_labels"), (p_labels, "position_labels")):
        if labels.numel() and int(labels.max()) >= groups:
            raise TuneQDMError(f"{directory}: tensor '{name}.{part}' names group {int(labels.max())} of "
                               f"{groups}: {_RECALIBRATE}")
    p = LayerParams(info["kind"] == "conv", got["dims"], got["channel_labels"], p_labels, got["lo"], got["hi"])
    _check_ranges(name, p, str(directory), _RECALIBRATE)
    return p


def load_activations(directory, bits: int | None = None, attention: str = "log",
                     expect_fingerprint: str | None = None) -> ActivationQuantizer:
    """Read a folder of :func:`save_activations`. ``bits`` may differ from the calibrated ones (the groups and
    ranges do not depend on them); ``expect_fingerprint``: refuse parameters calibrated on another model. Everything
    is checked before use (schema, digests, dtypes, shapes, labels, finite ranges): a damaged folder is one line."""
    directory = Path(directory)
    meta = _read_meta(directory)
    info = meta.get("info") or {}
    recorded = info.get("fingerprint")
    if expect_fingerprint is not None and recorded != expect_fingerprint:
        raise TuneQDMError(f"activation parameters {directory} were calibrated on a model with fingerprint "
                           f"{recorded}, but this model's fingerprint is {expect_fingerprint}: calibrate them again")
    tensors = load_tensors(directory / TENSORS_FILE, "activation parameters")
    check_digests(meta.get("digests"), tensors, directory, _RECALIBRATE, {CONFIG_FILE: _settings(meta)})
    config = ActivationConfig(bits=meta["bits"] if bits is None else bits, groups=meta["groups"],
                              attention=attention, exclude=tuple(meta["exclude"]))
    steps = len(meta["timesteps"])
    layers = {name: _layer(name, layer, tensors, steps, config.groups, directory)
              for name, layer in meta["layers"].items()}
    expected = {f"{n}.{part}" for n, layer in meta["layers"].items()
                for part in ("dims", "channel_labels", "lo", "hi", *(("position_labels",) if layer["positions"] else ()))}
    if set(tensors) != expected:
        raise TuneQDMError(f"{directory / TENSORS_FILE} holds tensors its {CONFIG_FILE} does not name "
                           f"(e.g. {sorted(set(tensors) - expected)[0]!r}): {_RECALIBRATE}")
    return ActivationQuantizer(config, meta["timesteps"], layers, info)


def calibration_prompts(prompts_file=None, samples: int | None = None, base=None) -> tuple[list[str], str]:
    """(prompts, where they came from): the file's lines, or toy-world captions for the embedded pipeline; with
    ``samples`` the list is cut or cycled to that length."""
    if samples is not None and samples < 1:
        raise TuneQDMError(f"--calib_samples must be at least 1, got {samples}")
    if prompts_file is not None:
        prompts, source = read_prompts(prompts_file), str(prompts_file)
    elif base is None:
        n = samples or 64
        prompts, source = toy_calibration_prompts(n), f"toy world seed {CALIBRATION_SEED}, {n} scenes"
    else:
        raise TuneQDMError(f"no --calib_prompts for {base}: pass a text file with one calibration prompt per line")
    if samples is not None:
        prompts = [prompts[i % len(prompts)] for i in range(samples)]
    return prompts, source


def activations_for(pipe, bits: int, groups: int, attention: str = "log", activations=None, quantized_base=None,
                    prompts_file=None, samples: int | None = None, base=None, num_inference_steps: int = 25,
                    guidance_scale: float | None = None, log=print, max_sequence_length: int | None = None,
                    size: tuple[int | None, int | None] = (None, None)) -> ActivationQuantizer:
    """The activation parameters for ``pipe``: a given folder, else ``quantized_base/activations-aB-kK`` when it
    exists (or the K-group folder of the other bit width: groups and ranges do not depend on the bits), else
    calibrated now on the calibration prompts (not saved). Checked against the UNet's fingerprint."""
    config = ActivationConfig(bits=bits, groups=groups, attention=attention, exclude=family(pipe).first_last)
    folder = Path(activations) if activations is not None else None
    if folder is None and quantized_base is not None:  # the groups and ranges do not depend on the bits
        candidates = [Path(quantized_base) / folder_name(b, groups) for b in (bits, *ACTIVATION_BITS)]
        folder = next((c for c in candidates if (c / CONFIG_FILE).is_file()), None)
    if folder is not None:
        q = load_activations(folder, bits=bits, attention=attention,
                             expect_fingerprint=model_fingerprint(denoiser(pipe)))
        if q.config.groups != groups:
            raise TuneQDMError(f"{folder} holds K={q.config.groups} groups, not --groups {groups}: pass the folder "
                               "calibrated with these groups or leave --activations out to calibrate now")
        return q
    prompts, source = calibration_prompts(prompts_file, samples, base)
    log(f"calibrating A{bits} K={groups} activations on {len(prompts)} prompts ({source}, "
        f"{num_inference_steps} steps)")
    return calibrate_activations(pipe, prompts, config, num_inference_steps, guidance_scale, height=size[0],
                                 width=size[1], info={"prompts_source": source},
                                 max_sequence_length=max_sequence_length)
