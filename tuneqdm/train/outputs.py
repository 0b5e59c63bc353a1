"""The trained result in ``--output_dir``: what ``tuneqdm generate --adapter`` and ``tuneqdm.load_pipeline`` read.

- scale methods: ``adapter.safetensors`` + ``adapter_config.json`` (``tuneqdm.save_adapter``: scales only, method,
  bits, experts, base id and fingerprint) with the prompts and the run's settings added to the config;
- ``lora`` and ``qlora``: diffusers' ``pytorch_lora_weights.safetensors`` (PEFT LoRA of the UNet or transformer,
  loadable by ``pipe.load_lora_weights`` on the float or the quantized denoiser; qlora's base fingerprint is in
  ``training.json``);
- ``fp``: the whole fine-tuned denoiser, ``unet/`` (diffusers folder, safetensors; its config names its class).

Every method also writes ``training.json``: method, base id and the prompts, for loading without guessing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..denoisers import PIPELINES
from ..errors import TuneQDMError
from ..files import atomic_dir, write_error_reason
from ..serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter

TRAINING_JSON = "training.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FP_UNET = "unet"
PRODUCTS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, FP_UNET, TRAINING_JSON)


def save_result(unet, output_dir, method: str, pipeline_class, info: dict) -> Path:
    """Write the trained weights and ``training.json``: the whole ``output_dir`` is rebuilt beside itself (the run's
    checkpoints, log and images carried over as hard links) and swapped in as one unit, so no death can leave new
    weights beside an old config. A failed write raises ``OSError`` or ``SafetensorError`` and changes nothing."""
    output_dir = Path(output_dir)
    with atomic_dir(output_dir, carry=lambda name: name not in PRODUCTS) as tmp:
        if method in ("lora", "qlora"):
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            component = PIPELINES[pipeline_class.__name__].attribute  # unet_lora_layers or transformer_lora_layers
            pipeline_class.save_lora_weights(tmp, **{f"{component}_lora_layers": layers}, safe_serialization=True)
        elif method == "fp":
            unet.save_pretrained(tmp / FP_UNET, safe_serialization=True)
        else:
            save_adapter(unet, tmp, extra=info)
        (tmp / TRAINING_JSON).write_text(json.dumps(info, indent=1))
    return output_dir


def write_failure(e: BaseException, what: Path, kept: str) -> TuneQDMError:
    """The one-line error of a failed write of ``what`` (``kept``: where the last good state is)."""
    return TuneQDMError(f"cannot write {what} ({write_error_reason(e)}); nothing partial was left, {kept}")


def read_training_json(directory) -> dict:
    path = Path(directory) / TRAINING_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise TuneQDMError(f"{path} is not valid JSON: train the adapter again") from None


def adapter_kind(directory) -> str:
    """``scales``, ``lora`` or ``fp`` for a training output folder (one-line error when it is none of them)."""
    d = Path(directory)
    if not d.is_dir():
        raise TuneQDMError(f"--adapter {d} is not a folder")
    if (d / ADAPTER_CONFIG).is_file():
        return "scales"
    if (d / LORA_WEIGHTS).is_file():
        return "lora"
    if (d / FP_UNET / "config.json").is_file():
        return "fp"
    raise TuneQDMError(f"--adapter {d} holds no adapter ({ADAPTER_CONFIG}, {LORA_WEIGHTS} or {FP_UNET}/): "
                       "point it at a `tuneqdm train` --output_dir")
