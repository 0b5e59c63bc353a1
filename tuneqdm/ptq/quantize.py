"""`tuneqdm quantize`: a pipeline's UNet -> a calibrated quantized base folder that train/generate reuse.

The calibration prompts are a file (one per line), or, for the embedded toy pipeline only, captions of toy-world
scenes drawn from seed 40,000,000 (the PTQ calibration range [40M, 50M); PTQ evaluation uses [50M, 60M)). The
folder is written only when calibration has finished (temporary folder + rename): an interrupted run leaves nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..families import denoiser, family_of_denoiser_class
from ..errors import TuneQDMError
from ..files import check_output_folder, read_json
from ..loading import assemble, base_id, float_denoiser, resolve
from ..loading.streamed import release
from ..serialization import QUANTIZED_BASE_FILES, save_quantized
from ..tuning.model import layers_to_quantize
from ..tuning.streaming import quantize_pretrained
from .calibration import collect_calibration_set, read_prompts, toy_calibration_prompts
from .weights import AdaRoundConfig, WeightCalibrationConfig, learn_rounding, trace_unet


def calibration_prompts(base, prompts_file, n: int) -> tuple[list[str], str]:
    """(prompts, where they came from)."""
    if prompts_file is not None:
        return read_prompts(prompts_file), str(prompts_file)
    if base is not None:
        raise TuneQDMError("--calib_prompts is required for a model other than the embedded toy pipeline: "
                           "pass a text file with one prompt per line")
    return toy_calibration_prompts(n), "toy world captions, seed 40000000"


def model_folder(base) -> Path | None:
    """``base`` when it is one diffusers model's folder (``MODEL/transformer``: a config.json naming a model class and
    safetensors weights, no model_index.json), which is quantized as it is; None for a pipeline."""
    folder = Path(base) if base is not None else None
    if folder is None or (folder / "model_index.json").is_file() or not (folder / "config.json").is_file():
        return None
    return folder if any(folder.glob("diffusion_pytorch_model*.safetensors*")) else None


def _concat_shortcuts(folder: Path) -> bool:
    """Whether the model in ``folder`` (by its config's class) has up blocks that read concat(hidden, skip)."""
    fam = family_of_denoiser_class(read_json(folder / "config.json", "model").get("_class_name"))
    return fam is not None and fam.concat_shortcuts


def quantize_pipeline(out, base=None, bits: int = 4, calibrate: str = "adaround", calib_prompts=None,
                      calib_samples: int = 32, calib_steps: int | None = None, num_inference_steps: int = 25,
                      guidance_scale: float | None = None, seed: int = 0, split_shortcuts: bool = True,
                      adaround: AdaRoundConfig | None = None, force: bool = False, device="cpu",
                      progress=None, revision: str | None = None, variant: str | None = None,
                      single_file_config: str | None = None) -> dict:
    """Calibrate and write the quantized base ``out``; returns the calibration record saved in its
    quantization.json (``"calibration"``).

    ``minmax`` and ``mse`` never build the float denoiser: its files are quantized tensor by tensor (a UNet's
    shortcut splits are found first by one sampling step of the float UNet streamed module by module); ``adaround``
    starts from the ``mse`` integers streamed the same way and learns each block's rounding against the float model
    streamed from its files, holding one block's float weights at a time."""
    config = WeightCalibrationConfig(bits=bits, calibrate=calibrate, split_shortcuts=split_shortcuts,
                                     adaround=adaround or AdaRoundConfig())
    out = check_output_folder(out, force, QUANTIZED_BASE_FILES, "a quantized base")
    if calib_samples < 1:
        raise TuneQDMError(f"--calib_samples must be at least 1, got {calib_samples}")
    t0 = time.perf_counter()
    folder = model_folder(base) if calibrate != "adaround" and single_file_config is None else None
    if folder is not None and not (split_shortcuts and _concat_shortcuts(folder)):
        model = quantize_pretrained(folder, config.quant_config(), variant=variant, device=device)
        record = {**config.to_dict(), "streamed_from": str(folder.resolve()), "rows": 0, "splits": {}, "blocks": [],
                  "seconds": time.perf_counter() - t0}
        save_quantized(model, out, base_id=base_id(base), extra={"calibration": record})
        return record
    source = resolve(base, revision, variant, single_file_config)  # an unsupported or damaged base before any work
    if calibrate == "adaround" and source.family.adaround_blocked:
        raise TuneQDMError(f"--calibrate adaround is not available for {source.family.label}: its transformer "
                           f"{source.family.adaround_blocked}, which the block-by-block reconstruction cannot batch "
                           "yet; use --calibrate mse (or minmax)")
    guidance_scale = source.family.guidance if guidance_scale is None else guidance_scale
    sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}
    if calibrate != "adaround":
        return _streamed(out, source, config, calib_prompts, sampling, device, t0)
    prompts, where = calibration_prompts(base, calib_prompts, calib_samples)
    fp = float_denoiser(source, device, stream=True)  # never held whole: one module's, then one block's float weights
    pipe = assemble(source, fp, device)
    calib = collect_calibration_set(pipe, prompts, calib_samples, steps=calib_steps, **sampling)
    del pipe  # the text encoders and the VAE: the calibration rows hold what the denoiser reads
    qconfig = config.quant_config()
    names = layers_to_quantize(fp, qconfig)
    splits, order = trace_unet(fp, calib)
    splits = {k: v for k, v in splits.items() if k in names} if split_shortcuts else {}
    t_collect = time.perf_counter() - t0
    model = quantize_pretrained(source.component_folder(source.denoiser), qconfig,
                                variant=source.variant_of(source.denoiser), device=device, splits=splits)
    blocks = learn_rounding(fp, model, calib, config, order, names, splits, progress)
    release(fp)
    record = {**config.to_dict(), **_calibration_record(calib, prompts, where, calib_samples, sampling, source),
              "collect_seconds": t_collect, "calibrate_seconds": time.perf_counter() - t0 - t_collect,
              "seconds": time.perf_counter() - t0, "splits": splits, "blocks": blocks}
    save_quantized(model, out, base_id=source.base_id, extra={"calibration": record})
    return record


def _streamed(out, source, config: WeightCalibrationConfig, prompts_file, sampling: dict, device, t0) -> dict:
    """Round to nearest (minmax, mse) straight from the denoiser's files, split where a UNet's up blocks read
    ``concat(hidden, skip)`` (found by one step of the streamed float UNet on one calibration prompt)."""
    calib, splits = None, {}
    if config.split_shortcuts and source.family.concat_shortcuts:
        prompts, where = calibration_prompts(source.name, prompts_file, 1)
        pipe = assemble(source, float_denoiser(source, device, stream=True), device)
        calib = collect_calibration_set(pipe, prompts, 1, steps=1, **sampling)
        found, _ = trace_unet(denoiser(pipe), calib)
        names = set(layers_to_quantize(denoiser(pipe), config.quant_config()))
        splits = {k: v for k, v in found.items() if k in names}
        del pipe
    t_collect = time.perf_counter() - t0
    folder = source.component_folder(source.denoiser)
    model = quantize_pretrained(folder, config.quant_config(), variant=source.variant_of(source.denoiser),
                                device=device, splits=splits)
    record = {**config.to_dict(), "streamed_from": str(folder.resolve()), "collect_seconds": t_collect,
              "calibrate_seconds": time.perf_counter() - t0 - t_collect, "seconds": time.perf_counter() - t0,
              "splits": splits, "blocks": []}
    if calib is not None:
        record.update(_calibration_record(calib, prompts, where, 1, sampling, source))
    else:
        record["rows"] = 0
    save_quantized(model, out, base_id=source.base_id, extra={"calibration": record})
    return record


def _calibration_record(calib, prompts, where: str, samples: int, sampling: dict, source) -> dict:
    return {"prompts": where, "num_prompts": len(prompts), "samples_per_step": samples,
            "steps": sorted(set(calib.steps.tolist())), "rows": len(calib), **sampling,
            "revision": source.revision, "variant": source.variant}
