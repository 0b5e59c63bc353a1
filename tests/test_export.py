"""`tuneqdm export`: LoRA files (diffusers, kohya) and merged checkpoints of scale adapters, loaded by diffusers' own
loaders; the per-step expert switch routes as tuneqdm's router does; one-line errors that leave nothing written."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.export.deltas import layer_delta, low_rank, route_weights
from tuneqdm.export.lora import KOHYA_ALPHA, export_lora
from tuneqdm.export.schedule import use_lora_experts
from tuneqdm.sampling import generate
from tuneqdm.serialization import read_adapter
from tuneqdm.tuning.model import quant_state
from tuneqdm.tuning.routing import expert_for_timestep

from tiny_models import perturb_scales, tiny_unet
from tiny_pipelines import tiny_flux_pipeline

LORA = "pytorch_lora_weights.safetensors"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.uint8) for i in images])


def _sample(pipe, steps=4) -> np.ndarray:
    return _pixels(generate(pipe, "a sks box", num_images=2, num_inference_steps=steps, seed=3))


def _adapter(base, out, method, bits=4, experts=None, intervals=(), component="unet", amount=0.3):
    """A scale adapter on disk for the pipeline folder ``base``: its denoiser quantized as ``load_pipeline`` does it,
    every expert's scales moved differently (so that a routing mistake shows), ``base_id`` the folder."""
    import diffusers

    cls = diffusers.UNet2DConditionModel if component == "unet" else diffusers.FluxTransformer2DModel
    model = cls.from_pretrained(base / component)
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=bits, method=method, experts=experts, init="mse",
                                                 intervals=intervals))
    perturb_scales(model, amount=amount)
    quant_state(model).base_id = str(base)
    return tuneqdm.save_adapter(model, out)


def _peft_deltas(model, adapter_name):
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(adapter_name).detach() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# ---- the delta and its factorization -------------------------------------------------------------------------------
def test_low_rank_keeps_the_asked_energy_and_caps_a_rank_at_the_full_rank():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    delta = (u[:, :5] * s) @ v.T
    energy = s.square() / s.square().sum()
    lr = low_rank(delta.float(), energy=0.9)  # 16/21.3 = 0.75 < 0.9 <= 20/21.3 = 0.94: rank 2
    assert lr.rank == 2 and lr.kept == pytest.approx(float(energy[:2].sum()))
    assert torch.allclose(lr.up @ lr.down, ((u[:, :2] * s[:2]) @ v[:, :2].T).float(), atol=1e-6)
    full = low_rank(delta.float(), rank=50)
    assert full.rank == 5 and full.kept == pytest.approx(1.0)
    assert torch.allclose(full.up @ full.down, delta.float(), atol=1e-6)
    assert low_rank(torch.zeros(3, 4), rank=2) is None


@pytest.mark.parametrize("method, experts, intervals", [("peqa", None, ()), ("mcsu", None, ()), ("tuneqdm", 3, ()),
                                                        ("tas", 2, ()), ("s1", None, ((0, 250),))])
def test_full_rank_lora_reproduces_every_expert_delta_and_the_blend(tmp_path, method, experts, intervals):
    unet = tiny_unet()
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method=method, experts=experts, intervals=intervals))
    perturb_scales(unet)
    cfg = read_adapter(tuneqdm.save_adapter(unet, tmp_path / "adapter"))[0]
    record = export_lora(unet, tmp_path / "lora", cfg, "unet", energy=1.0)
    weights = route_weights(cfg)
    expected = {LORA: weights if len(weights) > 1 else {0: 1.0}}
    expected.update({f"experts/{k}/{LORA}": {k: 1.0} for k in weights if k >= 0 and len(weights) > 1})
    assert sorted(record["files"]) == sorted(expected)
    layers = tuneqdm.quantized_layers(unet)
    for file, routes in expected.items():
        tensors = load_file(tmp_path / "lora" / file)
        assert len(tensors) == 2 * len(layers)
        for name, layer in layers.items():
            down, up = tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"]
            product = up.flatten(1) @ down.flatten(1)
            assert torch.allclose(product, layer_delta(layer, routes).flatten(1), atol=1e-5), (file, name)
        assert record["files"][file]["energy_kept"] == pytest.approx(1.0)
    if method == "s1":
        assert weights == {-1: 0.75, 0: 0.25}  # the tuned set serves timesteps 0-249 of 1000
    if method == "peqa":  # PEQA's delta is diag(s_out - s) (W_q - z)
        layer = layers["conv_in"]
        c = layer.centred_weight()
        direct = (layer.s_out[0] - layer.scale)[:, None, None, None] * c
        assert torch.allclose(layer_delta(layer, {0: 1.0}), direct, atol=1e-6)


# ---- diffusers' loaders --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mcsu(base, tmp_path_factory):
    return _adapter(base, tmp_path_factory.mktemp("mcsu") / "adapter", "mcsu", bits=8, amount=0.1)


def test_diffusers_and_kohya_files_load_in_diffusers_and_give_the_same_images(base, mcsu, tmp_path):
    for fmt in ("diffusers", "kohya"):
        assert main(["export", "--adapter", str(mcsu), "--to", "lora", "--format", fmt, "--energy", "1",
                     "--out", str(tmp_path / fmt), "--quiet"]) == 0
    kohya = load_file(tmp_path / "kohya" / LORA)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in kohya
    assert kohya["lora_unet_conv_in.lora_down.weight"].dim() == 4  # LoCon: a conv LoRA
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {KOHYA_ALPHA}
    tuned = tuneqdm.load_pipeline(adapter=mcsu)
    layers = tuneqdm.quantized_layers(tuned.unet)
    images = {}
    for fmt in ("diffusers", "kohya"):
        pipe = tuneqdm.load_pipeline(base)
        pipe.load_lora_weights(str(tmp_path / fmt), adapter_name="subject")
        deltas = _peft_deltas(pipe.unet, "subject")
        assert sorted(deltas) == sorted(layers)  # every quantized layer, convs included
        for name, d in deltas.items():
            assert torch.allclose(d, layer_delta(layers[name], {0: 1.0}), atol=1e-5), (fmt, name)
        images[fmt] = _sample(pipe)
    assert psnr(images["diffusers"], images["kohya"]) >= 40
    # float base + LoRA = W_float + delta: off tuneqdm's own images by the quantization error W_float - W_base ...
    own = _sample(tuned)
    # ... while the dequantized base + LoRA is W_base + delta = W_tuned: tuneqdm's own images
    assert main(["export", "--adapter", str(mcsu), "--to", "checkpoint", "--expert", "base", "--out",
                 str(tmp_path / "base"), "--quiet"]) == 0
    from diffusers import UNet2DConditionModel

    pipe = tuneqdm.load_pipeline(base)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    assert psnr(_sample(pipe), own) >= 40
    assert psnr(images["diffusers"], own) < psnr(_sample(pipe), own)


def test_merged_checkpoint_reproduces_tuneqdm_generate_and_reads_back_from_one_file(base, mcsu, tmp_path):
    from diffusers import UNet2DConditionModel

    own = _sample(tuneqdm.load_pipeline(adapter=mcsu))
    assert main(["export", "--adapter", str(mcsu), "--to", "checkpoint", "--single_file", "--out",
                 str(tmp_path / "ckpt"), "--quiet"]) == 0
    folder = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt")
    pipe = tuneqdm.load_pipeline(base)
    pipe.unet = folder
    assert psnr(_sample(pipe), own) >= 35
    one = UNet2DConditionModel.from_single_file(str(tmp_path / "ckpt" / "unet.safetensors"), config=str(base),
                                                subfolder="unet")
    a, b = folder.state_dict(), one.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(tmp_path / "ckpt" / "unet.safetensors", "pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())
    record = json.loads((tmp_path / "ckpt" / "tuneqdm_export.json").read_text())
    assert record["weights"] == {"0": 1.0} and record["method"] == "mcsu"


# ---- timestep experts ----------------------------------------------------------------------------------------------
def test_expert_switch_routes_each_step_as_tuneqdm_does(base, tmp_path):
    from diffusers import UNet2DConditionModel

    adapter = _adapter(base, tmp_path / "adapter", "tuneqdm", bits=8, experts=4)
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--energy", "1", "--out",
                 str(tmp_path / "lora"), "--quiet"]) == 0
    assert main(["export", "--adapter", str(adapter), "--to", "checkpoint", "--expert", "base", "--out",
                 str(tmp_path / "base"), "--quiet"]) == 0
    record = json.loads((tmp_path / "lora" / "lora_export.json").read_text())
    runs = record["schedule"]["steps"]["runs"]
    assert [r["route"] for r in runs] == [3, 2, 1, 0]
    own = _sample(tuneqdm.load_pipeline(adapter=adapter), steps=8)
    pipe = tuneqdm.load_pipeline(base)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "base")
    handle = use_lora_experts(pipe, tmp_path / "lora")
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((int(expert_for_timestep(kwargs.get("timestep", args[1] if len(args) > 1
                                                                                else None), 4, 1000)[0]),
                                             pipe.unet.active_adapters())), with_kwargs=True)
    switched = _sample(pipe, steps=8)
    assert seen and all(active == [f"tuneqdm_expert_{k}"] for k, active in seen)
    assert {k for k, _ in seen} == {0, 1, 2, 3}
    assert psnr(switched, own) >= 40
    handle.remove()
    pipe.set_adapters(["tuneqdm_expert_0"])  # one expert for every step: not what the adapter samples
    assert psnr(_sample(pipe, steps=8), own) < psnr(switched, own)


# ---- DiT -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


def test_flux_lora_loads_in_diffusers_and_routes_by_its_timestep_conversion(flux, tmp_path, capsys):
    adapter = _adapter(flux, tmp_path / "adapter", "tuneqdm", experts=2, component="transformer")
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--format", "kohya", "--out",
                 str(tmp_path / "k"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "tuneqdm: error: kohya LoRA keys name UNet modules (SD 1.x/2.x, SDXL); this is a transformer: use --format "
        "diffusers, whose transformer.* keys ComfyUI and diffusers both read\n")
    assert not (tmp_path / "k").exists()
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--energy", "1", "--out",
                 str(tmp_path / "lora"), "--quiet"]) == 0
    record = json.loads((tmp_path / "lora" / "lora_export.json").read_text())
    assert record["schedule"]["training_timestep"] == {"offset": 0.0, "scale": 1000.0}
    assert record["schedule"]["intervals"][0] == {"from": None, "to": 0.5, "route": 0}
    tuned = tuneqdm.load_pipeline(adapter=adapter)
    layers = tuneqdm.quantized_layers(tuned.transformer)
    pipe = tuneqdm.load_pipeline(flux)
    pipe.load_lora_weights(str(tmp_path / "lora" / "experts" / "1"), adapter_name="e1")
    deltas = _peft_deltas(pipe.transformer, "e1")
    assert sorted(deltas) == sorted(layers)
    assert all(torch.allclose(d, layer_delta(layers[n], {1: 1.0}), atol=1e-5) for n, d in deltas.items())
    from diffusers import FluxTransformer2DModel

    assert main(["export", "--adapter", str(adapter), "--to", "checkpoint", "--dtype", "bf16", "--out",
                 str(tmp_path / "ckpt"), "--quiet"]) == 0
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "ckpt")  # read back in float32
    assert {t.dtype for t in load_file(tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").values()} == \
        {torch.bfloat16}
    blend = {0: 0.5, 1: 0.5}  # the default for K experts: each weighted by the share of timesteps it serves
    for name, layer in layers.items():
        want = sum(w * layer.dequantized_weight(k) for k, w in blend.items()).to(torch.bfloat16).float()
        assert torch.equal(merged.get_submodule(name).weight, want), name
    with pytest.raises(tuneqdm.TuneQDMError, match="^--single_file writes the original"):
        main_args = ["export", "--adapter", str(adapter), "--to", "checkpoint", "--single_file", "--out",
                     str(tmp_path / "c")]
        from tuneqdm.cli import build_parser
        from tuneqdm.export.command import run_export

        run_export(build_parser().parse_args(main_args + ["--quiet"]))
    assert not (tmp_path / "c").exists()


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(base, mcsu, tmp_path, capsys):
    out = tmp_path / "out"

    def error(*extra):
        assert main(["export", "--adapter", str(mcsu), "--out", str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and not out.exists()
        return err.removeprefix("tuneqdm: error: ").rstrip("\n")

    assert error("--to", "lora", "--rank", "0") == \
        "--rank 0: give a positive integer (or --energy E to choose it per layer)"
    assert error("--to", "lora", "--rank", "5000") == (
        "--rank 5000 is larger than every layer of this model (the largest holds rank 128): give --rank 128 or less "
        "(each layer is capped at its own full rank)")
    assert error("--to", "lora", "--format", "comfy") == "unknown LoRA format 'comfy': choose diffusers or kohya"
    assert error("--to", "safetensors") == ("--to 'safetensors': choose lora (LoRA files), checkpoint (a merged model "
                                            "folder) or quantized (a quanto model folder)")
    assert error("--to", "lora", "--energy", "1.5") == \
        "--energy 1.5: give a fraction in (0, 1], e.g. 0.9 keeps 90 % of each delta's energy"
    assert error("--to", "checkpoint", "--expert", "3") == (
        "--expert 3: this adapter has experts 0..0; give one of them, 'blend' (every expert, weighted by the "
        "timesteps it serves) or 'base'")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--adapter", str(mcsu), "--to", "lora", "--out", str(out)]) == 2
    assert capsys.readouterr().err == \
        f"tuneqdm: error: output folder {out} is not empty: choose another --out or pass --force\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out.joinpath("keep.txt").unlink()
    out.rmdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in mcsu.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = bytearray((damaged / "adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (damaged / "adapter.safetensors").write_bytes(bytes(data))
    assert main(["export", "--adapter", str(damaged), "--to", "lora", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: {damaged}: tensor ") and "does not match its SHA-256 digest" in err
    assert err.count("\n") == 1 and not out.exists()


def test_kohya_file_of_an_sdxl_unet_reads_back_whole(tmp_path):
    from tiny_pipelines import tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline(tmp_path / "sdxl")
    adapter = _adapter(base, tmp_path / "adapter", "peqa")
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--format", "kohya", "--energy", "1", "--out",
                 str(tmp_path / "k"), "--quiet"]) == 0
    assert "lora_unet_label_emb_0_0.lora_down.weight" in load_file(tmp_path / "k" / LORA)  # add_embedding.linear_1
    layers = tuneqdm.quantized_layers(tuneqdm.load_pipeline(adapter=adapter).unet)
    pipe = tuneqdm.load_pipeline(base)
    pipe.load_lora_weights(str(tmp_path / "k"), adapter_name="k")
    deltas = _peft_deltas(pipe.unet, "k")
    assert sorted(deltas) == sorted(layers)
    assert all(torch.allclose(d, layer_delta(layers[n], {0: 1.0}), atol=1e-5) for n, d in deltas.items())


def test_s1_switch_runs_the_tuned_lora_inside_its_interval_only(base, tmp_path):
    adapter = _adapter(base, tmp_path / "adapter", "s1", intervals=((0, 500),))
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--out", str(tmp_path / "lora"),
                 "--quiet"]) == 0
    record = json.loads((tmp_path / "lora" / "lora_export.json").read_text())
    assert record["merged"]["weights"] == {"-1": 0.5, "0": 0.5}
    assert record["schedule"]["intervals"] == [{"from": 0.0, "to": 500.0, "route": 0}, {"rest": True, "route": -1}]
    pipe = tuneqdm.load_pipeline(base)
    use_lora_experts(pipe, tmp_path / "lora")
    seen = []
    pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((float(kwargs.get("timestep", args[1] if len(args) > 1 else None)),
                                                  any(not layer.disable_adapters for layer in m.modules()
                                                      if hasattr(layer, "lora_A")))), with_kwargs=True)
    _sample(pipe, steps=6)
    assert {on for t, on in seen if t < 500} == {True} and {on for t, on in seen if t >= 500} == {False}


def test_a_lora_result_is_copied_into_kohya_keys_with_the_same_deltas(base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tuneqdm.load_pipeline(base)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    result = tmp_path / "lora-result"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(result, unet_lora_layers=layers, safe_serialization=True)
    (result / "training.json").write_text(json.dumps({"tuneqdm_method": "lora", "base_id": str(base)}))
    original = _peft_deltas(pipe.unet, "default")
    assert main(["export", "--adapter", str(result), "--to", "lora", "--format", "kohya", "--out",
                 str(tmp_path / "k"), "--quiet"]) == 0
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "k" / LORA))
    fresh = tuneqdm.load_pipeline(base)
    fresh.load_lora_weights(str(tmp_path / "k"), adapter_name="k")
    copied = _peft_deltas(fresh.unet, "k")
    assert sorted(copied) == sorted(original)
    assert all(torch.allclose(copied[n], original[n], atol=1e-6) for n in original)


def test_the_documented_plain_diffusers_switch_runs_as_written_and_matches_use_lora_experts(base, tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    [snippet] = re.findall(r"^```python\n(.*?)^```", doc, flags=re.MULTILINE | re.DOTALL)
    first, rest = snippet.split("\n", 1)
    assert first.startswith("BASE, EXPORT = ")
    adapter = _adapter(base, tmp_path / "adapter", "tas", experts=2)
    assert main(["export", "--adapter", str(adapter), "--to", "lora", "--out", str(tmp_path / "lora"),
                 "--quiet"]) == 0
    namespace = {"BASE": str(base), "EXPORT": str(tmp_path / "lora")}
    exec(compile(rest, "docs/export.md python block", "exec"), namespace)
    pipe = tuneqdm.load_pipeline(base)
    use_lora_experts(pipe, tmp_path / "lora")
    expected = pipe("a sks dog on the beach", num_inference_steps=25,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(namespace["image"]), np.asarray(expected))
    plain = tuneqdm.load_pipeline(base)("a sks dog on the beach", num_inference_steps=25,
                                        generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(expected))


def test_quantized_export_keeps_tuneqdm_integers_bit_for_bit_through_diffusers_and_quanto(flux, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    adapter = _adapter(flux, tmp_path / "peqa", "peqa", component="transformer")
    assert main(["export", "--adapter", str(adapter), "--to", "quantized", "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    layers = tuneqdm.quantized_layers(tuneqdm.load_pipeline(adapter=adapter).transformer)
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "q")  # diffusers' own quanto loading
    for name, layer in layers.items():
        weight = model.get_submodule(name).weight
        assert type(weight).__name__ == "WeightQBitsTensor" and torch.equal(weight.dequantize(),
                                                                            layer.dequantized_weight(0)), name
    capsys.readouterr()
    mcsu = _adapter(flux, tmp_path / "mcsu", "mcsu", component="transformer")
    assert main(["export", "--adapter", str(mcsu), "--to", "quantized", "--out", str(tmp_path / "m"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuneqdm: error: --to quantized: this mcsu adapter scales the input channels of ")
    assert err.endswith("(s_in), which no per-row quantized format holds: use --to checkpoint or --to lora\n")
    assert not (tmp_path / "m").exists()


def test_a_fine_tuned_result_is_rewritten_as_a_checkpoint_and_refused_as_a_lora(base, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    result = tmp_path / "fp-result"
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(0.5)  # "fine-tuned"
    unet.save_pretrained(result / "unet")
    (result / "training.json").write_text(json.dumps({"tuneqdm_method": "fp", "base_id": str(base)}))
    assert main(["export", "--adapter", str(result), "--to", "lora", "--out", str(tmp_path / "l"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: {result} is a fine-tuned model (method fp), not a scale "
                                       "adapter: export it with --to checkpoint, without --expert\n")
    assert main(["export", "--adapter", str(result), "--to", "checkpoint", "--dtype", "fp16", "--single_file",
                 "--out", str(tmp_path / "c"), "--quiet"]) == 0
    back = UNet2DConditionModel.from_single_file(str(tmp_path / "c" / "unet.safetensors"), config=str(base),
                                                 subfolder="unet", torch_dtype=torch.float16)
    assert torch.equal(back.conv_in.weight, unet.conv_in.weight.half())
