"""``tuneqdm export``: a trained result as LoRA files (diffusers, kohya), a merged checkpoint or a quanto model
folder (``tuneqdm.export.command`` does the work)."""

from __future__ import annotations

from dataclasses import dataclass

from ..files import writes_to
from ..loading.options import revision_option, single_file_config_option, variant_option
from ..options import QUIET_HELP, option
from ..progress import quiet_while


@dataclass
class ExportConfig:
    """The ``tuneqdm export`` settings; each field is its flag."""

    adapter: str = option(help="a `tuneqdm train` --output_dir")
    to: str = option(help="lora, checkpoint, or quantized (peqa-style W2/W4 adapters: an optimum-quanto model folder "
                          "that diffusers loads, tuneqdm's integers kept bit for bit)")
    out: str = option(help="output folder (written whole, or not at all)")
    format: str = option("diffusers", "lora: diffusers (pytorch_lora_weights.safetensors, PEFT keys: "
                                      "pipe.load_lora_weights) or kohya (lora_unet_* keys: ComfyUI, A1111/Forge; UNet "
                                      "pipelines) (default: diffusers)")
    rank: int | None = option(None, "lora: one rank for every layer (capped at each layer's full rank)")
    energy: float | None = option(None, "lora: per layer, the smallest rank keeping this fraction of the delta's "
                                        "energy (default 0.9 when neither --rank nor --energy is given)")
    dtype: str = option("fp32", "fp32, fp16 or bf16 (default: fp32)")
    expert: str | None = option(None, "checkpoint, quantized: an expert index, 'blend' (every expert weighted by the "
                                      "share of timesteps it serves) or 'base' (the dequantized base) (default: "
                                      "expert 0 of a one-expert adapter, else blend)")
    single_file: bool = option(False, "checkpoint: also one .safetensors in the original LDM layout that "
                                      "from_single_file, ComfyUI and A1111 read (SD/SDXL UNets)")
    pretrained_model_name_or_path: str | None = option(None, "the base (default: the adapter's own)")
    quantized_base: str | None = option(None, "the adapter's quantized base folder (default: the one it records)")
    revision: str | None = revision_option(adapter=True)
    variant: str | None = variant_option(adapter=True)
    single_file_config: str | None = single_file_config_option(adapter=True)
    device: str = option("cpu")
    force: bool = option(False, "replace a non-empty output folder")
    quiet: bool = option(False, QUIET_HELP)


@writes_to(lambda config: config.out)
def run_export(config: ExportConfig) -> dict:
    """Check every setting, export, and print one summary line; returns what the export recorded."""
    from ..export.command import run_export as export

    with quiet_while(config.quiet):
        return export(config)
