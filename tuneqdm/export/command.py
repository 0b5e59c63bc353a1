"""``tuneqdm export``: a trained result into LoRA files or a merged checkpoint that other tools load.

Everything the user gives is checked before the model is built (target, format, rank rule, dtype, expert, output
folder, the adapter's digests), and the output folder is written as one unit (``tuneqdm.files.atomic_dir``): a
failure at any point is one ``TuneQDMError`` line and leaves nothing half-written.

The adapter's quantized base is rebuilt as ``tuneqdm generate`` rebuilds it: ``tuneqdm.load_pipeline(adapter=...)``
(its base quantized as in training, or the quantized base it records or ``--quantized_base`` names), checked by
fingerprint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..families import denoiser, denoiser_component, family_named
from ..errors import TuneQDMError, TuneQDMWarning
from ..files import check_output_folder, read_json
from ..loading import DEFAULT_BASE_ID, load_pipeline
from ..results import LORA_WEIGHTS, check_result, read_training_json
from ..serialization import read_adapter
from .checkpoint import CHECKPOINT_JSON, export_checkpoint
from .deltas import check_rank_choice
from .lora import EXPERTS_DIR, EXPORT_JSON, FORMATS, check_dtype, check_format, convert_lora_file, export_lora
from .schedule import schedule

# what an export writes into --out: LoRA files and their record, or a diffusers model folder (quanto's included) and
# its single-file twin
EXPORT_FILES = (LORA_WEIGHTS, EXPORT_JSON, EXPERTS_DIR, CHECKPOINT_JSON, "config.json", "*.safetensors",
                "diffusion_pytorch_model.safetensors.index.json")

TARGETS = ("lora", "checkpoint", "quantized")


def check_args(args) -> None:
    """One line for every setting that cannot work, before anything is loaded."""
    if args.to not in TARGETS:
        raise TuneQDMError(f"--to {args.to!r}: choose lora (LoRA files), checkpoint (a merged model folder) or "
                           "quantized (a quanto model folder)")
    if args.format not in FORMATS:
        raise TuneQDMError(f"unknown LoRA format {args.format!r}: choose diffusers or kohya")
    check_dtype(args.dtype)
    check_rank_choice(args.rank, args.energy)
    if args.to != "lora" and (args.rank is not None or args.energy is not None or args.format != "diffusers"):
        raise TuneQDMError(f"--rank, --energy and --format apply to --to lora; --to {args.to} holds the whole "
                           "weights")
    if args.to == "quantized" and (args.single_file or args.dtype != "fp32"):
        raise TuneQDMError("--single_file and --dtype apply to --to checkpoint; --to quantized keeps tuneqdm's "
                           "integers and float32 scales")
    if args.to == "lora" and (args.single_file or args.expert is not None):
        raise TuneQDMError("--single_file and --expert apply to --to checkpoint; --to lora writes every expert")


def _warn(message: str) -> None:
    warnings.warn(message, TuneQDMWarning, stacklevel=2)


def run_export(args) -> dict:
    """The command's work: returns what the export recorded (and prints one summary line). ``args``: a
    ``tuneqdm.commands.ExportConfig``, or anything with its fields (the parsed flags)."""
    check_args(args)
    adapter = Path(args.adapter)
    out = check_output_folder(args.out, args.force, EXPORT_FILES, "an export")
    kind = check_result(adapter)[0]  # a damaged result is refused before anything is written
    if kind == "lora":
        return _export_lora_result(args, adapter, out)
    if kind == "fp" and (args.to == "lora" or args.expert is not None):
        raise TuneQDMError(f"{adapter} is a fine-tuned model (method fp), not a scale adapter: export it with "
                           "--to checkpoint, without --expert")
    cfg = read_adapter(adapter)[0] if kind == "scales" else {}
    if args.to == "lora":
        component = _component(args.pretrained_model_name_or_path or cfg.get("base_id"))
        if component is not None:
            check_format(args.format, component)
    pipe = load_pipeline(args.pretrained_model_name_or_path, adapter=adapter, quantized_base=args.quantized_base,
                         device=args.device, revision=args.revision, variant=args.variant,
                         single_file_config=args.single_file_config)
    model, component = denoiser(pipe), denoiser_component(pipe)
    extra = {"adapter": str(adapter.resolve())}
    if args.to == "lora":
        sched = schedule(pipe, cfg) if cfg["experts"] > 1 or cfg["intervals"] else None
        record = export_lora(model, out, cfg, component, args.format, args.rank, args.energy, args.dtype, sched,
                             extra, warn=_warn)
        files = [f for f, v in record["files"].items() if v is not None]
        kept = record["files"][LORA_WEIGHTS]["energy_kept"] if record["files"].get(LORA_WEIGHTS) else None
        print(f"{args.format} LoRA of the {cfg['method']} adapter in {out}: {len(files)} file(s), "
              f"{sum(record['files'][f]['bytes'] for f in files):,} bytes"
              + (f", {kept:.3f} of the delta's energy kept" if kept is not None else ""))
        return record
    if kind == "fp":
        if args.to == "quantized":
            raise TuneQDMError(f"{adapter} is a fine-tuned float model (method fp): it has no integers to keep")
        cfg = _fp_config(adapter)
    if args.to == "quantized":
        from .quantized import export_quantized

        record = export_quantized(model, out, cfg, args.expert, extra)
        print(f"quanto {record['weights_dtype']} {component} of the {cfg['method']} adapter in {out} "
              f"({record['exact_linears']} Linear layers bit for bit; load it with from_pretrained)")
        return record
    record = export_checkpoint(model, out, cfg, args.expert, args.dtype, args.single_file, extra)
    print(f"{args.dtype} {component} of the {cfg['method']} result in {out} (weights {record['weights']})"
          + (f", single file {record['single_file']}" if record.get("single_file") else ""))
    return record


def _component(base) -> str | None:
    """The denoiser attribute of a base known before loading (the embedded default, a local pipeline folder); None
    for a hub id (checked once loaded)."""
    if base in (None, DEFAULT_BASE_ID):
        return "unet"
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return None
    name = read_json(index, "diffusers pipeline").get("_class_name")
    return family_named(name).attribute if isinstance(name, str) else None


def _fp_config(adapter: Path) -> dict:
    info = read_training_json(adapter)
    return {"method": "fp", "bits": None, "experts": 1, "base_id": info.get("base_id"),
            "base_fingerprint": info.get("base_fingerprint"), "intervals": [], "num_train_timesteps": 1}


def _export_lora_result(args, adapter: Path, out: Path) -> dict:
    """A lora/qlora result is a LoRA already: copied into the chosen format (no rank rule: it has its rank)."""
    info = read_training_json(adapter)
    if args.to == "checkpoint":
        raise TuneQDMError(f"{adapter} is a LoRA result ({info.get('tuneqdm_method', 'lora')}): export it with "
                           "--to lora, then merge it in diffusers (pipe.load_lora_weights, pipe.fuse_lora)")
    if args.rank is not None or args.energy is not None:
        raise TuneQDMError(f"{adapter} is a LoRA already, at the rank it was trained with: drop --rank/--energy")
    record = convert_lora_file(adapter / LORA_WEIGHTS, out, args.format, args.dtype, info)
    print(f"{args.format} LoRA of the {record['method']} result in {out}: {record['files'][LORA_WEIGHTS]['bytes']:,} "
          "bytes")
    return record
