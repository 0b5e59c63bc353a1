"""The trained result in ``--output_dir``: its file names and how to tell which kind it is.

What ``tuneqdm train`` writes (``tuneqdm.train.outputs``) and what ``tuneqdm generate --adapter`` and
``tuneqdm.load_pipeline`` read; kept below both so that sampling never imports training.

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

from .errors import TuneQDMError
from .serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TRAINING_JSON = "training.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FP_UNET = "unet"
PRODUCTS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, FP_UNET, TRAINING_JSON)


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
