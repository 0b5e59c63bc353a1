"""``tuneqdm generate``: sample a pipeline (an adapter, a LoRA file, quantized activations on top) into a folder of
PNGs and ``generate.json``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..errors import TuneQDMError
from ..families import denoiser, family
from ..files import atomic_dir, check_output_folder, check_prompt, writes_to
from ..loading import load_pipeline
from ..loading.options import (loading, quantized_cache_option, revision_option, single_file_config_option,
                               text_encoders_option, variant_option, version)
from ..options import QUIET_HELP, option
from ..progress import is_quiet, quiet_while
from ..ptq.config import (DYNAMIC_BITS, ActivationConfig, activation_bits_option, activations_option,
                          attention_quant_option, calib_prompts_option, calib_samples_option, groups_option)
from ..quant.kernels import FLOAT_BITS, KERNEL_MODES
from ..quant.paths import kernel_report
from ..results import read_training_json
from ..sampling import (GUIDANCE_HELP, MAX_SEQUENCE_LENGTH_HELP, SCHEDULER_CHOICES, SCHEDULER_HELP, check_sampling,
                        generate, sample_on_dynamic_activations, set_scheduler, trained_activation_bits)

GENERATED = ("[0-9][0-9][0-9]*.png", "generate.json")  # what `tuneqdm generate` writes into --out
RECORDED = ("prompt", "negative_prompt", "num_images", "num_inference_steps", "guidance_scale", "scheduler", "seed",
            "pretrained_model_name_or_path", "revision", "variant", "single_file_config", "adapter", "quantized_base",
            "activation_bits", "groups", "attention_quant", "activations", "activation_quant", "kernels", "lora",
            "lora_scale", "max_sequence_length")  # the settings generate.json records


@dataclass
class GenerateConfig:
    """The ``tuneqdm generate`` settings; each field is its flag."""

    prompt: str = option()
    num_images: int = option(4)
    num_inference_steps: int = option(25)
    guidance_scale: float | None = option(None, GUIDANCE_HELP)
    max_sequence_length: int | None = option(None, MAX_SEQUENCE_LENGTH_HELP)
    scheduler: str | None = option(None, SCHEDULER_HELP, choices=SCHEDULER_CHOICES)
    seed: int = option(0, "image i uses seed + i")
    height: int | None = option(None, "image height in pixels, a multiple of 8 (default: the model's native size)")
    width: int | None = option(None, "image width in pixels, a multiple of 8 (default: the model's native size)")
    pretrained_model_name_or_path: str | None = option(
        None, "a local diffusers folder or hub id (default: the embedded toy pipeline)")
    revision: str | None = revision_option(adapter=True)
    variant: str | None = variant_option(adapter=True)
    single_file_config: str | None = single_file_config_option(adapter=True)
    text_encoders: str = text_encoders_option()
    quantized_cache: str | bool | None = quantized_cache_option()
    adapter: str | None = option(None, "a `tuneqdm train` output folder (scales, LoRA or fp UNet)")
    quantized_base: str | None = option(
        None, "a quantized base folder (tuneqdm.save_quantized; default: the one the adapter was trained on, if its "
              "folder still exists, else none)")
    lora: str | None = option(None, "a diffusers/PEFT LoRA .safetensors (or folder) to add on top of the model and "
                                    "any --adapter; works on the quantized UNet")
    lora_scale: float | None = option(None, "weight of --lora (default 1)")
    negative_prompt: str | None = option(None)
    device: str = option("cpu")
    kernels: str = option("auto", "quantized sampling: auto (integer matmuls where activations are quantized, where "
                          "they measured faster: on GPUs, and on CPU for dynamic activations into large layers), int8 "
                          "(integer matmuls wherever they apply) or reference (float rebuild, simulated activation "
                          "quantization)", choices=KERNEL_MODES)
    activation_quant: str = option("dgq", "with quantized activations: dgq (calibrated groups, --activation_bits) or "
                                   "dynamic (int8 per token, or per sample into k x k convs, of every quantized layer, "
                                   "no calibration); default dgq", choices=("dgq", "dynamic"))
    out: str = option("samples", "output folder (default: samples)")
    force: bool = option(False, "write into a non-empty output folder")
    activation_bits: int | None = activation_bits_option(calibrate_only=False)
    attention_quant: str = attention_quant_option()
    activations: str | None = activations_option()
    groups: int = groups_option()
    calib_prompts: str | None = calib_prompts_option()
    calib_samples: int | None = calib_samples_option()
    quiet: bool = option(False, QUIET_HELP)


@writes_to(lambda config: config.out)
def run_generate(config: GenerateConfig) -> list:
    """Check every setting, sample, and write the images and ``generate.json`` into ``config.out`` as one unit;
    returns the images."""
    with quiet_while(config.quiet):
        out = check_output_folder(config.out, config.force, GENERATED, "generated images")
        config = _checked(config)
        prompt = _class_prompt(config)
        pipe = load_pipeline(config.pretrained_model_name_or_path, adapter=config.adapter,
                             quantized_base=config.quantized_base, device=config.device, lora=config.lora,
                             lora_scale=1.0 if config.lora_scale is None else config.lora_scale,
                             kernels=config.kernels, height=config.height, width=config.width, vae_encoder=False,
                             **version(config), **loading(config))
        scheduler = set_scheduler(pipe, config.scheduler)
        model, quantizer = denoiser(pipe), _install_activations(config, pipe)
        images = generate(pipe, prompt, config.num_images, config.num_inference_steps, config.guidance_scale,
                          config.seed, negative_prompt=config.negative_prompt, height=config.height,
                          width=config.width, max_sequence_length=config.max_sequence_length, release_denoiser=True)
        if quantizer is not None and quantizer.skipped_attention:
            skipped = sorted(quantizer.skipped_attention)
            print(f"tuneqdm: warning: attention left in full precision in {len(skipped)} layers whose processors "
                  f"compute no scaled_dot_product_attention (e.g. {skipped[0]})", file=sys.stderr)
        _report_kernels(model, config.kernels)
        meta = {**{k: getattr(config, k) for k in RECORDED}, "prompt": prompt, "scheduler": scheduler,
                "guidance_scale": family(pipe).guidance if config.guidance_scale is None else config.guidance_scale,
                "height": images[0].height, "width": images[0].width,
                "seeds": [config.seed + i for i in range(len(images))]}
        with atomic_dir(out) as tmp:
            for i, image in enumerate(images):
                image.save(tmp / f"{i:03d}.png")
            (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
        print(f"{len(images)} images of '{prompt}' in {out}")
        return images


def _checked(config: GenerateConfig) -> GenerateConfig:
    """One line for every setting that cannot work, before anything loads; the LoRA scale and an adapter's trained
    activations filled in (on a copy: the caller's config is left as given)."""
    from dataclasses import replace

    if config.num_images < 1:
        raise TuneQDMError("--num_images must be at least 1")
    check_prompt(config.prompt, "--prompt")
    check_prompt(config.negative_prompt, "--negative_prompt")
    check_sampling(config.guidance_scale, config.num_inference_steps, config.height, config.width,
                   config.max_sequence_length)
    if config.lora is None and config.lora_scale is not None:
        raise TuneQDMError("--lora_scale weights a --lora file: add --lora FILE, or drop --lora_scale")
    if config.lora is not None and config.lora_scale is None:
        config = replace(config, lora_scale=1.0)
    if config.lora is not None and config.activation_bits not in (None, FLOAT_BITS):
        raise TuneQDMError("--lora with --activation_bits is not supported: the activation quantizers are calibrated "
                           "for the layers without LoRA")
    if config.activation_quant == "dynamic" and config.activation_bits not in (None, DYNAMIC_BITS):
        raise TuneQDMError(f"--activation_quant dynamic is {DYNAMIC_BITS}-bit: "
                           f"drop --activation_bits {config.activation_bits}")
    config = _trained_activations(config)
    if config.activation_bits not in (None, FLOAT_BITS):
        ActivationConfig(bits=config.activation_bits, groups=config.groups, attention=config.attention_quant)
    return config


def _class_prompt(config: GenerateConfig) -> str:
    """The prompt with ``<class>`` replaced by the adapter's class, as in ``tuneqdm train --instance_prompt "a sks
    <class>"``."""
    if "<class>" not in config.prompt:
        return config.prompt
    classes = {c for c in read_training_json(config.adapter).get("classes") or [] if c} if config.adapter else set()
    if len(classes) != 1:
        raise TuneQDMError("the prompt has a <class> placeholder but no --adapter trained on one toy subject "
                           "names the class: write the class word instead")
    return config.prompt.replace("<class>", classes.pop())


def _trained_activations(config: GenerateConfig) -> GenerateConfig:
    """Without --activation_bits, an adapter trained with ``--activation_bits 8`` samples as it trained: dynamic int8
    activations (the integer path); ``--activation_bits 16`` keeps activations in float."""
    from dataclasses import replace

    if config.activation_bits is None and config.activation_quant == "dgq":
        if trained_activation_bits(config.adapter) == DYNAMIC_BITS:
            return replace(config, activation_bits=DYNAMIC_BITS, activation_quant="dynamic")
    return config


def _install_activations(config: GenerateConfig, pipe):
    """generate's activation quantization on the pipeline's denoiser: dynamic int8, or DGQ (calibrated parameters,
    on top of any adapter; returned, for its report of attention it could not quantize), or none."""
    model, kind = denoiser(pipe), family(pipe)
    if config.activation_quant == "dynamic":
        sample_on_dynamic_activations(pipe, config.activation_bits or DYNAMIC_BITS)
    elif config.activation_bits not in (None, FLOAT_BITS):
        from ..ptq.activation_calibration import activations_for

        return activations_for(
            pipe, config.activation_bits, config.groups, config.attention_quant, config.activations,
            config.quantized_base, config.calib_prompts, config.calib_samples, config.pretrained_model_name_or_path,
            config.num_inference_steps, config.guidance_scale, log=lambda m: is_quiet() or print(m, file=sys.stderr),
            max_sequence_length=config.max_sequence_length, size=(config.height, config.width)).install(model, kind)
    return None


def _report_kernels(model, mode: str) -> None:
    counts = kernel_report(model)
    if any(counts.values()) and not is_quiet():
        print(f"kernels {mode}: " + ", ".join(f"{n} layers {path}" for path, n in counts.items()), file=sys.stderr)
