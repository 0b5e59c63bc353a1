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
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..families import call_kwargs, denoiser, family, guidance_kwargs
from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, atomic_dir, check_version, load_tensors, read_json
from ..progress import progress, stage
from ..loading import float_fingerprint
from ..sampling import generator
from ..serialization import fingerprint
from ..tuning.model import STATE_ATTR
from .activations import ActivationObserver, ActivationQuantizer, LayerParams
from .calibration import CALIBRATION_SEED, toy_calibration_prompts
from .config import ACTIVATION_BITS, DEFAULT_EXCLUDE, ActivationConfig

CONFIG_FILE, TENSORS_FILE = "activations.json", "activations.safetensors"


def folder_name(bits: int, groups: int) -> str:
    return f"activations-a{bits}-k{groups}"


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise TuneQDMError(f"calibration prompts file {path} does not exist: pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise TuneQDMError(f"calibration prompts file {path} is empty: write one prompt per line")
    return prompts


def model_fingerprint(model) -> str:
    """The quantized base's fingerprint for a tuneqdm-quantized model, else the float fingerprint."""
    if getattr(model, STATE_ATTR, None) is not None:
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
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    extra = call_kwargs(pipe, height, width, max_sequence_length)
    observer = ActivationObserver(denoiser(pipe), exclude)
    try:
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


def save_activations(quantizer: ActivationQuantizer, directory) -> Path:
    """Write the parameters (safetensors + JSON) atomically: the folder appears whole or not at all."""
    c = quantizer.config
    tensors, layers = {}, {}
    for name, p in quantizer.layers.items():
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
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / TENSORS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def load_activations(directory, bits: int | None = None, attention: str = "log",
                     expect_fingerprint: str | None = None) -> ActivationQuantizer:
    """Read a folder of :func:`save_activations`. ``bits`` may differ from the calibrated ones (the groups and
    ranges do not depend on them); ``expect_fingerprint``: refuse parameters calibrated on another model."""
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE, "activation parameters")
    check_version(meta, directory / CONFIG_FILE)
    recorded = meta.get("info", {}).get("fingerprint")
    if expect_fingerprint is not None and recorded != expect_fingerprint:
        raise TuneQDMError(f"activation parameters {directory} were calibrated on a model with fingerprint "
                           f"{recorded}, but this model's fingerprint is {expect_fingerprint}: calibrate them again")
    tensors = load_tensors(directory / TENSORS_FILE, "activation parameters")
    config = ActivationConfig(bits=meta["bits"] if bits is None else bits, groups=meta["groups"],
                              attention=attention, exclude=tuple(meta["exclude"]))
    steps = len(meta["timesteps"])
    layers = {}
    try:
        for name, info in meta["layers"].items():
            positions = info["positions"]
            p_labels = tensors[f"{name}.position_labels"] if positions else torch.zeros(steps, 0, dtype=torch.uint8)
            p = LayerParams(info["kind"] == "conv", tensors[f"{name}.dims"], tensors[f"{name}.channel_labels"],
                            p_labels, tensors[f"{name}.lo"], tensors[f"{name}.hi"])
            shapes = [tuple(p.dims.shape), tuple(p.channel_labels.shape), tuple(p.position_labels.shape),
                      tuple(p.lo.shape), tuple(p.hi.shape)]
            expected = [(steps,), (steps, info["channels"]), (steps, positions), (steps, config.groups),
                        (steps, config.groups)]
            if shapes != expected:
                raise TuneQDMError(f"{directory}: layer {name!r} has tensors of shapes {shapes}, its "
                                   f"{CONFIG_FILE} implies {expected}: calibrate again")
            layers[name] = p
    except KeyError as e:
        raise TuneQDMError(f"{directory / TENSORS_FILE} lacks {e.args[0]!r}: calibrate again") from None
    return ActivationQuantizer(config, meta["timesteps"], layers, meta.get("info"))


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
