"""Which quantized formats of other runtimes hold a personalized tuneqdm model exactly? Measured layer by layer.

    pip install gguf==0.19.0 optimum-quanto==0.2.7
    python benchmarks/export_quantized_formats.py runs/fid10/cells/peqa-w4/s0/run runs/fid10/cells/tuneqdm-w4/s0/run \\
        runs/export-ckpt/runs/peqa-w8-s0 runs/export-ckpt/runs/mcsu-w8-s0 --out runs/export-quantized.json

For every quantized layer and every expert of each adapter, the tuned weight ``Ŵ_k = diag(s_out) (W_q − z)
diag(s_in)`` is written into each candidate format *from tuneqdm's own integers* (no requantization) and read back
by that runtime's own dequantizer; a layer counts as held exactly when its integers go in unchanged and the values
that come back equal ``Ŵ_k`` (bit for bit, or to the reported relative error):

- GGUF Q4_1 (W4; blocks of 32 along a row: ``d·q + m`` with fp16 ``d``, ``m``; dequantized by ``gguf.quants``):
  ``q`` = tuneqdm's 4-bit codes, ``d = s_out``, ``m = −s_out·z`` — rows must be multiples of 32;
- GGUF Q8_0 (W8; ``d·q`` with int8 ``q``, fp16 ``d``, no offset): ``q = W_q − z`` must fit in [−128, 127];
- optimum-quanto qint4 (W4; ``(data − shift)·scale``, one group per row, float32 scale, integer shift; dequantized by
  quanto's ``QBitsDequantizer``) and qint8 (W8; symmetric ``data·scale``: ``W_q − z`` must fit int8).

No per-row format holds ``s_in`` (MCSU, TuneQDM: a scale per input column), so those layers count as not held.
Writes JSON: per adapter and format, layers held exactly, held with rounded scales, not held (and why), and the
largest relative error of the values that came back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def codes_and_zero(layer):
    """tuneqdm's unsigned codes (weight shape, flattened per row) and the code-space zero-point per row."""
    from tuneqdm.quant.packing import code_offset, unpack_codes

    codes = unpack_codes(layer.qweight, layer.bits, layer.weight_shape.numel()).reshape(layer.weight_shape[0], -1)
    zero = layer.zero_point.to(torch.int32) + code_offset(layer.bits)
    return codes.to(torch.int32), zero


def gguf_q4_1(codes, zero, s_out):
    import gguf

    rows, cols = codes.shape
    if cols % 32:
        return None, "row length not a multiple of 32"
    d = s_out.to(torch.float16)
    m = (-s_out * zero.float()).to(torch.float16)
    q = codes.reshape(rows, cols // 32, 32).to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).numpy()
    dm = np.stack([d.numpy(), m.numpy()], -1).view(np.uint8).reshape(rows, 1, 4).repeat(cols // 32, 1)
    blocks = np.concatenate([dm, packed], -1).reshape(rows, -1)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.asarray(back, dtype=np.float32)).reshape(rows, cols), None


def gguf_q8_0(codes, zero, s_out):
    import gguf

    rows, cols = codes.shape
    centred = codes - zero[:, None]
    if cols % 32:
        return None, "row length not a multiple of 32"
    if centred.min() < -128 or centred.max() > 127:
        return None, "W_q - z outside int8 (Q8_0 has no offset)"
    d = s_out.to(torch.float16).numpy().view(np.uint8).reshape(rows, 1, 2).repeat(cols // 32, 1)
    q = centred.to(torch.int8).reshape(rows, cols // 32, 32).numpy().view(np.uint8)
    blocks = np.concatenate([d, q], -1).reshape(rows, -1)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.asarray(back, dtype=np.float32)).reshape(rows, cols), None


def quanto(codes, zero, s_out, bits):
    from optimum.quanto import qint4, qint8
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    rows, cols = codes.shape
    scale = s_out.float()[:, None]
    if bits == 4:
        t = WeightQBitsTensor(qint4, 0, cols, codes.shape, codes.stride(), codes.to(torch.uint8), scale,
                              zero.to(torch.uint8)[:, None])
        return t.dequantize(), None
    centred = codes - zero[:, None]
    if centred.min() < -128 or centred.max() > 127:
        return None, "W_q - z outside int8 (qint8 is symmetric)"
    t = WeightQBytesTensor(qint8, 0, codes.shape, codes.stride(), centred.to(torch.int8), scale)
    return t.dequantize(), None


FORMATS = {"gguf-Q4_1": (4, gguf_q4_1), "gguf-Q8_0": (8, gguf_q8_0),
           "quanto-qint4": (4, lambda c, z, s: quanto(c, z, s, 4)), "quanto-qint8": (8, lambda c, z, s: quanto(c, z, s, 8))}


def measure(adapter: Path) -> dict:
    import tuneqdm

    pipe = tuneqdm.load_pipeline(adapter=adapter)
    layers = tuneqdm.quantized_layers(pipe.unet)
    bits = next(iter(layers.values())).bits
    out = {}
    for fmt, (fmt_bits, write) in FORMATS.items():
        if fmt_bits != bits:
            continue
        held, rounded, reasons, worst = 0, 0, {}, 0.0
        for layer in layers.values():
            codes, zero = codes_and_zero(layer)
            for k in range(layer.num_experts):
                if layer.trains_s_in and not bool((layer.s_in[k] == 1).all()):
                    reasons["s_in: a scale per input column"] = reasons.get("s_in: a scale per input column", 0) + 1
                    continue
                back, why = write(codes, zero, layer.s_out[k].detach())
                if back is None:
                    reasons[why] = reasons.get(why, 0) + 1
                    continue
                want = layer.dequantized_weight(k).reshape(codes.shape)
                err = float(((back - want).abs().max() / want.abs().max().clamp_min(1e-30)))
                worst = max(worst, err)
                held, rounded = (held + 1, rounded) if err == 0 else (held, rounded + 1)
        out[fmt] = {"exact": held, "integers_exact_scales_rounded": rounded, "not_held": reasons,
                    "max_relative_error": worst, "layer_experts": sum(l.num_experts for l in layers.values())}
    from tuneqdm.tuning.model import quant_state

    return {"bits": bits, "method": quant_state(pipe.unet).config.method, "formats": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapters", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from tuneqdm.progress import set_quiet

    set_quiet(True)
    result = {"command": " ".join(["python", "benchmarks/export_quantized_formats.py", *(argv or sys.argv[1:])]),
              "adapters": {str(a): measure(a) for a in args.adapters}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
