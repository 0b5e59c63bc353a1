"""``tuneqdm quantize-activations``: calibrate DGQ activation quantization and write its parameters (by default
next to the quantized base they were calibrated on)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneQDMError
from ..files import check_output_folder, writes_to
from ..loading import load_pipeline
from ..loading.options import (loading, quantized_cache_option, revision_option, single_file_config_option,
                               text_encoders_option, variant_option, version)
from ..options import QUIET_HELP, option
from ..progress import quiet_while
from ..ptq.config import (ActivationConfig, activation_bits_option, calib_prompts_option, calib_samples_option,
                          groups_option)
from ..sampling import (GUIDANCE_HELP, MAX_SEQUENCE_LENGTH_HELP, SCHEDULER_CHOICES, SCHEDULER_HELP, check_sampling,
                        set_scheduler)


@dataclass
class QuantizeActivationsConfig:
    """The ``tuneqdm quantize-activations`` settings; each field is its flag."""

    quantized_base: str | None = option(None, "a quantized base folder (default: the float UNet)")
    pretrained_model_name_or_path: str | None = option(
        None, "a local diffusers folder or hub id (default: the quantized base's, or the embedded one)")
    revision: str | None = revision_option()
    variant: str | None = variant_option()
    single_file_config: str | None = single_file_config_option()
    text_encoders: str = text_encoders_option()
    quantized_cache: str | bool | None = quantized_cache_option()
    activation_bits: int = activation_bits_option(calibrate_only=True)
    groups: int = groups_option()
    calib_prompts: str | None = calib_prompts_option()
    calib_samples: int | None = calib_samples_option()
    num_inference_steps: int = option(25, "the sampling schedule calibrated (25)")
    guidance_scale: float | None = option(None, GUIDANCE_HELP)
    max_sequence_length: int | None = option(None, MAX_SEQUENCE_LENGTH_HELP + "; sample with the same")
    height: int | None = option(None, "image height calibrated (default: the model's native)")
    width: int | None = option(None, "image width calibrated (default: the model's native)")
    scheduler: str | None = option(None, SCHEDULER_HELP, choices=SCHEDULER_CHOICES)
    device: str = option("cpu")
    out: str | None = option(None, "output folder (default: QUANTIZED_BASE/activations-aB-kK)")
    force: bool = option(False, "replace the parameters in a non-empty --out")
    quiet: bool = option(False, QUIET_HELP)


def activations_folder(config: QuantizeActivationsConfig) -> str | Path | None:
    """Where the parameters go: ``--out``, else a folder inside the quantized base named by the settings."""
    from ..ptq.activation_calibration import folder_name

    if not config.out and config.quantized_base is not None:
        return Path(config.quantized_base) / folder_name(config.activation_bits, config.groups)
    return config.out


@writes_to(lambda config: config.out or config.quantized_base)  # by default inside the base's folder
def run_quantize_activations(config: QuantizeActivationsConfig):
    """Calibrate and write the parameters; returns the calibrated quantizer."""
    from ..ptq.activation_calibration import ACTIVATION_FILES, activations_for, calibration_prompts, save_activations

    with quiet_while(config.quiet):
        ActivationConfig(bits=config.activation_bits, groups=config.groups)  # one-line errors before any loading
        check_sampling(config.guidance_scale, config.num_inference_steps, config.height, config.width,
                       config.max_sequence_length)
        if config.out is None and config.quantized_base is None:
            raise TuneQDMError("name the output folder with --out (or pass --quantized_base to write next to it)")
        out = check_output_folder(activations_folder(config), config.force, ACTIVATION_FILES, "activation parameters")
        calibration_prompts(config.calib_prompts, config.calib_samples, config.pretrained_model_name_or_path)
        pipe = load_pipeline(config.pretrained_model_name_or_path, quantized_base=config.quantized_base,
                             device=config.device, height=config.height, width=config.width, vae_encoder=False,
                             **version(config), **loading(config))
        set_scheduler(pipe, config.scheduler)
        q = activations_for(pipe, config.activation_bits, config.groups, prompts_file=config.calib_prompts,
                            samples=config.calib_samples, base=config.pretrained_model_name_or_path,
                            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                            max_sequence_length=config.max_sequence_length, size=(config.height, config.width))
        q.info.update(quantized_base=config.quantized_base, base=config.pretrained_model_name_or_path)
        save_activations(q, out)
        print(f"A{config.activation_bits} K={config.groups} activation parameters for {len(q.timesteps)} steps, "
              f"{len(q.layers)} layers ({q.dim_counts()}) in {q.info['calibration_seconds']} s -> {out}")
        return q
