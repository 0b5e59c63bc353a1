"""Writing the trained result in ``--output_dir`` (its format and readers: ``tuneqdm.results``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import PIPELINES
from ..errors import TuneQDMError
from ..files import atomic_dir, write_error_reason
from ..results import FP_UNET, PRODUCTS, TRAINING_JSON, result_digests
from ..serialization import save_adapter


def save_result(unet, output_dir, method: str, pipeline_class, info: dict) -> Path:
    """Write the trained weights and ``training.json``: the whole ``output_dir`` is rebuilt beside itself (the run's
    checkpoints, log and images carried over as hard links) and swapped in as one unit, so no death can leave new
    weights beside an old config. ``training.json`` records the SHA-256 of every written weight tensor and of itself
    (``tuneqdm.results.result_digests``; NaN or infinite weights are refused). A failed write raises ``OSError`` or
    ``SafetensorError`` and changes nothing."""
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
        kind = {"lora": "lora", "qlora": "lora", "fp": "fp"}.get(method, "scales")
        record = {**info, "digests": result_digests(tmp, kind, info)}
        (tmp / TRAINING_JSON).write_text(json.dumps(record, indent=1))
    return output_dir


def write_failure(e: BaseException, what: Path, kept: str) -> TuneQDMError:
    """The one-line error of a failed write of ``what`` (``kept``: where the last good state is)."""
    return TuneQDMError(f"cannot write {what} ({write_error_reason(e)}); nothing partial was left, {kept}")
