"""Peak memory of quantizing a >= 2 B-parameter DiT: streaming (tuneqdm.quantize_pretrained) vs diffusers + quantize_.

The model is a FluxTransformer2DModel at FLUX.1's width (hidden 3072, 24 heads) with 4 double-stream and 6 single-
stream blocks (2.26 B parameters), random weights written straight to sharded bf16 safetensors (no float model is
ever built to make it). Each mode runs in its own process; peak RSS is the kernel's VmHWM of that process (imports
included).

    python benchmarks/quantize_streaming.py --all              # make the model once (cached), run both modes
    python benchmarks/quantize_streaming.py --mode stream      # one mode, JSON on stdout

Writes docs/benchmarks/quantize_streaming.json and .md with --all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tuneqdm.memory import proc_status_bytes

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(tempfile.gettempdir()) / "tuneqdm-bench" / "flux-width-2b"
CONFIG = dict(num_layers=4, num_single_layers=6)  # the rest: FluxTransformer2DModel's defaults (FLUX.1's width)
MODES = ("stream", "diffusers")
GiB = 2**30


def peak_rss() -> int:
    peak = proc_status_bytes("VmHWM")
    if peak is None:
        raise RuntimeError("VmHWM not found")
    return peak


def make_model(folder: Path, shard_bytes: int = 2 * GiB, seed: int = 0) -> dict:
    """Random bf16 weights (std 0.02) in diffusers' sharded layout, one shard in memory at a time."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    if (folder / "done.json").is_file():
        return json.loads((folder / "done.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = FluxTransformer2DModel(**CONFIG)
    skeleton.save_config(folder)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    groups, size = [[]], 0
    for k, shape in shapes.items():
        n = shape.numel() * 2
        if size + n > shard_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    total = sum(s.numel() for s in shapes.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=1))
    info = {"parameters": total, "largest_tensor": max(s.numel() for s in shapes.values()), "shards": len(groups)}
    (folder / "done.json").write_text(json.dumps(info))
    return info


def run_mode(mode: str, bits: int, init: str) -> dict:
    import tuneqdm

    config = tuneqdm.QuantConfig(bits=bits, method="tuneqdm", experts=1, init=init)
    rss_after_import = peak_rss()
    t0 = time.perf_counter()
    if mode == "stream":
        model = tuneqdm.quantize_pretrained(MODEL, config)
    else:
        from diffusers import FluxTransformer2DModel

        model = tuneqdm.quantize_(FluxTransformer2DModel.from_pretrained(MODEL, torch_dtype=torch.float32), config)
    seconds = time.perf_counter() - t0
    packed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"mode": mode, "bits": bits, "init": init, "seconds": round(seconds, 1), "peak_rss_bytes": peak_rss(),
            "rss_after_imports_bytes": rss_after_import, "quantized_model_bytes": packed,
            "fingerprint": tuneqdm.fingerprint(model)}


def table(info: dict, rows: list[dict]) -> str:
    largest = info["largest_tensor"] * 4
    lines = [
        f"Model: FluxTransformer2DModel at FLUX.1's width, {CONFIG}, {info['parameters'] / 1e9:.2f} B parameters, "
        f"random bf16 weights in {info['shards']} safetensors shards ({info['parameters'] * 2 / GiB:.2f} GiB; as "
        f"float32 {info['parameters'] * 4 / GiB:.2f} GiB). Largest single tensor as float32: {largest / GiB:.3f} GiB.",
        "",
        "| path | bits / init | peak RSS (GiB) | quantized model (GiB) | bound: model + largest tensor + 0.5 GiB | "
        "within bound | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = r["quantized_model_bytes"] + largest + 0.5 * GiB
        path = ("streaming `quantize_pretrained`" if r["mode"] == "stream"
                else "diffusers `from_pretrained` (float32) + `quantize_`")
        lines.append(f"| {path} | W{r['bits']} {r['init']} | {r['peak_rss_bytes'] / GiB:.2f} | "
                     f"{r['quantized_model_bytes'] / GiB:.2f} | {bound / GiB:.2f} | "
                     f"{'yes' if r['peak_rss_bytes'] <= bound else 'no'} | {r['seconds']} |")
    same = len({r["fingerprint"] for r in rows}) == 1
    lines += ["", f"Both paths give the same integers and scales (fingerprints {'equal' if same else 'DIFFER'})."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--init", default="minmax", choices=("minmax", "mse"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "quantize_streaming")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.bits, args.init)))
        return
    info = make_model(MODEL)
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--bits", str(args.bits), "--init", args.init]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": info, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(table(info, rows) + "\n")


if __name__ == "__main__":
    main()
