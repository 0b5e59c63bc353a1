"""The fidelity table of `tuneqdm benchmark fidelity` (``tuneqdm.benchmarks.fidelity`` fills it): its cells, their
folder names and the table over subjects, which ``tuneqdm report`` reads.

A cell is one (method, bits, subject); ``floor`` is the untuned quantized model (scales at their initial values);
``fp`` and ``lora`` ignore ``bits``. The table averages over subjects (mean and population std).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..files import write_file_atomically

FLOOR = "floor"
TABLE_VERSION = 2


def cells(methods, bits, subjects) -> list[tuple[str, int | None, str]]:
    out = []
    for m in methods:
        for b in ([None] if m in ("fp", "lora") else bits):
            for s in subjects:
                out.append((m, b, s))
    return out


def cell_name(method: str, bits: int | None) -> str:
    return method if bits is None else f"{method}-w{bits}"


def table(out: Path, methods, bits, subjects, total_params: int) -> dict:
    """Mean and std over subjects of every finished (method, bits), as JSON and markdown in ``out``."""
    rows = []
    for m in methods:
        for b in ([None] if m in ("fp", "lora") else bits):
            ms = [json.loads(p.read_text()) for s in subjects
                  if (p := out / "cells" / cell_name(m, b) / s / "eval" / "metrics.json").is_file()]
            if not ms:
                continue
            row = {"method": m, "bits": b, "subjects": len(ms)}
            for k in ("dino", "clip_i", "clip_t", "train_s"):
                vals = [x[k] for x in ms]
                row[k] = statistics.fmean(vals)
                row[k + "_std"] = statistics.pstdev(vals)
            row["learning_rate"] = ms[0]["settings"].get("learning_rate")
            row["trainable_params"] = ms[0]["trainable_params"]
            row["trainable_fraction"] = ms[0]["trainable_params"] / total_params
            row["adapter_bytes"] = ms[0]["adapter_bytes"]
            peaks = [x["train_peak_mib"] for x in ms if x.get("train_peak_mib") is not None]
            row["train_peak_mib"] = max(peaks) if peaks else None
            rows.append(row)
    result = {"table_version": TABLE_VERSION, "unet_params": total_params, "rows": rows}
    write_file_atomically(out / "fidelity.json", json.dumps(result, indent=1))
    md = ["| method | bits | lr | subjects | DINO | CLIP-I | CLIP-T | trainable | adapter bytes | train s | peak MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pm = lambda k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}"  # noqa: E731
        lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:g}"
        md.append(f"| {r['method']} | {r['bits'] or '-'} | {lr} | {r['subjects']} | {pm('dino')} | {pm('clip_i')} | "
                  f"{pm('clip_t')} | {r['trainable_params']:,} ({100 * r['trainable_fraction']:.2f} %) | "
                  f"{r['adapter_bytes']:,} | {r['train_s']:.0f} | "
                  f"{'-' if r['train_peak_mib'] is None else round(r['train_peak_mib'])} |")
    write_file_atomically(out / "fidelity.md", "\n".join(md) + "\n")
    return result
