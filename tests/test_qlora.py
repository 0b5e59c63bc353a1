"""QLoRA on tuneqdm's quantized base and community LoRAs on a quantized model: PEFT's stock LoRA Linear wraps QLinear,
the gradients equal those of the dequantized float model, no float weight is kept for the backward, the result
reloads to the same outputs, and bad input fails in one line."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_unet

import tuneqdm
from tuneqdm.errors import TuneQDMError
from tuneqdm.quant.layers import QLinear
from tuneqdm.train import TrainConfig, train
from tuneqdm.train.methods import LORA_TARGETS, add_lora, check_lora_targets

pytest.importorskip("peft")


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, 32, generator=g))


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomise_lora_b(model, seed=3, std=0.05):
    """LoRA starts with B = 0 (a no-op); a non-zero B makes the adapter change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(lora_params(model).items()):
            if ".lora_B." in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


def quantized_unet(bits=4):
    unet = tiny_unet()
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=bits, method="peqa", init="minmax"))
    return unet


def test_qlinear_is_a_linear_without_a_float_weight():
    layer = quantized_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(layer, QLinear) and isinstance(layer, torch.nn.Linear)
    assert layer.weight is None and not any(p.dim() == 2 for p in layer.parameters())


def test_qlora_gradients_equal_the_dequantized_float_model_and_reach_only_lora():
    q = quantized_unet()
    f = tuneqdm.dequantize_(copy.deepcopy(q))  # float Linear/Conv2d holding exactly the quantized weights
    frozen = [t.detach().clone() for t in [*q.buffers(), *tuneqdm.scale_parameters(q)]]
    for m in (q, f):
        torch.manual_seed(7)
        add_lora(m, rank=4, targets=list(LORA_TARGETS))
    f.load_state_dict(q.state_dict(), strict=False)  # the same LoRA init in both (names agree: base_layer is hidden)
    randomise_lora_b(q)
    randomise_lora_b(f)
    x, t, e = unet_inputs()
    outs = []
    for m in (q, f):
        out = m(x, t, encoder_hidden_states=e).sample
        out.pow(2).mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    qp, fp = lora_params(q), lora_params(f)
    assert set(qp) == set(fp) and len(qp) == 64  # (A, B) x 4 targets x 2 attentions x 4 transformer blocks
    assert all(n.split(".")[-3] in ("lora_A", "lora_B") for n in qp)
    for n in qp:
        torch.testing.assert_close(qp[n].grad, fp[n].grad, rtol=1e-3, atol=1e-6)
    assert all(p.grad is None for n, p in q.named_parameters() if n not in qp)  # scales, biases: nothing
    torch.optim.AdamW(qp.values(), lr=1e-2).step()
    after = [*q.buffers(), *(p for layer in tuneqdm.quantized_layers(q).values() for p in layer.s_out)]
    assert len(after) == len(frozen) and all(map(torch.equal, after, frozen))  # integers and scales untouched


def saved_numels(model, *inputs):
    """Numel of every tensor autograd saves for the backward during one forward (what is held between them)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs).sum()
    return sizes


def test_qlora_layer_keeps_no_float_weight_for_the_backward():
    layer = QLinear.from_module(torch.nn.Linear(256, 256), bits=4)
    layer.configure_scales(1, train_s_in=False)
    from peft import LoraConfig, inject_adapter_in_model

    wrapper = torch.nn.Sequential()
    wrapper.add_module("to_q", layer)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), wrapper)
    x = torch.randn(3, 256, requires_grad=True)
    sizes = saved_numels(wrapper, x)
    # the input, A x, the LoRA matrices and scale vectors: nothing weight-sized (a rebuilt 256x256 float weight)
    assert sizes and max(sizes) <= 4 * 256 and sum(sizes) < 256 * 256 // 16


def test_qlora_step_holds_about_what_tuneqdm_holds():
    """What a training step keeps between forward and backward on a small UNet: qlora W4 (LoRA on the frozen base)
    against TuneQDM W4 (4 experts of scales), both with the memory-efficient backward."""
    x, t, e = unet_inputs()
    qlora = quantized_unet()
    add_lora(qlora, rank=4, targets=list(LORA_TARGETS))
    tq = tiny_unet()
    tuneqdm.quantize_(tq, tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=4, init="minmax"))
    held = {name: sum(saved_numels(lambda *a, m=m: m(a[0], a[1], encoder_hidden_states=a[2]).sample, x, t, e))
            for name, m in (("qlora", qlora), ("tuneqdm", tq))}
    assert held["qlora"] <= 1.1 * held["tuneqdm"], held


# ---- training and loading ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):
        a = (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def cfg(base, photos, out, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
                    output_dir=str(out), resolution=32, max_train_steps=3, checkpointing_steps=2, quiet=True,
                    quant_init="minmax", method="qlora", learning_rate=1e-2)
    settings.update(kw)
    return TrainConfig(**settings)


def test_qlora_trains_saves_and_reloads_to_the_same_outputs(base, photos, tmp_path):
    from tuneqdm.train import Trainer

    trainer = Trainer(cfg(base, photos, tmp_path / "out")).setup()
    trainer.run()
    out = tmp_path / "out"
    info = json.loads((out / "training.json").read_text())
    assert info["tuneqdm_method"] == "qlora" and info["base_fingerprint"] == tuneqdm.serialization.fingerprint(
        trainer.model)
    assert not (out / "adapter.safetensors").exists() and (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = tuneqdm.load_pipeline(adapter=out)
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer, QLinear)
    x, t, e = torch.randn(2, 4, 4, 4), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    trained = trainer.model.eval()
    with torch.no_grad():
        e = e[:, :, : trained.config.cross_attention_dim]
        a = trained(x, t, encoder_hidden_states=e).sample
        b = pipe.unet(x, t, encoder_hidden_states=e).sample
        untrained = tuneqdm.load_pipeline(base=str(base))
        tuneqdm.quantize_(untrained.unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
        c = untrained.unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().max() > 1e-4  # the LoRA moved (lr 1e-2, 3 steps) and the reload carries it


def test_qlora_resume_is_byte_identical(base, photos, tmp_path):
    train(cfg(base, photos, tmp_path / "a"))

    def kill(trainer, step):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train(cfg(base, photos, tmp_path / "b"), callbacks=[kill])
    train(cfg(base, photos, tmp_path / "b", resume_from_checkpoint="latest"))
    name = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_rank_zero_and_misplaced_targets_fail_in_one_line(base, photos, tmp_path):
    with pytest.raises(TuneQDMError, match=r"^--rank must be at least 1, got 0$"):
        cfg(base, photos, tmp_path, rank=0)
    with pytest.raises(TuneQDMError, match=r"^--lora_targets applies to --method lora or qlora, not tuneqdm$"):
        cfg(base, photos, tmp_path, method="tuneqdm", lora_targets="to_q")
    with pytest.raises(TuneQDMError, match=r"^--lora_targets ' , ' names no module"):
        cfg(base, photos, tmp_path, lora_targets=" , ")


def test_targets_that_match_no_module_or_a_quantized_conv_fail_in_one_line():
    unet = quantized_unet()
    with pytest.raises(TuneQDMError, match=r"^--lora_targets 'to_qq' matches no module of the UNet: give names"):
        check_lora_targets(unet, ["to_q", "to_qq"], quantized=True)
    with pytest.raises(TuneQDMError, match=r"^--lora_targets 'conv1' matches a quantized Conv2d \(.*conv1\): qlora "
                                           r"wraps Linear layers only$"):
        check_lora_targets(unet, ["conv1"], quantized=True)
    check_lora_targets(unet, ["to_q", "proj_in"], quantized=False)  # a float UNet: convs are fine for PEFT


def test_qlora_cli_rejects_a_target_that_matches_nothing(base, photos, tmp_path, capsys):
    from tuneqdm.cli import main

    argv = ["train", "--method", "qlora", "--pretrained_model_name_or_path", str(base), "--instance_data_dir",
            str(photos), "--instance_prompt", "a sks box", "--resolution", "32", "--max_train_steps", "1",
            "--quant_init", "minmax", "--output_dir", str(tmp_path / "o"), "--lora_targets", "to_q,nope", "--quiet"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tuneqdm: error: --lora_targets 'nope' matches no module of the UNet") and len(err) == 1


# ---- community LoRAs on a quantized model -------------------------------------------------------------------------
def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


def save_random_lora(unet, folder, std=0.3, seed=3):
    """A LoRA on ``unet`` (a float UNet, or one of another architecture) with a non-zero B, in diffusers' file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    add_lora(unet, rank=4, targets=list(LORA_TARGETS))
    randomise_lora_b(unet, seed=seed, std=std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def float_lora(base, tmp_path_factory):
    return save_random_lora(tuneqdm.load_pipeline(base=str(base)).unet, tmp_path_factory.mktemp("lora"))


def images(pipe, n=2):
    from tuneqdm.sampling import generate

    return generate(pipe, "a red box", num_images=n, num_inference_steps=4, seed=11)


def test_a_float_lora_on_the_w8_model_gives_the_float_model_with_it(base, float_lora):
    """PSNR of W8 + LoRA against fp32 + LoRA >= 40 dB (51.5 measured: the W8 rounding only), and 10 dB above W8
    without the LoRA (so the LoRA is really applied through the quantized layers)."""
    fp = tuneqdm.load_pipeline(base=str(base), lora=float_lora)
    w8 = tuneqdm.load_pipeline(base=str(base))
    tuneqdm.quantize_(w8.unet, tuneqdm.QuantConfig(bits=8, method="peqa", init="minmax"))
    plain = [np.asarray(i) for i in images(w8)]
    from tuneqdm.loading import add_lora_file

    add_lora_file(w8, float_lora)
    reference, with_lora = images(fp), images(w8)
    close = min(psnr(a, b) for a, b in zip(reference, with_lora))
    without = max(psnr(a, b) for a, b in zip(reference, plain))
    print(f"PSNR W8+LoRA vs fp+LoRA {close:.1f} dB; W8 without LoRA vs fp+LoRA {without:.1f} dB")
    assert close >= 40 and close >= without + 10, (close, without)


@pytest.fixture(scope="module")
def scales_adapter(base, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuneqdm")
    return train(cfg(base, photos, out, method="tuneqdm", max_train_steps=1, learning_rate=None, force=True))


def test_generate_composes_a_lora_with_a_tuneqdm_adapter(scales_adapter, float_lora, tmp_path):
    from tuneqdm.cli import main

    def run(name, *extra):
        argv = ["generate", "--adapter", str(scales_adapter), "--prompt", "a red box", "--num_images", "1",
                "--num_inference_steps", "3", "--out", str(tmp_path / name), *extra]
        assert main(argv) == 0
        return np.asarray(Image.open(tmp_path / name / "000.png"), dtype=np.float64)

    alone, off, on = run("alone"), run("off", "--lora", str(float_lora), "--lora_scale", "0"), run(
        "on", "--lora", str(float_lora))
    assert np.array_equal(alone, off)  # weight 0: the LoRA adds exactly nothing
    assert np.abs(alone - on).mean() > 1  # weight 1: it changes the images
    meta = json.loads((tmp_path / "on" / "generate.json").read_text())
    assert meta["lora"] == str(float_lora) and meta["lora_scale"] == 1.0


def test_bad_loras_fail_in_one_line(base, tmp_path, capsys):
    from tuneqdm.cli import main
    from tuneqdm.loading import add_lora_file

    other = save_random_lora(tiny_unet(block_out_channels=(16, 32), norm_num_groups=8), tmp_path)
    w8 = tuneqdm.load_pipeline(base=str(base))
    tuneqdm.quantize_(w8.unet, tuneqdm.QuantConfig(bits=8, method="peqa", init="minmax"))
    with pytest.raises(TuneQDMError, match=r"^--lora .* does not fit this model's UNet \(size mismatch for .*\): was "
                                           r"it made for another architecture\?$"):
        add_lora_file(w8, other)
    from safetensors.torch import save_file

    save_file({"text_model.foo.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "junk.safetensors")
    with pytest.raises(TuneQDMError, match=r"^--lora .*junk.safetensors has no LoRA weights for this model's UNet"):
        add_lora_file(w8, tmp_path / "junk.safetensors")
    with pytest.raises(TuneQDMError, match=r"^--lora .*missing.safetensors does not exist$"):
        add_lora_file(w8, tmp_path / "missing.safetensors")
    capsys.readouterr()  # the loading lines of the pipelines built above
    for bad in ("nan", "inf"):
        argv = ["generate", "--pretrained_model_name_or_path", str(base), "--prompt", "a box", "--lora",
                str(other), "--lora_scale", bad, "--out", str(tmp_path / bad)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tuneqdm: error: --lora_scale must be a finite number, got {float(bad)}"]
        assert not (tmp_path / bad).exists()


def test_fidelity_benchmark_runs_qlora_at_both_bit_widths(base, tmp_path):
    from tuneqdm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    out = tmp_path / "fid"
    assert main(["benchmark", "fidelity", "--pretrained_model_name_or_path", str(base), "--subjects", "0",
                 "--methods", "qlora", "--bits", "4", "8", "--max_train_steps", "1", "--images_per_prompt", "1",
                 "--num_inference_steps", "2", "--prompts", str(prompts), "--out", str(out)]) == 0
    rows = {(r["method"], r["bits"]): r for r in json.loads((out / "fidelity.json").read_text())["rows"]}
    assert set(rows) == {("qlora", 4), ("qlora", 8)}
    unet = tuneqdm.load_pipeline(base=str(base)).unet
    lora = add_lora(unet, rank=4, targets=list(LORA_TARGETS))
    assert all(r["trainable_params"] == sum(p.numel() for p in lora) for r in rows.values())
    assert all(r["learning_rate"] == 1e-4 for r in rows.values())  # diffusers' LoRA default, not a relative rate


def test_a_conv_lora_on_a_quantized_unet_says_which_conv_is_quantized(base, tmp_path, recwarn):
    """Before: a cut-off PEFT message ("... the following modules are supported: `torch.nn.Linear`, ...C)") blaming
    "another architecture", after a multi-line PEFT RuntimeWarning."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from tuneqdm.loading import add_lora_file

    unet = tuneqdm.load_pipeline(base=str(base)).unet
    add_lora(unet, rank=2, targets=["conv1", "to_q"])
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True)
    w4 = tuneqdm.load_pipeline(base=str(base))
    tuneqdm.quantize_(w4.unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    with pytest.raises(TuneQDMError) as e:
        add_lora_file(w4, tmp_path)
    assert str(e.value) == (f"--lora {tmp_path} adapts the Conv2d down_blocks.0.resnets.0.conv1, which is quantized "
                            "in this UNet: a LoRA on a quantized model wraps Linear layers only: use a LoRA of Linear "
                            "layers (e.g. --lora_targets to_q,to_k,to_v,to_out.0), or the float base (no --adapter of "
                            "a quantized method, no --quantized_base)")
    assert not [w for w in recwarn if "PEFT" in str(w.message)]
