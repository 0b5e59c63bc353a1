"""DGQ activation quantization: grouping, per-step routing, quantizer error bounds, the attention processor,
calibration files and their one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tuneqdm
from tuneqdm.errors import TuneQDMError
from tuneqdm.ptq.activation_calibration import (calibrate_activations, folder_name, load_activations, read_prompts,
                                                save_activations)
from tuneqdm.ptq.activations import (CHANNEL, POSITION, ActivationConfig, ActivationObserver, ActivationQuantizer,
                                     LayerParams, fake_quantize, fit_grouping, input_ranges, kmeans, uniform_params)
from tuneqdm.ptq.attention import LOG_OCTAVES, QuantizedAttnProcessor, log_quantize, quantize_probabilities
from tuneqdm.sampling import generate
from tuneqdm.loading import pipeline_from

from tiny_models import tiny_unet
from tiny_pipelines import tiny_sd_pipeline


# ---- grouping ----------------------------------------------------------------------------------------------------
def _planted_conv_input(seed=0):
    """12 ordinary channels in about [-1, 1] and 4 outlier channels (3, 7, 10, 14) in about [-30, 40]; every pixel
    sees both kinds, so the channels are spread far more than the pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 16, 6, 6, generator=g) * 2 - 1
    outliers = [3, 7, 10, 14]
    x[:, outliers] = torch.rand(2, 4, 6, 6, generator=g) * 70 - 30
    return x, outliers


def test_kmeans_separates_two_channel_populations():
    x, outliers = _planted_conv_input()
    c_lo, c_hi, p_lo, p_hi = input_ranges(x, conv=True)
    grouping = fit_grouping(c_lo, c_hi, p_lo, p_hi, groups=2)
    assert grouping.dim == CHANNEL
    wide = grouping.labels[outliers[0]]
    assert [int(c) for c in torch.nonzero(grouping.labels == wide).flatten()] == outliers
    # each group's range is its members' range: the ordinary group is not stretched by the outliers
    narrow = 1 - wide
    assert float(grouping.hi[narrow] - grouping.lo[narrow]) < 2.0 < 60.0 < float(grouping.hi[wide] - grouping.lo[wide])
    # K = 1 is the layer-wise min-max range
    one = fit_grouping(c_lo, c_hi, p_lo, p_hi, groups=1)
    assert torch.equal(one.labels, torch.zeros(16, dtype=torch.long))
    assert (float(one.lo[0]), float(one.hi[0])) == (float(x.min()), float(x.max()))


def test_pixel_outliers_choose_the_position_dimension():
    x = torch.rand(3, 8, 5, 5) * 2 - 1
    x[:, :, 2, 3] *= 50  # one pixel is an outlier in every channel (a token-like outlier)
    grouping = fit_grouping(*input_ranges(x, conv=True), groups=2)
    assert grouping.dim == POSITION
    assert torch.nonzero(grouping.labels == grouping.labels[2 * 5 + 3]).flatten().tolist() == [2 * 5 + 3]


def test_kmeans_is_deterministic_and_handles_fewer_points_than_groups():
    pts = torch.tensor([[0.0, 1.0], [0.0, 1.1], [-5.0, 9.0]])
    assert torch.equal(kmeans(pts, 16), kmeans(pts, 16))
    labels = kmeans(pts, 16)
    assert labels[0] != labels[2] and labels[1] != labels[2]


# ---- quantizer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [6, 8])
def test_quantize_dequantize_error_is_at_most_half_a_step_inside_the_range(bits):
    lo = torch.tensor([-1.0, -0.1, 0.3, -40.0])
    hi = torch.tensor([1.0, 5.0, 0.9, 35.0])
    scale, zero = uniform_params(lo, hi, bits)
    u = torch.rand(4, 10_000)
    x = lo[:, None] + u * (hi - lo)[:, None]
    x[:, 0], x[:, 1] = lo, hi  # the ends of the range too
    err = (fake_quantize(x, scale[:, None], zero[:, None], bits) - x).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all())
    assert float(err.max()) > float(scale.min()) / 4  # it does quantize
    outside = fake_quantize(hi[:, None] + 10 * (hi - lo)[:, None], scale[:, None], zero[:, None], bits)
    assert bool((outside <= hi[:, None] + scale[:, None]).all())  # clamped to the top level


def test_log2_quantizer_is_exact_on_powers_of_two():
    delta = torch.tensor(0.5)
    p = delta * torch.exp2(-torch.arange(0, 64, dtype=torch.float32))
    assert torch.equal(log_quantize(p, delta, 6, octaves=None), p)
    assert torch.equal(log_quantize(torch.tensor([0.0, 0.5 * 2**-64]), delta, 6, octaves=None), torch.zeros(2))
    # between two levels: the nearer one in the log domain
    assert float(log_quantize(torch.tensor(0.5 * 2**-2.4), delta, 8, octaves=None)) == 0.5 * 2**-2


@pytest.mark.parametrize("bits", [6, 8])
def test_log_quantizer_spreads_its_levels_over_16_octaves(bits):
    delta, levels = torch.tensor(0.25), 2**bits - 1
    step = LOG_OCTAVES / levels
    codes = torch.arange(0, levels + 1, dtype=torch.float32)
    on_levels = delta * torch.exp2(-codes * step)
    assert torch.allclose(log_quantize(on_levels, delta, bits), on_levels, rtol=1e-6, atol=0)
    # inside the range the relative error is at most half a level: 2^(step / 2) - 1 (4.4 % at 8 bits, 9.2 % at 6)
    p = delta * torch.exp2(-torch.linspace(0, LOG_OCTAVES, 10_001))
    rel = (log_quantize(p, delta, bits) / p - 1).abs()
    assert float(rel.max()) <= 2 ** (step / 2) - 1 + 1e-6
    assert float(rel.max()) > 2 ** (step / 2) - 1 - 1e-3  # and that bound is reached
    log2_rel = (log_quantize(p, delta, bits, octaves=None) / p - 1).abs()
    assert float(log2_rel.max()) > 0.4  # one level per octave: up to sqrt(2) - 1
    # half a level below the last one, probabilities flush to 0
    tiny = delta * torch.exp2(torch.tensor([-LOG_OCTAVES - 0.51 * step, -LOG_OCTAVES - 0.49 * step]))
    out = log_quantize(tiny, delta, bits)
    assert float(out[0]) == 0.0 and float(out[1]) == float(on_levels[-1])


def test_start_token_untouched_and_left_out_of_the_scale():
    g = torch.Generator().manual_seed(0)
    batch, heads, queries, keys = 2, 3, 5, 7
    probs = torch.softmax(torch.randn(batch * heads, queries, keys, generator=g) * 3, dim=-1)
    probs[:, :, 0] += 5  # a dominant <start> token (not normalised: only its handling matters here)
    for mode in ("log", "log2"):
        out = quantize_probabilities(probs, 8, mode, batch, keep_start=True)
        assert torch.equal(out[..., 0], probs[..., 0])
        for b in range(batch):  # the largest non-start probability of each prompt is its scale: kept exactly
            rows = slice(b * heads, (b + 1) * heads)
            rest = probs[rows, :, 1:]
            i = torch.argmax(rest)
            assert out[rows, :, 1:].reshape(-1)[i] == rest.reshape(-1)[i]
        assert not torch.equal(out, probs)
    assert not torch.equal(quantize_probabilities(probs, 8, "log", batch, True),
                           quantize_probabilities(probs, 8, "log2", batch, True))
    uniform = quantize_probabilities(probs.clamp(0, 1), 6, "uniform", batch, keep_start=False)
    assert torch.equal(uniform * 63, torch.round(uniform * 63))


# ---- the attention processor -------------------------------------------------------------------------------------
def test_attention_processor_equals_diffusers_when_disabled():
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet().eval()
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.randn(2, 5, 32)
    with torch.no_grad():
        default = unet(x, t, emb).sample  # diffusers' default (SDPA) processor
        unet.set_attn_processor(AttnProcessor())
        reference = unet(x, t, emb).sample
        unet.set_attn_processor(QuantizedAttnProcessor(bits=None))
        ours = unet(x, t, emb).sample
        unet.set_attn_processor(QuantizedAttnProcessor(bits=6, mode="log"))
        quantized = unet(x, t, emb).sample
    assert torch.equal(ours, reference)
    assert torch.allclose(ours, default, atol=1e-5)
    assert not torch.allclose(quantized, reference, atol=1e-4)


# ---- per-step parameters -----------------------------------------------------------------------------------------
class _Timed(nn.Module):
    """A denoiser-shaped toy: one Linear, called as ``model(x, timestep)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        nn.init.eye_(self.proj.weight)

    def forward(self, x, timestep):
        return self.proj(x)


def _two_step_quantizer(bits=8):
    # step 0 (t = 900): range [-4, 4]; step 1 (t = 100): range [-1, 1]; channel grouping, one group
    params = LayerParams(conv=False, dims=torch.tensor([CHANNEL, CHANNEL], dtype=torch.int8),
                         channel_labels=torch.zeros(2, 4, dtype=torch.uint8),
                         position_labels=torch.zeros(2, 3, dtype=torch.uint8),
                         lo=torch.tensor([[-4.0], [-1.0]]), hi=torch.tensor([[4.0], [1.0]]))
    config = ActivationConfig(bits=bits, groups=1, attention="none", exclude=())
    return ActivationQuantizer(config, [900.0, 100.0], {"proj": params})


def test_per_step_parameters_are_selected_by_timestep():
    model = _Timed()
    q = _two_step_quantizer().install(model)
    x = torch.linspace(-0.9, 0.9, 24).reshape(2, 3, 4)

    def expected(lo, hi, rows):
        s, z = uniform_params(torch.tensor(lo), torch.tensor(hi), 8)
        return fake_quantize(rows, s, z, 8)

    with torch.no_grad():
        assert torch.equal(model(x, 870), expected(-4.0, 4.0, x))  # nearest calibrated timestep: 900
        assert q.steps == [0]
        assert torch.equal(model(x, torch.tensor(130)), expected(-1.0, 1.0, x))
        assert q.steps == [1]
        mixed = model(x, torch.tensor([999, 0]))  # per sample
        assert torch.equal(mixed[0], expected(-4.0, 4.0, x[0]))
        assert torch.equal(mixed[1], expected(-1.0, 1.0, x[1]))
        assert not torch.equal(expected(-4.0, 4.0, x), expected(-1.0, 1.0, x))
        q.enabled = False
        assert torch.equal(model(x, 870), x)
        q.remove()
        assert torch.equal(model(x, 870), x) and not model._forward_pre_hooks and not model.proj._forward_pre_hooks


def test_observer_fits_one_parameter_set_per_timestep_on_a_float_unet():
    unet = tiny_unet().eval()
    observer = ActivationObserver(unet)
    with torch.no_grad():
        for t in (800, 300):
            unet(torch.randn(2, 4, 16, 16), torch.tensor([t, t]), torch.randn(2, 5, 32))
    observer.remove()
    q = observer.fit(ActivationConfig(bits=8, groups=8))
    assert q.timesteps.tolist() == [800.0, 300.0]
    assert "conv_in" not in q.layers and "conv_out" not in q.layers and "down_blocks.0.resnets.0.conv1" in q.layers
    assert all(p.lo.shape == (2, 8) for p in q.layers.values())
    assert sum(q.dim_counts().values()) == 2 * len(q.layers)


# ---- calibration on a pipeline, files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w8_pipe(tmp_path_factory):
    pipe = pipeline_from(str(tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))))
    tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=8, method="peqa", experts=1, init="minmax"))
    return pipe


def _images(pipe):
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(pipe, "a red box", 2, 3, seed=3)])


def test_calibrate_save_load_round_trip(w8_pipe, tmp_path):
    q = calibrate_activations(w8_pipe, ["a red box", "a blue ball", "a box"], ActivationConfig(bits=8, groups=8),
                              num_inference_steps=3, batch_size=2)
    assert len(q.timesteps) == 3 and q.info["prompts"] == 3
    plain = _images(w8_pipe)
    q.install(w8_pipe.unet)
    try:
        quantized = _images(w8_pipe)
    finally:
        q.remove()
    assert np.abs(quantized - plain).mean() > 0.1
    folder = save_activations(q, tmp_path / folder_name(8, 8))
    assert sorted(p.name for p in folder.iterdir()) == ["activations.json", "activations.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    loaded = load_activations(folder, expect_fingerprint=tuneqdm.fingerprint(w8_pipe.unet))
    for name, p in q.layers.items():
        other = loaded.layers[name]
        for a, b in ((p.dims, other.dims), (p.channel_labels, other.channel_labels),
                     (p.position_labels, other.position_labels), (p.lo, other.lo), (p.hi, other.hi)):
            assert torch.equal(a, b)
    loaded.install(w8_pipe.unet)
    try:
        assert np.array_equal(_images(w8_pipe), quantized)
    finally:
        loaded.remove()
    assert np.array_equal(_images(w8_pipe), plain)  # removed: the pipeline is as before
    with pytest.raises(TuneQDMError) as e:
        load_activations(folder, expect_fingerprint="0123456789abcdef")
    assert str(e.value) == (f"activation parameters {folder} were calibrated on a model with fingerprint "
                            f"{tuneqdm.fingerprint(w8_pipe.unet)}, but this model's fingerprint is 0123456789abcdef: "
                            "calibrate them again")
    meta = json.loads((folder / "activations.json").read_text())
    meta["groups"] = 16
    (folder / "activations.json").write_text(json.dumps(meta))
    with pytest.raises(TuneQDMError, match="activations.json was changed after saving"):
        load_activations(folder)
    del meta["digests"]  # a folder written before digests: the shapes still tell
    (folder / "activations.json").write_text(json.dumps(meta))
    with pytest.raises(TuneQDMError, match="implies"):
        load_activations(folder)


def test_error_messages(tmp_path):
    for bad in (4, 7, 16):
        with pytest.raises(TuneQDMError) as e:
            ActivationConfig(bits=bad)
        assert str(e.value) == f"activation bits {bad} are not supported: choose 6 or 8"
    with pytest.raises(TuneQDMError) as e:
        ActivationConfig(groups=4)
    assert str(e.value) == "--groups 4 is not supported: choose 1, 2, 8 or 16"
    with pytest.raises(TuneQDMError) as e:
        ActivationConfig(attention="log10")
    assert str(e.value) == "attention quantization 'log10' is unknown: choose log, log2, uniform or none"
    with pytest.raises(TuneQDMError) as e:
        read_prompts(tmp_path / "none.txt")
    assert str(e.value) == (f"calibration prompts file {tmp_path / 'none.txt'} does not exist: pass a text file "
                            "with one prompt per line")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TuneQDMError) as e:
        read_prompts(tmp_path / "empty.txt")
    assert str(e.value) == f"--calib_prompts {tmp_path / 'empty.txt'} has no prompts: write one prompt per line"
    q = _two_step_quantizer()
    with pytest.raises(TuneQDMError) as e:
        q.install(nn.Sequential(nn.Linear(4, 4)))
    assert str(e.value) == ("the activation parameters do not match this model's layers (e.g. ['0', 'proj']): "
                            "calibrate them on this model")


# ---- the command line --------------------------------------------------------------------------------------------
def test_cli_quantize_activations_next_to_the_base_then_generate(w8_pipe, tmp_path, capsys):
    from tuneqdm.cli import main

    base_dir = tuneqdm.save_quantized(w8_pipe.unet, tmp_path / "w8", base_id=str(w8_pipe.name_or_path))
    (tmp_path / "prompts.txt").write_text("a red box\na blue ball\n")
    common = ["--calib_prompts", str(tmp_path / "prompts.txt"), "--num_inference_steps", "3"]
    assert main(["quantize-activations", "--quantized_base", str(base_dir), "--activation_bits", "8",
                 "--groups", "2", *common]) == 0
    folder = base_dir / "activations-a8-k2"
    meta = json.loads((folder / "activations.json").read_text())
    assert (meta["bits"], meta["groups"], meta["info"]["prompts"], len(meta["timesteps"])) == (8, 2, 2, 3)
    assert meta["info"]["fingerprint"] == json.loads((base_dir / "quantization.json").read_text())["fingerprint"]
    capsys.readouterr()
    args = ["generate", "--prompt", "a red box", "--num_images", "1", "--num_inference_steps", "3",
            "--quantized_base", str(base_dir)]
    assert main([*args, "--out", str(tmp_path / "a8"), "--activation_bits", "8", "--groups", "2"]) == 0
    assert "calibrating" not in capsys.readouterr().err  # found next to the base
    assert main([*args, "--out", str(tmp_path / "fp")]) == 0
    a8 = np.asarray(Image.open(tmp_path / "a8" / "000.png"), dtype=np.int16)
    fp = np.asarray(Image.open(tmp_path / "fp" / "000.png"), dtype=np.int16)
    assert np.abs(a8 - fp).mean() > 0.1
    assert json.loads((tmp_path / "a8" / "generate.json").read_text())["activation_bits"] == 8
    # A6 with the same groups reuses the A8 folder (groups and ranges do not depend on the bits)
    assert main([*args, "--out", str(tmp_path / "a6"), "--activation_bits", "6", "--groups", "2"]) == 0
    assert "calibrating" not in capsys.readouterr().err
    a6 = np.asarray(Image.open(tmp_path / "a6" / "000.png"), dtype=np.int16)
    assert np.abs(a6 - fp).mean() > np.abs(a8 - fp).mean()
    # K = 8 is not next to the base: calibrated on the fly from the prompts file
    assert main([*args, "--out", str(tmp_path / "k8"), "--activation_bits", "6", "--groups", "8", *common[:2]]) == 0
    assert "calibrating A6 K=8 activations on 2 prompts" in capsys.readouterr().err
    # one-line errors, nothing written
    assert main([*args, "--out", str(tmp_path / "bad"), "--activation_bits", "4"]) == 2
    assert capsys.readouterr().err == "tuneqdm: error: activation bits 4 are not supported: choose 6 or 8\n"
    assert main(["quantize-activations", "--quantized_base", str(base_dir), "--calib_prompts",
                 str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: calibration prompts file {tmp_path / 'missing.txt'} does "
                                       "not exist: pass a text file with one prompt per line\n")
    assert not (tmp_path / "bad").exists() and not (base_dir / "activations-a8-k16").exists()


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import tuneqdm.ptq.activation_calibration as calibration

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_activations(_two_step_quantizer(), tmp_path / "activations-a8-k1")
    assert list(tmp_path.iterdir()) == []


def test_pixel_groups_refuse_another_resolution():
    q = _two_step_quantizer()
    q.layers["proj"].dims[:] = POSITION  # groups over the 3 tokens the parameters were calibrated at
    model = _Timed()
    q.install(model)
    assert model(torch.zeros(2, 3, 4), 500).shape == (2, 3, 4)
    with pytest.raises(TuneQDMError) as e:
        model(torch.zeros(2, 5, 4), 500)
    assert str(e.value) == ("layer 'proj': activations were calibrated at 3 positions per sample, this input has 5: "
                            "calibrate at the resolution you sample at")
