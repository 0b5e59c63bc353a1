"""The fast sampling paths (tuneqdm.quant.kernels) against the reference path, layer by layer: integer matmuls for
quantized activations (dynamic, DGQ channel and position groups) within a stated tolerance, the int8 grid of
weight-only sampling bit-identical, and the fallbacks."""

import pytest
import torch
from tiny_models import perturb_scales
from torch import nn

import tuneqdm
from tuneqdm.ptq.activations import (
    CHANNEL,
    POSITION,
    ActivationConfig,
    ActivationQuantizer,
    DynamicActivations,
    LayerParams,
)
from tuneqdm.quant import kernels
from tuneqdm.quant.kernels import GRID, INT8, REFERENCE
from tuneqdm.quant.paths import kernel_report, sampling_kernels, set_kernels

# The integer path computes the same quantized function as the reference; only the float summation order differs
# (the reference sums fake-quantized floats, the integer path sums integers exactly, then scales once).
REL_TOL = 1e-5

LAYERS = {  # name -> (float layer, input shape)
    "linear": (lambda: nn.Linear(24, 40), (2, 6, 24)),
    "conv1x1": (lambda: nn.Conv2d(24, 40, 1), (2, 24, 5, 4)),
    "conv3x3": (lambda: nn.Conv2d(24, 40, 3, padding=1), (2, 24, 5, 4)),
    "grouped": (lambda: nn.Conv2d(24, 40, 3, padding=1, groups=4), (2, 24, 5, 4)),
    "conv3x3s2": (lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1), (2, 24, 5, 4)),
    "conv3x2dil": (lambda: nn.Conv2d(24, 40, (3, 2), padding=(2, 1), dilation=2), (2, 24, 5, 4)),
}


class Denoiser(nn.Module):
    """One layer called as a denoiser: ``model(x, timestep)``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, timestep):
        return self.layer(x)


def _model(kind, bits, method="tas", seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[kind]
    model = Denoiser(make())
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=bits, method=method, init="minmax"))
    perturb_scales(model, seed=seed + 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2))
    x[:, ..., 1] *= 8  # an outlier channel (Linear) / column: ranges differ across groups
    return model.eval(), x


def _run(model, x, mode, t=(900, 900)):
    set_kernels(model, mode)
    with torch.no_grad(), sampling_kernels(model, grid_bytes=2**20):
        y = model(x, torch.tensor(t))
    return y, model.layer.last_path


def _close(y, ref):
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < REL_TOL, f"relative error {err:.2e}"


def _dgq(model, x, dim, groups=4, seed=0):
    """A calibrated one-step DGQ quantizer for the model's layer, grouping ``dim`` with random labels."""
    conv = x.dim() == 4
    channels = x.shape[1] if conv else x.shape[-1]
    positions = x.shape[2:].numel() if conv else x.shape[1:-1].numel()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, groups - 1, (channels if dim == CHANNEL else positions,), generator=g, dtype=torch.uint8)
    labels[1] = groups - 1  # a group of one vector (DGQ isolates outliers): an integer matmul of depth 1
    lo, hi = -torch.rand(1, groups, generator=g) * 6 - 0.5, torch.rand(1, groups, generator=g) * 6 + 0.5
    params = LayerParams(conv, torch.tensor([dim], dtype=torch.int8),
                         labels[None] if dim == CHANNEL else torch.zeros(1, channels, dtype=torch.uint8),
                         labels[None] if dim == POSITION else torch.zeros(1, positions, dtype=torch.uint8), lo, hi)
    config = ActivationConfig(bits=8, groups=8, attention="none", exclude=())  # groups: only for fitting
    return ActivationQuantizer(config, [900.0], {"layer": params}).install(model)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("kind", "dim"), [("linear", CHANNEL), ("linear", POSITION), ("conv1x1", CHANNEL),
                                           ("conv1x1", POSITION), ("conv3x3", POSITION), ("conv3x3s2", POSITION),
                                           ("conv3x2dil", POSITION)])
def test_dgq_groups_take_the_integer_path_and_match_the_reference(kind, bits, dim):
    model, x = _model(kind, bits)
    _dgq(model, x, dim)
    ref, path = _run(model, x, "reference")
    assert path == REFERENCE
    y, path = _run(model, x, "int8")
    assert path == INT8
    _close(y, ref)


@pytest.mark.parametrize(("kind", "path"), [("conv3x3", INT8), ("linear", INT8), ("conv1x1", INT8),
                                            ("grouped", REFERENCE)])
def test_auto_on_cpu_takes_the_integer_path_for_dynamic_activations_into_large_layers(kind, path, monkeypatch):
    """Layers of at least CPU_AUTO_MIN_MACS multiply-adds (made tiny here) take the integer path; grouped convs never;
    smaller layers the simulated one."""
    model, x = _model(kind, 4, method="tuneqdm")
    DynamicActivations().install(model)
    ref, _ = _run(model, x, "reference")
    y, taken = _run(model, x, "auto")
    assert taken != INT8 and torch.equal(y, ref)  # below the threshold: the simulated path itself
    monkeypatch.setattr(kernels, "CPU_AUTO_MIN_MACS", x.numel() // x.shape[-1 if kind == "linear" else 1] * 40 * 24)
    y, taken = _run(model, x, "auto")
    assert (taken == INT8) == (path == INT8)  # the float path here rebuilds from the held grid: "int8-grid"
    _close(y, ref)


def test_dynamic_activations_into_a_kxk_conv_take_one_scale_per_sample():
    """A per-pixel scale would not factor out of the sum over kernel taps; one per sample does."""
    layer = _model("conv3x3", 4)[0].layer
    x = torch.randn(2, 24, 5, 4)
    x[1] *= 100  # the other sample's range must not matter
    xq = kernels.dynamic_fake_quantize(x, layer)
    for sample in range(2):
        steps = xq[sample] / (x[sample].abs().max() / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() == 127
    pointwise = _model("conv1x1", 4)[0].layer
    steps = kernels.dynamic_fake_quantize(x, pointwise) / (x.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # 1x1 convs: one per pixel, as Linear per token


def test_auto_takes_the_float_path_on_cpu_where_it_measured_faster():
    model, x = _model("linear", 4)
    _dgq(model, x, CHANNEL)
    ref, _ = _run(model, x, "reference")
    y, path = _run(model, x, "auto")
    assert path != INT8 and torch.equal(y, ref)  # float math (from the held int8 grid here): the same numbers


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3s2", "conv3x2dil"])
def test_dynamic_quantization_per_expert_with_s_in(kind, bits):
    """TuneQDM scales: two experts with different ``s_out`` and ``s_in``; samples at different timesteps."""
    model, x = _model(kind, bits, method="tuneqdm")
    DynamicActivations().install(model)
    for t in [(900, 900), (999, 10)]:
        ref, _ = _run(model, x, "reference", t)
        y, path = _run(model, x, "int8", t)
        assert path == INT8
        _close(y, ref)
    plain = model.layer
    plain.input_quantizer = None
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor((999, 10))), y, rtol=1e-3)  # activations are quantized


@pytest.mark.parametrize(("kind", "dim"), [("grouped", POSITION), ("conv3x3", CHANNEL)])
def test_grouped_convs_and_kxk_channel_groups_take_the_reference_for_that_layer_only(kind, dim):
    model, x = _model(kind, 4)
    _dgq(model, x, dim)
    ref, _ = _run(model, x, "reference")
    y, path = _run(model, x, "int8")
    assert path == GRID  # weight-only grid, activations simulated
    assert torch.equal(y, ref)


def test_calibrated_quantizer_with_s_in_takes_the_reference_path():
    model, x = _model("linear", 4, method="tuneqdm")
    _dgq(model, x, POSITION)
    ref, _ = _run(model, x, "reference")
    y, path = _run(model, x, "int8")
    assert path == GRID and torch.equal(y, ref)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_only_grid_is_bit_identical(kind, bits):
    model, x = _model(kind, bits, method="tuneqdm")
    for t in [(900, 900), (999, 10)]:
        ref, path = _run(model, x, "reference", t)
        assert path == REFERENCE
        y, path = _run(model, x, "int8", t)
        assert path == GRID and torch.equal(y, ref)
    assert model.layer.grid is None  # released after the sampling call


def test_grid_budget_leaves_layers_past_it_on_the_reference_path():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16))
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=4, method="peqa"))
    with torch.no_grad(), sampling_kernels(model, grid_bytes=8 * 16):
        with sampling_kernels(model):  # nested (as generate inside a caller's session): the outer budget serves
            model(torch.randn(3, 8))
        assert kernel_report(model) == {INT8: 0, GRID: 1, REFERENCE: 1}
        assert model[0].grid is not None
    assert model[0].grid is None


def test_unavailable_integer_matmul_falls_back_with_one_line(monkeypatch, capsys):
    def missing(a, b):
        raise RuntimeError("_int_mm: no kernel for this device")

    monkeypatch.setattr(torch, "_int_mm", missing)
    monkeypatch.setattr(kernels, "_unavailable", set())
    model, x = _model("linear", 8)
    DynamicActivations().install(model)
    ref, _ = _run(model, x, "reference")
    for _ in range(2):
        y, path = _run(model, x, "int8")
        assert path != INT8 and torch.equal(y, ref)  # float math (from the held int8 grid here): the same numbers
    err = capsys.readouterr().err
    assert err == ("tuneqdm: no integer matmul on cpu (_int_mm: no kernel for this device); "
                   "using the reference path\n")


def test_generate_kernels_flag_reports_paths_and_matches_the_reference(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from tiny_pipelines import tiny_sd_pipeline

    from tuneqdm.cli import main
    from tuneqdm.quant import QConv2d, QuantizedLayer
    from tuneqdm.loading import pipeline_from

    pipe = pipeline_from(str(tiny_sd_pipeline(tmp_path / "sd")))
    tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=4, method="peqa"))
    base = tuneqdm.save_quantized(pipe.unet, tmp_path / "base-w4", base_id=str(tmp_path / "sd"))
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedLayer)}
    integer = sum(not (isinstance(m, QConv2d) and m.groups > 1) and n not in ("conv_in", "conv_out")
                  for n, m in layers.items())
    args = ["generate", "--prompt", "a red box", "--num_images", "1", "--num_inference_steps", "3",
            "--quantized_base", str(base)]

    def image(name, *extra):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
        err = capsys.readouterr().err
        return np.asarray(Image.open(tmp_path / name / "000.png"), dtype=np.int16), err

    ref, err = image("w4-ref", "--kernels", "reference")
    assert f"kernels reference: 0 layers int8, 0 layers int8-grid, {len(layers)} layers reference" in err
    fast, err = image("w4", "--kernels", "auto")
    assert f"kernels auto: 0 layers int8, 0 layers int8-grid, {len(layers)} layers reference" in err
    assert np.array_equal(fast, ref)  # weight-only: no grid held by default (measured slower)
    # Images of the integer and the simulated path are not compared: on this tiny random UNet, dynamic quantization
    # is chaotic (a 1e-6 relative change of the input moves the reference output by about 3%, through rounding
    # flips), so the equivalence is asserted layer by layer above.
    a8, err = image("a8", "--activation_quant", "dynamic", "--kernels", "int8")
    assert f"kernels int8: {integer} layers int8, 0 layers int8-grid, {len(layers) - integer} layers reference" in err
    _, err = image("a8-auto", "--activation_quant", "dynamic")  # on CPU every layer of this tiny UNet is below
    assert f"kernels auto: 0 layers int8, 0 layers int8-grid, {len(layers)} layers reference" in err  # the MACs rule
    assert 0 < integer < len(layers)
    assert np.abs(a8 - ref).mean() > 0.1  # the activations are quantized
    assert main([*args, "--out", str(tmp_path / "bad"), "--activation_quant", "dynamic", "--activation_bits", "6"]) == 2
    assert capsys.readouterr().err == "tuneqdm: error: --activation_quant dynamic is 8-bit: drop --activation_bits 6\n"
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_integer_path_from_a_held_grid_equals_the_one_from_packed_codes(kind):
    """The centred int8 weight comes from the held grid when a sampling session holds one, else from the codes."""
    model, x = _model(kind, 4, method="tuneqdm")
    DynamicActivations().install(model)
    from_codes, path = _run(model, x, "int8")
    layer = model.layer
    layer.grid = kernels.signed_grid(layer).clone()
    with torch.no_grad():
        from_grid = model(x, torch.tensor((900, 900)))
    assert path == INT8 and layer.last_path == INT8 and torch.equal(from_grid, from_codes)
