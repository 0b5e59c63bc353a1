"""The personalized model kept quantized, in a format another runtime loads: optimum-quanto's, through diffusers.

What was measured (``benchmarks/export_quantized_formats.py``, docs/export.md): quanto's qint4/qint2 weight,
``(data − shift) · scale`` with an integer shift, holds a PEQA-style layer ``s_out ⊙ (W_q − z)`` bit for bit from
tuneqdm's own integers; no per-row format holds MCSU's ``s_in`` (a scale per input column), and quanto's qint8 (and
GGUF's Q8_0) are symmetric, which tuneqdm's asymmetric 8-bit grid does not fit. So this export takes adapters without
``s_in`` (peqa; one expert of tas) at 2 or 4 bits.

diffusers loads quanto models by ``from_pretrained`` (``quantization_config`` in config.json; Linear layers only, the
convs stay float). The export writes the model folder diffusers' quanto path writes, then puts tuneqdm's integers,
scales and zero-points into every quantized Linear (each row's scale repeated over quanto's groups of that row), and
reads the folder back with diffusers to check that every Linear gives ``Ŵ`` bit for bit before it is kept.
"""

from __future__ import annotations

import json
import tempfile

import torch

from ..errors import TuneQDMError
from ..files import FORMAT_VERSION, atomic_dir
from ..quant.layers import QLinear
from ..quant.packing import code_offset, unpack_codes
from ..tuning.model import quantized_layers
from ..tuning.routing import BASE
from .checkpoint import CHECKPOINT_JSON, expert_weights, merge_

QUANTO_BITS = {2: "int2", 4: "int4"}


def check_quantized(model, cfg: dict, weights: dict[int, float]) -> int:
    """The one route the export holds; one line for what quanto cannot hold exactly."""
    if cfg["bits"] not in QUANTO_BITS:
        raise TuneQDMError(f"--to quantized holds W2 and W4 exactly (quanto's qint2/qint4); this adapter is W{cfg['bits']}, "
                           "whose asymmetric grid quanto's symmetric qint8 does not hold: use --to checkpoint")
    if len(weights) != 1:
        raise TuneQDMError("--to quantized holds one expert's integers and scales, not a blend: pass --expert k")
    route = next(iter(weights))
    for name, layer in quantized_layers(model).items():
        if route != BASE and layer.trains_s_in and not bool((layer.s_in[route] == 1).all()):
            raise TuneQDMError(f"--to quantized: this {cfg['method']} adapter scales the input channels of {name} "
                               "(s_in), which no per-row quantized format holds: use --to checkpoint or --to lora")
    return route


def _codes(layer) -> tuple[torch.Tensor, torch.Tensor]:
    codes = unpack_codes(layer.qweight, layer.bits, layer.weight_shape.numel()).reshape(layer.weight_shape[0], -1)
    return codes.to(torch.uint8), (layer.zero_point.to(torch.int16) + code_offset(layer.bits)).to(torch.uint8)


def _quanto_weight(qlinear, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor):
    """A quanto weight of ``qlinear``'s layout holding tuneqdm's codes: one (scale, zero) per row, repeated over the
    row's groups."""
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    rows, cols = codes.shape
    groups = cols // qlinear.weight_group_size if qlinear.weight_group_size else 1
    data = codes.reshape(rows * groups, -1)
    return WeightQBitsTensor(qlinear.weight_qtype, 0, qlinear.weight_group_size, torch.Size((rows, cols)),
                             (cols, 1), data, scale.float().repeat_interleave(groups)[:, None],
                             zero.repeat_interleave(groups)[:, None])


@torch.no_grad()
def export_quantized(model, out, cfg: dict, expert=None, extra: dict | None = None) -> dict:
    """Write the adapter's model, quantized, as a diffusers model folder diffusers loads with optimum-quanto."""
    weights = expert_weights(cfg, expert)
    route = check_quantized(model, cfg, weights)
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise TuneQDMError("--to quantized writes optimum-quanto's format: pip install optimum-quanto") from None
    from diffusers import QuantoConfig

    linears = {}
    for name, layer in quantized_layers(model).items():
        if isinstance(layer, QLinear):
            s = layer.scale if route == BASE else layer.s_out[route].detach()
            linears[name] = (*_codes(layer), s.clone(), layer.dequantized_weight(route))
    merge_(model, weights)
    cls = type(model)
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as target:
        model.save_pretrained(tmp, safe_serialization=True)
        qmodel = cls.from_pretrained(tmp, quantization_config=QuantoConfig(weights_dtype=QUANTO_BITS[cfg["bits"]]))
        for name, (codes, zero, scale, _) in linears.items():
            qlinear = qmodel.get_submodule(name)
            qlinear.weight = torch.nn.Parameter(_quanto_weight(qlinear, codes, zero, scale), requires_grad=False)
        qmodel.save_pretrained(target, safe_serialization=True)
        back = cls.from_pretrained(target)
        for name, (*_, want) in linears.items():
            got = back.get_submodule(name).weight.dequantize()
            if not torch.equal(got, want):
                raise TuneQDMError(f"--to quantized: {name} does not read back bit for bit through diffusers and "
                                   "quanto: use --to checkpoint")
        record = {"format_version": FORMAT_VERSION, "kind": "quantized", "format": "quanto",
                  "weights_dtype": QUANTO_BITS[cfg["bits"]], "method": cfg["method"], "bits": cfg["bits"],
                  "base_id": cfg.get("base_id"), "base_fingerprint": cfg["base_fingerprint"],
                  "weights": {("base" if route == BASE else str(route)): 1.0}, "exact_linears": len(linears),
                  "float_layers": "every other layer (convs, norms, embeddings) in float32", **(extra or {})}
        (target / CHECKPOINT_JSON).write_text(json.dumps(record, indent=2))
    return record
