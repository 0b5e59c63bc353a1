"""`tuneqdm quantize`: a pipeline's UNet -> a calibrated quantized base folder that train/generate reuse.

The calibration prompts are a file (one per line), or, for the embedded toy pipeline only, captions of toy-world
scenes drawn from seed 40,000,000 (the PTQ calibration range [40M, 50M); PTQ evaluation uses [50M, 60M)). The
folder is written only when calibration has finished (temporary folder + rename): an interrupted run leaves nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..denoisers import denoiser, family
from ..errors import TuneQDMError
from ..files import check_output_folder
from ..sampling import base_id, check_base, pipeline_from
from ..serialization import save_quantized
from ..tuning.streaming import quantize_pretrained
from .calibration import collect_calibration_set, read_prompts, toy_calibration_prompts
from .weights import AdaRoundConfig, WeightCalibrationConfig, calibrate_weights


def calibration_prompts(base, prompts_file, n: int) -> tuple[list[str], str]:
    """(prompts, where they came from)."""
    if prompts_file is not None:
        return read_prompts(prompts_file), str(prompts_file)
    if base is not None:
        raise TuneQDMError("--calib_prompts is required for a model other than the embedded toy pipeline: "
                           "pass a text file with one prompt per line")
    return toy_calibration_prompts(n), "toy world captions, seed 40000000"


def streamable_denoiser(base, calibrate: str, split_shortcuts: bool) -> Path | None:
    """The local denoiser folder to quantize tensor by tensor (tuning.streaming), or None for the calibrated path:
    AdaRound needs the float model's outputs, and a UNet's shortcut splits are found from one forward pass. A
    pipeline folder's class is checked first (one line for an unsupported one, before any work)."""
    from ..denoisers import family_named
    from ..files import read_json

    if base is None or calibrate == "adaround":
        return None
    candidates = [Path(base), Path(base) / "transformer", Path(base) / "unet"]
    if (Path(base) / "model_index.json").is_file():
        name = read_json(Path(base) / "model_index.json", "diffusers pipeline").get("_class_name")
        candidates = [Path(base) / family_named(str(name)).attribute]
    for folder in candidates:
        if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors*")):
            try:
                is_unet = "UNet" in str(json.loads((folder / "config.json").read_text()).get("_class_name"))
            except (ValueError, UnicodeDecodeError, AttributeError):
                return None  # the diffusers path reports the broken file
            return None if is_unet and split_shortcuts else folder
    return None


def quantize_pipeline(out, base=None, bits: int = 4, calibrate: str = "adaround", calib_prompts=None,
                      calib_samples: int = 32, calib_steps: int | None = None, num_inference_steps: int = 25,
                      guidance_scale: float | None = None, seed: int = 0, split_shortcuts: bool = True,
                      adaround: AdaRoundConfig | None = None, force: bool = False, device="cpu",
                      progress=None, revision: str | None = None, variant: str | None = None) -> dict:
    """Calibrate and write the quantized base ``out``; returns the calibration record saved in its
    quantization.json (``"calibration"``)."""
    config = WeightCalibrationConfig(bits=bits, calibrate=calibrate, split_shortcuts=split_shortcuts,
                                     adaround=adaround or AdaRoundConfig())
    out = check_output_folder(out, force)
    check_base(base, revision, variant)  # an unsupported or damaged base before any work
    if calib_samples < 1:
        raise TuneQDMError(f"--calib_samples must be at least 1, got {calib_samples}")
    t0 = time.perf_counter()
    folder = streamable_denoiser(base, calibrate, split_shortcuts)
    if folder is not None:
        model = quantize_pretrained(folder, config.quant_config(), variant=variant)
        record = {**config.to_dict(), "streamed_from": str(folder.resolve()), "rows": 0, "splits": {}, "blocks": [],
                  "seconds": time.perf_counter() - t0}
        save_quantized(model, out, base_id=base_id(base), extra={"calibration": record})
        return record
    prompts, source = calibration_prompts(base, calib_prompts, calib_samples)
    pipe = pipeline_from(base, device, revision=revision, variant=variant)
    model = denoiser(pipe)
    guidance_scale = family(pipe).guidance if guidance_scale is None else guidance_scale
    data_free = calibrate != "adaround"  # round-to-nearest needs one row only, to find the shortcut splits
    n, steps = (1, 1) if data_free else (calib_samples, calib_steps)
    calib = None
    if not data_free or split_shortcuts:
        calib = collect_calibration_set(pipe, prompts, n, num_inference_steps=num_inference_steps, steps=steps,
                                        guidance_scale=guidance_scale, seed=seed)
    t_collect = time.perf_counter() - t0
    report = calibrate_weights(model, calib, config, progress=progress)
    record = {
        **config.to_dict(),
        "prompts": source, "num_prompts": len(prompts),
        "samples_per_step": n, "steps": sorted(set(calib.steps.tolist())) if calib is not None else [],
        "rows": len(calib) if calib is not None else 0, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "seed": seed, "revision": revision, "variant": variant,
        "collect_seconds": t_collect, "calibrate_seconds": report["seconds"],
        "seconds": time.perf_counter() - t0, "splits": report["splits"], "blocks": report["blocks"],
    }
    save_quantized(model, out, base_id=base_id(base), extra={"calibration": record})
    return record
