"""`train --activation_bits 8`: every quantized layer trains on int8 activations through integer matmuls. Its scale
gradients against the exact (float-activation) path, layer by layer and through a whole UNet; what the backward
keeps; gradient checkpointing on the integer path; the flag's one-line errors; byte-identical resume; `generate`
sampling the result on int8 activations by default."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import perturb_scales, tiny_unet
from torch import nn
from torch.nn.functional import cosine_similarity

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.files import json_digest
from tuneqdm.quant import kernels
from tuneqdm.quant.kernels import INT8, REFERENCE
from tuneqdm.quant.layers import INPUT_GRAD_CHOICES, U_KEPT_CHOICES, QuantizedLayer
from tuneqdm.quant.paths import DynamicActivations
from tuneqdm.train import TrainConfig, train
from tuneqdm.train import checkpoint as ckpt

LAYERS = {  # name -> (float layer, input shape): realistic row counts (77 text tokens, 8x8 pixels, 2 samples)
    "linear": (lambda: nn.Linear(64, 96), (2, 77, 64)),
    "conv1x1": (lambda: nn.Conv2d(64, 96, 1), (2, 64, 8, 8)),
    "conv3x3": (lambda: nn.Conv2d(64, 96, 3, padding=1), (2, 64, 8, 8)),
    "conv3x3s2": (lambda: nn.Conv2d(64, 96, 3, stride=2, padding=1), (2, 64, 8, 8)),
}


def _layer(kind, bits):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    model = nn.Sequential(make())
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=bits, method="mcsu", init="minmax"))
    perturb_scales(model, seed=1)
    layer = model[0]
    layer.bias.requires_grad_(True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x[..., 1] *= 8  # an outlier channel / column
    return layer, x


def _grads(layer, x, forward):
    """The gradients of x, s_out, s_in and the bias for a fixed upstream gradient."""
    x = x.clone().requires_grad_(True)
    y = forward(x)
    layer.zero_grad(set_to_none=True)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return y.detach(), {"x": x.grad, "s_out": layer.s_out[0].grad, "s_in": layer.s_in[0].grad, "bias": layer.bias.grad}


@pytest.mark.parametrize("input_grad", INPUT_GRAD_CHOICES)
@pytest.mark.parametrize("keep", U_KEPT_CHOICES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_scale_gradients_per_layer_match_the_exact_path(kind, bits, keep, input_grad):
    layer, x = _layer(kind, bits)
    y_ref, ref = _grads(layer, x, layer)
    layer.input_grad = input_grad
    s_out, s_in = layer.s_out[0], layer.s_in[0]
    y, got = _grads(layer, x, lambda x: layer._int8_train_forward(x, s_in, s_out, keep))
    # the forward is the sampling path's integer function of the same quantized input
    layer.input_quantizer = DynamicActivations()
    layer.kernels = "int8"
    with torch.no_grad():
        assert torch.allclose(y, layer(x), rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    assert layer.last_path == INT8
    for name in ref:
        cos = float(cosine_similarity(ref[name].flatten(), got[name].flatten(), dim=0))
        assert cos >= 0.99, (name, cos)  # measured: >= 0.9994 for the scales; x and bias 1.0 (straight-through)
    assert torch.allclose(got["x"], _input_grad_reference(layer, x, ref["x"]), rtol=1e-4, atol=1e-6)
    assert (y - y_ref).abs().max() > 0  # and the forward really was quantized


def _input_grad_reference(layer, x, exact):
    """What the int8 backward's g_x must be: the exact one (``input_grad="float"``, or a layer without the integer
    input gradient), else the float op applied to ``s_out ⊙ g_y`` rounded as the dynamic quantizer rounds it."""
    if layer.input_grad == "float" or kernels.input_grad_reason(layer) is not None:
        return exact
    g = layer(x.clone().requires_grad_(True))  # only its shape matters
    g_y = torch.randn(g.shape, generator=torch.Generator().manual_seed(5))
    view = (-1,) if layer.channel_dim == -1 else (-1, 1, 1)
    h = kernels.dynamic_fake_quantize(g_y * layer.s_out[0].detach().view(view), layer)
    s_in = layer.s_in[0].detach().view((1, -1) if layer.channel_dim == -1 else (1, -1, 1, 1))
    with torch.no_grad():
        return layer._op_input_grad(h, layer.centred_weight() * s_in, x.shape)


def _unet(bits=4):
    torch.manual_seed(0)
    unet = tiny_unet()
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=bits, method="tuneqdm", experts=2, init="minmax"))
    perturb_scales(unet, seed=1)
    g = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    enc = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    return unet, lambda: unet(x, torch.tensor([100, 900]), encoder_hidden_states=enc).sample


def _model_grads(unet, run):
    unet.zero_grad(set_to_none=True)
    run().square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_scale_gradients_through_a_whole_unet_match_the_exact_path():
    """Through a UNet the forward's rounding also moves every later layer's input; the gradients stay aligned. The
    layers that see one row per sample (time embedding) or four text tokens (cross-attention keys and values) average
    the least rounding noise: measured >= 0.983 there, >= 0.990 everywhere else."""
    unet, run = _unet()
    ref = _model_grads(unet, run)
    DynamicActivations().install(unet)
    got = _model_grads(unet, run)
    assert set(got) == set(ref) and len(ref) > 100
    few_rows = ("time_emb_proj", "attn2.to_k", "attn2.to_v")
    for name in ref:
        cos = float(cosine_similarity(ref[name].flatten(), got[name].flatten(), dim=0))
        assert cos >= (0.98 if any(f in name for f in few_rows) else 0.99), (name, cos)
    paths = {n: m.last_path for n, m in unet.named_modules() if isinstance(m, QuantizedLayer)}
    assert {n for n, p in paths.items() if p != INT8} == {"conv_in", "conv_out"}  # kept float, as sampling keeps them


def test_gradient_checkpointing_recomputes_on_the_integer_path():
    unet, run = _unet()
    DynamicActivations().install(unet)
    unet.train()
    plain = _model_grads(unet, run)
    unet.enable_gradient_checkpointing()
    calls = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(m.last_path))
               for m in unet.modules() if isinstance(m, QuantizedLayer)]
    checkpointed = _model_grads(unet, run)
    for h in handles:
        h.remove()
    assert checkpointed.keys() == plain.keys()
    assert all(torch.equal(checkpointed[n], plain[n]) for n in plain)  # the recompute took the same integer path
    per_pass = sum(isinstance(m, QuantizedLayer) for m in unet.modules())
    assert len(calls) > per_pass  # the blocks ran again inside the backward
    assert calls.count(REFERENCE) == 2 and calls.count(INT8) == len(calls) - 2  # conv_in, conv_out: not checkpointed


def test_layers_without_an_integer_path_train_on_float_activations(monkeypatch, capsys):
    """A grouped conv has no integer path; a build without the integer matmul says so once, then the exact path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 96, 3, padding=1, groups=4))
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=4, method="mcsu", init="minmax"))
    layer, x = model[0], torch.randn(2, 64, 8, 8)
    layer.bias.requires_grad_(True)
    _, ref = _grads(layer, x, layer)
    DynamicActivations(exclude=()).install(model)
    _, got = _grads(layer, x, layer)
    assert layer.last_path == REFERENCE and all(torch.equal(ref[n], got[n]) for n in ref)

    def missing(a, b):
        raise RuntimeError("_int_mm: no kernel for this device")

    monkeypatch.setattr(torch, "_int_mm", missing)
    monkeypatch.setattr(kernels, "_unavailable", set())
    layer, x = _layer("linear", 4)
    _, ref = _grads(layer, x, layer)
    DynamicActivations(exclude=()).install(nn.Sequential(layer))
    for _ in range(2):
        _, got = _grads(layer, x, layer)
        assert layer.last_path == REFERENCE and all(torch.equal(ref[n], got[n]) for n in ref)
    assert capsys.readouterr().err == ("tuneqdm: no integer matmul on cpu (_int_mm: no kernel for this device); "
                                       "using the reference path\n")


# ---- the flag --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 6, 32])
def test_activation_bits_other_than_8_or_16_are_one_line_errors(bits, capsys):
    message = (f"--activation_bits {bits} is not supported here: choose 8 (int8 activations, integer matmuls) or 16 "
               "(float activations)")
    with pytest.raises(TuneQDMError) as e:
        TrainConfig(instance_data_dir="photos", activation_bits=bits)
    assert str(e.value) == message
    assert main(["train", "--instance_data_dir", "photos", "--activation_bits", str(bits)]) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"


@pytest.mark.parametrize("method", ["fp", "lora"])
def test_activation_bits_8_needs_a_quantized_method(method, capsys):
    assert main(["train", "--instance_data_dir", "photos", "--method", method, "--activation_bits", "8"]) == 2
    assert capsys.readouterr().err == (
        f"tuneqdm: error: --activation_bits 8 applies to the quantized methods (peqa, tuneqdm, mcsu, tas, s1, qlora), "
        f"not --method {method}: use --activation_bits 16\n")
    TrainConfig(instance_data_dir="photos", method=method, activation_bits=16)  # float activations: fine


def _cfg(base, photos, out, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
                    output_dir=str(out), resolution=32, max_train_steps=4, checkpointing_steps=2, quiet=True,
                    quant_init="minmax", activation_bits=8)
    settings.update(kw)
    return TrainConfig(**settings)


def test_resume_with_the_flag_is_byte_identical_and_the_result_records_it(base, photos, tmp_path, capsys):
    train(_cfg(base, photos, tmp_path / "a"))
    reference = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    float_run = tmp_path / "float"
    train(_cfg(base, photos, float_run, activation_bits=16))
    assert (float_run / "adapter.safetensors").read_bytes() != reference  # the flag changes what trains

    def kill(trainer, step):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(_cfg(base, photos, tmp_path / "b"), callbacks=[kill])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2]
    with pytest.raises(TuneQDMError) as e:  # the checkpoint was trained in 8 bits: not resumed in float
        train(_cfg(base, photos, tmp_path / "b", activation_bits=16, resume_from_checkpoint="latest"))
    assert str(e.value) == (f"checkpoint {tmp_path / 'b' / 'checkpoints' / 'checkpoint-2'} was made with another "
                            "activation_bits (8; this run: 16): resume with the same settings, or start over with --force")
    train(_cfg(base, photos, tmp_path / "b", resume_from_checkpoint="latest"))
    assert (tmp_path / "b" / "adapter.safetensors").read_bytes() == reference

    # a checkpoint from before the flag existed (its identity has no activation_bits) resumes as the float run it was
    with pytest.raises(RuntimeError, match="killed"):
        train(_cfg(base, photos, tmp_path / "old", activation_bits=16), callbacks=[kill])
    state = tmp_path / "old" / "checkpoints" / "checkpoint-2" / ckpt.STATE_JSON
    meta = json.loads(state.read_text())
    del meta["identity"]["activation_bits"]
    meta["digests"][ckpt.STATE_JSON] = json_digest({k: v for k, v in meta.items() if k != "digests"})  # as written then
    state.write_text(json.dumps(meta))
    train(_cfg(base, photos, tmp_path / "old", activation_bits=16, resume_from_checkpoint="latest"))
    assert (tmp_path / "old" / "adapter.safetensors").read_bytes() == (float_run / "adapter.safetensors").read_bytes()
    for name in ("training.json", "adapter_config.json"):
        assert json.loads((tmp_path / "a" / name).read_text())["activation_bits"] == 8, name
    assert json.loads((float_run / "training.json").read_text())["activation_bits"] == 16

    # generate samples it on int8 activations by default (what it trained for), in float with --activation_bits 16
    args = ["generate", "--prompt", "a sks box", "--num_images", "1", "--num_inference_steps", "3", "--adapter",
            str(tmp_path / "a"), "--kernels", "int8"]

    def image(name, *extra):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
        meta = json.loads((tmp_path / name / "generate.json").read_text())
        return np.asarray(Image.open(tmp_path / name / "000.png"), dtype=np.int16), meta, capsys.readouterr().err

    a8, meta, err = image("a8")
    assert (meta["activation_bits"], meta["activation_quant"]) == (8, "dynamic")
    assert "kernels int8: 0 layers int8" not in err and " layers int8," in err
    a16, meta, err = image("a16", "--activation_bits", "16")
    assert meta["activation_bits"] == 16 and "kernels int8: 0 layers int8," in err
    assert np.abs(a8 - a16).mean() > 0.1  # the activations were quantized in one and not the other

    # evaluate samples it as generate does (same kernels, prompt and seed: the same image): on int8 activations
    # unless told --activation_bits 16
    from tuneqdm.commands.evaluate import EvaluateConfig, run_evaluate

    args.remove("--kernels"), args.remove("int8")
    generated = {8: image("a8-auto")[0], 16: image("a16-auto", "--activation_bits", "16")[0]}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\n")  # "a sks box", generate's prompt; prompt 0, image 0 takes generate's seed
    for bits in (None, 16):
        out = tmp_path / f"eval-{bits}"
        m = run_evaluate(EvaluateConfig(instance_data_dir=str(photos), adapter=str(tmp_path / "a"), prompts=str(prompts),
                                        token="sks", class_word="box", images_per_prompt=1, num_inference_steps=3,
                                        evaluator="toy", activation_bits=bits, out=str(out), quiet=True))
        assert m["activation_bits"] == (bits or 8)
        assert np.array_equal(np.asarray(Image.open(out / "images" / "000_0.png"), dtype=np.int16),
                              generated[bits or 8])
    assert not np.array_equal(generated[8], generated[16])


def test_qlora_and_peqa_train_with_the_flag(base, photos, tmp_path):
    for method in ("qlora", "peqa"):
        out = tmp_path / method
        train(_cfg(base, photos, out, method=method, max_train_steps=2))
        assert json.loads((out / "training.json").read_text())["activation_bits"] == 8
