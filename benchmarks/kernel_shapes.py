"""Which CPU kernel serves quantized sampling? Op times at SD-1.5 UNet shapes (batch 2 = classifier-free guidance,
64x64 latents), fp32 = 1.0x. Measure before designing: these decide what ``tuneqdm.quant.kernels`` uses.

    python benchmarks/kernel_shapes.py --threads 1  # JSON on stdout; about 1 minute
    python benchmarks/kernel_shapes.py --threads 1 --out docs/benchmarks/kernel_shapes.json

Rows (each includes everything a layer would do per call):
- ``int_mm``: dynamic per-token int8 quantization of the activations + ``torch._int_mm`` + the int32 -> float scaling;
- ``int_mm_unfold`` (3x3 convs): the same after im2col of the already quantized int8 input;
- ``int8_conv`` (3x3 convs): torch's x86/oneDNN quantized conv, quantize_per_tensor of the input included;
- ``weight_only_ref``: today's W4 layer (unpack, subtract zero-point, scale, fp32 op);
- ``weight_only_int8``: the centred grid held as int8, one fused int8 -> float scaled copy, fp32 op;
- ``w4a8_int`` / ``w4a8_sim``: the library's own W4 layer with dynamic int8 activations (per token for a Linear, per
  sample into a 3x3 conv) on the integer path (``kernels="int8"``) and simulated in float (``"reference"``);
- ``w4_blocked_256k`` / ``w4_blocked_64k``: today's W4 layer rebuilding and applying its weight a block of output
  channels at a time, each block at most 256 Ki / 64 Ki values (the float block stays in cache; one op per block).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_SHAPES = [(2 * 4096, 320, 320), (2 * 1024, 640, 640), (2 * 256, 1280, 1280), (2 * 77, 768, 320),
                 (2 * 4096, 320, 2560), (2 * 4096, 1280, 320), (2 * 1024, 2560, 640)]  # the last two: GEGLU's out
CONV_SHAPES = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # (channels, latent side): 3x3, stride 1, padding 1


CLOCK = [time.perf_counter]  # --cpu_time: time.process_time (with 1 thread, what other processes inflate least)


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = CLOCK[0]()
        fn()
        times.append(CLOCK[0]() - t)
    return min(times)  # the least disturbed run: the CPU is shared


def quantize_rows(x2d):
    scale = x2d.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(x2d / scale).clamp_(-127, 127).to(torch.int8), scale


def library_rows(layer, x, reps, fp) -> dict:
    """The W4 layer's own sampling paths (see the module docstring), as ratios to the fp32 time ``fp``."""
    from tuneqdm.ptq.activations import DynamicActivations
    from tuneqdm.quant import layers

    row = {}
    layer.input_quantizer = DynamicActivations()
    for name, mode in (("w4a8_int", "int8"), ("w4a8_sim", "reference")):
        layer.kernels = mode
        row[name] = timed(lambda: layer(x), reps) / fp
    layer.input_quantizer, layer.kernels = None, "auto"
    default = layers._WEIGHT_CHUNK
    try:
        for name, chunk in (("w4_blocked_256k", 1 << 18), ("w4_blocked_64k", 1 << 16)):
            layers._WEIGHT_CHUNK = chunk
            row[name] = timed(lambda: layer(x), reps) / fp
    finally:
        layers._WEIGHT_CHUNK = default
    return row


def linear_row(m, k, n, reps):
    from tuneqdm.quant import QLinear

    x, w = torch.randn(m, k), torch.randn(n, k)
    q4 = QLinear.from_module(nn.Linear(k, n), 4)
    q4.configure_scales(1, True)
    q4.router = None
    c8 = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    s_out, s_in = torch.rand(n), torch.rand(k)
    buf = torch.empty(n, k)

    def int_path():
        xq, sx = quantize_rows(x * s_in)
        return torch._int_mm(xq, c8.t()) * sx * s_out

    def int8_weight_only():
        torch.mul(c8, s_in, out=buf).mul_(s_out[:, None])
        return F.linear(x, buf)

    with torch.no_grad():
        fp = timed(lambda: F.linear(x, w), reps)
        return {"shape": f"linear M={m} K={k} N={n}", "fp32_ms": round(fp * 1e3, 2),
                "int_mm": timed(int_path, reps) / fp,
                "weight_only_ref": timed(lambda: q4(x), reps) / fp,
                "weight_only_int8": timed(int8_weight_only, reps) / fp, **library_rows(q4, x, reps, fp)}


def unfold_int8(xq, k=3):
    """im2col of an int8 NHWC tensor (padding 1, stride 1): (B*H*W, k*k*C), tap-major."""
    b, h, w, c = xq.shape
    padded = F.pad(xq.permute(0, 3, 1, 2).float(), (1, 1, 1, 1)).to(torch.int8).permute(0, 2, 3, 1)  # small
    cols = torch.empty(b, h, w, k * k, c, dtype=torch.int8)
    for i in range(k):
        for j in range(k):
            cols[:, :, :, i * k + j] = padded[:, i:i + h, j:j + w]
    return cols.view(b * h * w, k * k * c)


def conv_row(c, side, reps):
    from tuneqdm.quant import QConv2d

    x = torch.randn(2, c, side, side)
    conv = nn.Conv2d(c, c, 3, padding=1)
    q4 = QConv2d.from_module(conv, 4)
    q4.configure_scales(1, True)
    c8 = torch.randint(-8, 8, (c, 9 * c), dtype=torch.int8)
    s_out = torch.rand(c)
    row = {"shape": f"conv3x3 {c}ch {side}x{side} (M={2 * side * side})"}
    with torch.no_grad():
        fp = timed(lambda: conv(x), reps)
        row["fp32_ms"] = round(fp * 1e3, 2)

        def int_unfold():
            xq, sx = quantize_rows(x.permute(0, 2, 3, 1).reshape(-1, c))
            y = torch._int_mm(unfold_int8(xq.view(2, side, side, c)), c8.t())
            return y * sx * s_out  # (per-tensor-per-token scale: approximate, timing only)

        row["int_mm_unfold"] = timed(int_unfold, reps) / fp
        row["int8_conv"] = int8_conv_time(x, conv, reps) / fp
        row["weight_only_ref"] = timed(lambda: q4(x), reps) / fp
        buf = torch.empty(c, c, 9)
        c8k = c8.view(c, c, 9)
        s_in = torch.rand(c)

        def int8_weight_only():
            torch.mul(c8k, (s_out[:, None] * s_in)[:, :, None], out=buf)
            return F.conv2d(x, buf.view(c, c, 3, 3), padding=1)

        row["weight_only_int8"] = timed(int8_weight_only, reps) / fp
        row.update(library_rows(q4, x, reps, fp))
    return row


def int8_conv_time(x, conv, reps):
    try:
        torch.backends.quantized.engine = "x86"
        qconv = torch.ao.nn.quantized.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
        qw = torch.quantize_per_channel(conv.weight.detach(), conv.weight.detach().abs().amax((1, 2, 3)) / 127,
                                        torch.zeros(conv.out_channels, dtype=torch.long), 0, torch.qint8)
        qconv.set_weight_bias(qw, conv.bias.detach())
        scale = float(x.abs().max()) / 127

        def run():
            return qconv(torch.quantize_per_tensor(x, scale, 128, torch.quint8)).dequantize()

        return timed(run, reps)
    except (RuntimeError, AttributeError) as e:
        print(f"int8 conv unavailable: {e}")
        return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu_time", action="store_true", help="time by process CPU time (a shared machine)")
    args = parser.parse_args()
    if args.cpu_time:
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [linear_row(*s, args.reps) for s in LINEAR_SHAPES] + [conv_row(*s, args.reps) for s in CONV_SHAPES]
    rows = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps,
              "clock": CLOCK[0].__name__, "load_average": os.getloadavg(), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
