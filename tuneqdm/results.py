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

from pathlib import Path

from .errors import TuneQDMError
from .files import check_digest_values, check_fields, file_tensor_digests, json_digest, read_json
from .serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TRAINING_JSON = "training.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FP_UNET = "unet"
PRODUCTS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, FP_UNET, TRAINING_JSON)


RETRAIN = "train the adapter again"
_TRAINING_FIELDS = {"tuneqdm_method?": str, "base_id?": (str, type(None)), "steps?": int, "base_fingerprint?": str,
                    "instance_prompts?": list, "class_prompts?": list, "classes?": list,
                    "quantized_base?": (str, type(None)), "settings?": dict, "identity?": dict, "digests?": dict}


def read_training_json(directory, fix: str = RETRAIN) -> dict:
    """The checked ``training.json`` of a result folder ({} when there is none: a plain diffusers LoRA folder): valid
    JSON, the fields its readers use of the right types, and (when it records digests) unchanged since it was written;
    else one line ending in ``fix``."""
    path = Path(directory) / TRAINING_JSON
    if not path.is_file():
        return {}
    info = check_fields(read_json(path, "training record"), _TRAINING_FIELDS, path, fix)
    for key in ("instance_prompts", "class_prompts", "classes"):
        if not all(isinstance(v, (str, type(None))) for v in info.get(key) or []):
            raise TuneQDMError(f"{path}: {key!r} must be a list of strings: {fix}")
    recorded = info.get("digests")
    if recorded is not None:
        if not isinstance(recorded.get(TRAINING_JSON), str):
            raise TuneQDMError(f"{path}: its SHA-256 digests are damaged: {fix}")
        if recorded[TRAINING_JSON] != json_digest(_settings(info)):
            raise TuneQDMError(f"{path} was changed after saving (it does not match its SHA-256 digest): {fix}")
    return info


def _settings(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "digests"}


def weight_files(directory, kind: str) -> list[Path]:
    """The safetensors files of a ``lora`` or ``fp`` result (none for scale adapters: ``adapter_config.json`` guards
    their tensors)."""
    d = Path(directory)
    if kind == "lora":
        return [d / LORA_WEIGHTS]
    if kind == "fp":
        return sorted((d / FP_UNET).glob("*.safetensors")) or [d / FP_UNET / "diffusion_pytorch_model.safetensors"]
    return []


def _parts(directory, kind: str) -> dict:
    """The JSON files besides training.json that shape the model (a fine-tuned denoiser's config)."""
    if kind != "fp":
        return {}
    return {f"{FP_UNET}/config.json": read_json(Path(directory) / FP_UNET / "config.json", "fine-tuned model")}


def result_digests(directory, kind: str, info: dict) -> dict:
    """What ``training.json`` stores under ``"digests"``: SHA-256 of every tensor of the written weight files, of the
    fine-tuned denoiser's config and of training.json's own content (``info``); refuses NaN or infinite weights."""
    tensors = file_tensor_digests(weight_files(directory, kind), "trained weights", "the training diverged: lower the "
                                  "learning rate")
    parts = {k: json_digest(v) for k, v in _parts(directory, kind).items()}
    return {"tensors": tensors, **parts, TRAINING_JSON: json_digest(_settings(info))}


def check_result(directory) -> tuple[str, dict]:
    """(kind, training.json) of a ``tuneqdm train`` result, its weights checked before any model is built: the
    training record's schema and digest, every LoRA or fine-tuned tensor readable, finite and matching its digest,
    the fine-tuned denoiser's config unchanged. A result written before training.json recorded digests is checked for
    readability and finiteness only."""
    kind = adapter_kind(directory)
    info = read_training_json(directory)
    if kind in ("lora", "fp") and not info:  # its base, method and digests are there: no guessing
        raise TuneQDMError(f"--adapter {directory} lacks {TRAINING_JSON}, which tuneqdm train writes beside the "
                           "weights: point --adapter at a tuneqdm train --output_dir (a LoRA from elsewhere goes in "
                           "--lora)")
    if kind in ("lora", "fp"):
        actual = file_tensor_digests(weight_files(directory, kind), f"{kind} result", RETRAIN)
        recorded = info.get("digests")
        parts = _parts(directory, kind) if recorded is not None else {}
        check_digest_values(recorded, actual, Path(directory), RETRAIN, parts)
    return kind, info


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
