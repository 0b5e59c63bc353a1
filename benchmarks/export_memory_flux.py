"""Peak memory of ``tuneqdm export --to lora`` on a FLUX.1-width transformer: one layer's float delta at a time?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/export_memory_flux.py --blocks 1 1 --method peqa --rank 16 \\
        --out runs/export-flux-mem.json

A ``FluxTransformer2DModel`` of FLUX.1-dev's width (hidden 3072, 24 heads, ff 12288; ``--blocks`` double/single
blocks deep) is built on the meta device with tuneqdm's W4 layers filled with random packed integers (as
``benchmarks/train_memory.py`` does), every scale moved by a random 1 % (a personalization to export), then
``tuneqdm.export.export_lora`` writes its LoRA. The process's peak RSS is reset (``/proc/self/clear_refs``) once the
model is built, so the peak measured is the export's; it is set against the model's own bytes and the largest layer's
float delta (fp32). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_memory import flux_config, proc_status_bytes, synthetic_flux  # noqa: E402

GIB = 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, nargs=2, default=(1, 1), metavar=("DOUBLE", "SINGLE"))
    p.add_argument("--method", default="peqa")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import tuneqdm
    from tuneqdm.export.lora import export_lora
    from tuneqdm.serialization import fingerprint

    experts = args.experts or tuneqdm.METHODS[args.method].default_experts
    model = synthetic_flux(flux_config(tuple(args.blocks)), args.method, 4, experts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in tuneqdm.scale_parameters(model):
            s.mul_(1 + 0.01 * torch.randn(s.shape, generator=g))
    layers = tuneqdm.quantized_layers(model)
    largest = max(layer.weight_shape.numel() for layer in layers.values())
    cfg = {"method": args.method, "bits": 4, "experts": experts, "intervals": [], "num_train_timesteps": 1000,
           "train_bias": False, "base_id": "random FLUX.1-width", "base_fingerprint": fingerprint(model)}
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the export's
    before = proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        record = export_lora(model, Path(tmp) / "lora", cfg, "transformer", rank=args.rank)
    seconds = time.perf_counter() - t0
    peak = proc_status_bytes("VmHWM")
    result = {
        "command": " ".join(["python", "benchmarks/export_memory_flux.py", *(argv or sys.argv[1:])]),
        "blocks": list(args.blocks), "method": args.method, "experts": experts, "rank": args.rank,
        "quantized_layers": len(layers), "largest_layer_values": largest,
        "largest_delta_gib": largest * 4 / GIB, "model_gib": model_bytes / GIB,
        "rss_before_export_gib": before / GIB, "peak_rss_export_gib": peak / GIB,
        "peak_above_before_gib": (peak - before) / GIB,
        "peak_above_before_in_largest_deltas": (peak - before) / (largest * 4),
        "lora_bytes": sum(v["bytes"] for v in record["files"].values() if v), "export_s": seconds,
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
