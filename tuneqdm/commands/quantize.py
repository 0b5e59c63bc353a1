"""``tuneqdm quantize``: post-training quantization of the denoiser's weights into a calibrated quantized base
(Q-Diffusion's timestep-aware calibration; ``tuneqdm.ptq.quantize`` does the work)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import either
from ..files import writes_to
from ..loading.options import revision_option, single_file_config_option, variant_option, version
from ..options import QUIET_HELP, option
from ..progress import quiet_while
from ..ptq.weights import CALIBRATIONS, AdaRoundConfig
from ..quant.bits import SUPPORTED_BITS, Bits
from ..sampling import GUIDANCE_HELP


@dataclass
class QuantizeConfig:
    """The ``tuneqdm quantize`` settings; each field is its flag."""

    out: str = option(help="output folder (written only when calibration has finished)")
    pretrained_model_name_or_path: str | None = option(
        None, "a local diffusers folder or hub id (default: the embedded toy pipeline). With --calibrate minmax/mse a "
              "local transformer (or a UNet with --no-split_shortcuts) is quantized tensor by tensor from its "
              "safetensors, never loading the float model")
    revision: str | None = revision_option()
    variant: str | None = variant_option()
    single_file_config: str | None = single_file_config_option()
    bits: int = option(4, f"weight bits: {either(SUPPORTED_BITS)} (default 4)")
    calibrate: str = option("adaround", "minmax / mse: round to nearest on the channel's range / on an MSE-searched "
                            "clipping range; adaround: the mse grid with learned rounding, block by block against the "
                            "fp model (default)", choices=CALIBRATIONS)
    calib_prompts: str | None = option(
        None, "text file, one prompt per line (default for the embedded toy pipeline only: captions of toy-world "
              "scenes from seed 40000000, the PTQ calibration seeds [40M, 50M))")
    calib_samples: int = option(
        32, "calibration images (prompt i mod the number of prompts, seed --seed + i); each gives the UNet's inputs "
            "at every recorded step, both guidance halves: N x steps x 2 rows (Q-Diffusion's cali_n; default 32; "
            "adaround only: minmax/mse use one row, to find the shortcut splits)")
    calib_steps: int | None = option(None, "sampling steps recorded, uniformly spaced (default: all "
                                           "--num_inference_steps)")
    num_inference_steps: int = option(25, "sampling steps of the calibration sampling (default 25)")
    guidance_scale: float | None = option(None, GUIDANCE_HELP)
    iters: int = option(AdaRoundConfig.iters, f"adaround: Adam steps per block (default {AdaRoundConfig.iters})")
    batch_size: int = option(AdaRoundConfig.batch_size,
                             f"adaround: calibration rows per step (default {AdaRoundConfig.batch_size})")
    split_shortcuts: bool = option(True, "separate quantizers for the hidden and skip slices of up-block resnets' "
                                         "concatenated input (default on)", action=argparse.BooleanOptionalAction)
    seed: int = option(0, "calibration image i uses seed + i")
    device: str = option("cpu")
    force: bool = option(False, "write into a non-empty output folder")
    quiet: bool = option(False, QUIET_HELP)

    def __post_init__(self):
        self.bits = Bits(self.bits, "--bits")


@writes_to(lambda config: config.out)
def run_quantize(config: QuantizeConfig) -> dict:
    """Calibrate and write the quantized base ``config.out``; returns its calibration record."""
    from ..ptq.quantize import quantize_pipeline

    def block_done(i, n, block):
        if not config.quiet:
            print(f"block {i}/{n} {block['block']}: error {block['round_to_nearest']:.3g} (round to nearest) -> "
                  f"{block['adaround']:.3g} ({block['seconds']:.0f} s)", flush=True)

    with quiet_while(config.quiet):
        rec = quantize_pipeline(
            config.out, config.pretrained_model_name_or_path, config.bits, config.calibrate,
            calib_prompts=config.calib_prompts, calib_samples=config.calib_samples, calib_steps=config.calib_steps,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale, seed=config.seed,
            split_shortcuts=config.split_shortcuts,
            adaround=AdaRoundConfig(iters=config.iters, batch_size=config.batch_size, seed=config.seed),
            force=config.force, device=config.device, progress=block_done, **version(config))
    print(f"W{config.bits} {config.calibrate} quantized base in {config.out} ({rec['rows']} calibration rows, "
          f"{len(rec['splits'])} split convs, {rec['seconds']:.0f} s); use it with tuneqdm train --quantized_base "
          f"{config.out} --bits {config.bits} --quant_init {rec['grid_init']}")
    return rec
