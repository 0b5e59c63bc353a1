"""What the int8 training path keeps and costs per layer, at SD-1.5 shapes (batch 1, 64x64 latents), against the
exact path: bytes autograd saves between forward and backward (each storage once, the input included) and seconds
of forward + backward,
for each choice of what the backward keeps for ``u`` (``tuneqdm.quant.layers.U_KEPT_CHOICES``).

    python benchmarks/train_int8_layers.py            # JSON lines on stdout, a markdown table on stderr

Every variant of a layer is timed back to back in one process (median of --repeats), so a shared CPU slows them
alike; the byte counts do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

import tuneqdm
from tuneqdm.quant.layers import U_KEPT_CHOICES
from tuneqdm.quant.paths import DynamicActivations

SHAPES = {  # name -> (float layer, input shape)
    "to_q 320x320, 4096 tokens": (lambda: nn.Linear(320, 320), (1, 4096, 320)),
    "ff.proj 320x2560, 4096 tokens": (lambda: nn.Linear(320, 2560), (1, 4096, 320)),
    "ff.out 1280x320, 4096 tokens": (lambda: nn.Linear(1280, 320), (1, 4096, 1280)),
    "attn2.to_k 768x320, 77 tokens": (lambda: nn.Linear(768, 320), (1, 77, 768)),
    "proj_in 1x1 320x320, 64x64": (lambda: nn.Conv2d(320, 320, 1), (1, 320, 64, 64)),
    "conv 3x3 320x320, 64x64": (lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 64, 64)),
    "conv 3x3 640x640, 32x32": (lambda: nn.Conv2d(640, 640, 3, padding=1), (1, 640, 32, 32)),
    "conv 3x3 1280x1280, 8x8": (lambda: nn.Conv2d(1280, 1280, 3, padding=1), (1, 1280, 8, 8)),
}


def saved_bytes(run) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for the backward during ``run()``, the layer's input included
    (whether a neighbour keeps it too depends on the model; the JSON says which variant keeps what)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, x = run()
    return sum(seen.values()), out, x


def measure(name: str, bits: int, repeats: int) -> list[dict]:
    """Every variant once per round, ``repeats`` rounds after a warm-up one (round-robin, so that other jobs on a
    shared CPU slow every variant alike); the median of each."""
    make, shape = SHAPES[name]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=bits, method="tuneqdm", experts=1, init="minmax"))
    layer = model[0]
    x0 = torch.randn(shape)
    quantizer = DynamicActivations(exclude=())
    variants = ("exact", *U_KEPT_CHOICES)
    times = {v: [] for v in variants}
    rows = {}
    for round_ in range(repeats + 1):
        for variant in variants:
            if variant == "exact":
                quantizer.remove()
            else:
                quantizer.install(model)
                layer.u_kept = variant

            def run():
                x = x0.clone().requires_grad_(True)
                return layer(x), x

            t0 = time.perf_counter()
            nbytes, y, _ = saved_bytes(run)
            y.backward(torch.ones_like(y))
            if round_:
                times[variant].append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            rows[variant] = {"layer": name, "bits": bits, "variant": variant, "saved_bytes": nbytes,
                             "input_bytes": x0.numel() * 4, "output_bytes": y.numel() * 4, "path": layer.last_path}
    for v in variants:
        rows[v]["seconds"] = sorted(times[v])[len(times[v]) // 2]
    return [rows[v] for v in variants]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lines = ["| layer | variant | saved MiB (x its fp32 input) | fwd+bwd ms | x exact |", "|---|---|---|---|---|"]
    for name in SHAPES:
        rows = measure(name, args.bits, args.repeats)
        exact = rows[0]["seconds"]
        for r in rows:
            print(json.dumps(r), flush=True)
            lines.append(f"| {name} | {r['variant']} | {r['saved_bytes'] / 2**20:.2f} "
                         f"({r['saved_bytes'] / r['input_bytes']:.2f}) | {r['seconds'] * 1e3:.1f} | "
                         f"{r['seconds'] / exact:.2f} |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
