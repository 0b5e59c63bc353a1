"""The Flux-size memory benchmark's builder (benchmarks/train_memory.py --model flux) on a tiny width: every Linear
becomes a quantized layer holding exactly the packed bytes its shape needs, no float weight is built, and the
training step reaches every trained scale; plus the public way it builds layers (set_packed, empty_quantized_)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

import tuneqdm
from tuneqdm.quant.layers import QLinear
from tuneqdm.quant.packing import pack
from tuneqdm.tuning.model import attach, empty_quantized_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_memory  # noqa: E402

TINY = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def float_linears(config: dict) -> dict[str, nn.Linear]:
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("bits, method, experts", [(4, "tuneqdm", 4), (2, "tuneqdm", 4), (4, "peqa", 1),
                                                   (8, "tuneqdm", 2)])
def test_synthetic_flux_holds_exactly_the_packed_bytes_of_its_linears(bits, method, experts):
    model = train_memory.synthetic_flux(TINY, method, bits, experts)
    linears = float_linears(TINY)
    layers = tuneqdm.quantized_layers(model)
    assert set(layers) == set(linears) and all(type(layer) is QLinear for layer in layers.values())
    per = 8 // bits
    expected = sum(math.ceil(m.weight.numel() / per) for m in linears.values())
    assert sum(layer.qweight.numel() * layer.qweight.element_size() for layer in layers.values()) == expected
    assert all(layer.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8) for layer in layers.values())
    # no float tensor of a weight's size anywhere: the only other tensors are 1-D (biases, norm weights)
    assert all(t.dim() == 1 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    scales = sum(m.out_features + (m.in_features if method == "tuneqdm" else 0) for m in linears.values())
    assert sum(p.numel() for p in tuneqdm.scale_parameters(model)) == experts * scales


def test_flux_step_trains_the_routed_expert_through_checkpointing():
    model = train_memory.synthetic_flux(TINY, "tuneqdm", 4, 4)
    model.enable_gradient_checkpointing()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(tuneqdm.scale_param_groups(model), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    inputs = train_memory.flux_inputs(TINY, 64, g)
    assert inputs["x0"].shape == (1, 16, 8) and inputs["img_ids"].shape == (16, 3)
    loss = train_memory.flux_step(model, opt, inputs, g)
    assert math.isfinite(loss)
    moved = {tuple(n.split(".")[-2:]) for n, p in model.named_parameters()
             if p.requires_grad and not torch.equal(p, before[n])}
    # batch 1: one expert (sigma's quarter of [0, 1]) moved, in s_out and s_in alike, in every layer
    assert len({k for _, k in moved}) == 1 and {kind for kind, _ in moved} == {"s_out", "s_in"}
    assert len([n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]) == (
        2 * len(tuneqdm.quantized_layers(model)))


def test_empty_quantized_filled_by_set_packed_equals_quantize_():
    torch.manual_seed(0)
    reference = tuneqdm.quantize_(FluxTransformer2DModel(**TINY), tuneqdm.QuantConfig(bits=4, init="minmax"))
    config = tuneqdm.QuantConfig(bits=4, init="minmax")
    with torch.device("meta"):
        model = FluxTransformer2DModel(**TINY)
    layers = empty_quantized_(model, config)
    assert all(layer.qweight.is_meta for layer in layers.values())
    ref_layers = tuneqdm.quantized_layers(reference)
    for name, layer in layers.items():
        ref = ref_layers[name]
        layer.set_packed(ref.qweight.clone(), ref.zero_point.clone(), ref.scale.clone())
    storage = {f"{name}.{leaf}" for name in layers for leaf in ("qweight", "zero_point", "scale")}
    rest = {n: t.clone() for n, t in reference.state_dict().items()
            if n not in storage and ".s_out." not in n and ".s_in." not in n}
    model.load_state_dict(rest, strict=False, assign=True)
    attach(model, config)
    assert tuneqdm.fingerprint(model) == tuneqdm.fingerprint(reference)
    g = torch.Generator().manual_seed(0)
    inputs = train_memory.flux_inputs(TINY, 64, g)
    kwargs = dict(hidden_states=inputs.pop("x0"), timestep=torch.tensor([0.3]), guidance=torch.tensor([3.5]), **inputs)
    with torch.no_grad():
        assert torch.equal(model(**kwargs).sample, reference(**kwargs).sample)


def test_set_packed_refuses_storage_of_the_wrong_size_or_type():
    layer = QLinear(6, 4, bits=4, device="meta")
    q = pack(torch.zeros(4, 6, dtype=torch.int8), 4)
    with pytest.raises(tuneqdm.TuneQDMError) as e:
        layer.set_packed(q[:-1], torch.zeros(4, dtype=torch.int8), torch.ones(4))
    assert str(e.value) == "qweight of a W4 layer of (4, 6) must be torch.uint8 of shape (12,), got torch.uint8 of (11,)"
    with pytest.raises(tuneqdm.TuneQDMError) as e:
        layer.set_packed(q, torch.zeros(4, dtype=torch.int32), torch.ones(4))
    assert str(e.value) == ("zero_point of a W4 layer of (4, 6) must be torch.int8 of shape (4,), "
                            "got torch.int32 of (4,)")
    with pytest.raises(tuneqdm.TuneQDMError) as e:
        layer.set_packed(q, torch.zeros(4, dtype=torch.int8), torch.ones(3))
    assert str(e.value) == "scale of a layer of (4, 6) must have shape (4,), got (3,)"
    layer.set_packed(q, torch.zeros(4, dtype=torch.int8), torch.ones(4, dtype=torch.float64))
    assert layer.qweight.device.type == "cpu" and layer.scale.dtype == torch.float32
