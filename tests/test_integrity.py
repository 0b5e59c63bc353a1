"""Damaged, edited or crafted files: digests, schemas, dtypes, shapes, scales and model classes are checked on load,
and every failure is one TuneQDMError line (issue 16: file integrity and security)."""

import json
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneqdm
from tuneqdm import QuantConfig, TuneQDMError
from tuneqdm.files import digests
from tuneqdm.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, QUANT_MAP, QUANT_WEIGHTS, read_adapter_config
from tuneqdm.train import checkpoint as ckpt
from tuneqdm.tuning.model import quant_state

from tiny_models import perturb_scales, tiny_unet


def small_unet():
    return tiny_unet(sample_size=8, block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=8, attention_head_dim=2,
                     norm_num_groups=4)


def _outputs(model):
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([100, 800]), emb).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    model = tuneqdm.quantize_(small_unet(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="mse"))
    perturb_scales(model)
    tuneqdm.save_quantized(model, root / "base", base_id="tiny")
    tuneqdm.save_adapter(model, root / "adapter")
    return root, _outputs(model)


@pytest.fixture
def files(saved, tmp_path):
    """Fresh copies of the saved quantized base and adapter: (base folder, adapter folder)."""
    for name in ("base", "adapter"):
        shutil.copytree(saved[0] / name, tmp_path / name)
    return tmp_path / "base", tmp_path / "adapter"


def _edit_json(path, edit, drop_digests=True):
    """Apply ``edit`` to a JSON file; ``drop_digests``: as a file written before tuneqdm stored digests."""
    obj = json.loads(path.read_text())
    if drop_digests:
        obj.pop("digests", None)
    obj = edit(obj) or obj
    path.write_text(json.dumps(obj))


def _edit_tensors(folder, tensors_file, json_file, edit):
    """Rewrite a safetensors file and record the new tensors' digests: a consistent file with bad contents."""
    tensors = load_file(folder / tensors_file)
    edit(tensors)
    save_file(tensors, folder / tensors_file)
    _edit_json(folder / json_file, lambda o: o["digests"].update(tensors=digests(tensors)["tensors"]), False)


def _flip_bit(path, name, byte=3, bit=6):
    """Flip one bit of tensor ``name`` in a safetensors file (default: an exponent bit of its first float32)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[start + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def _load(base, adapter, **kw):
    return tuneqdm.load_adapter(tuneqdm.load_quantized(base), adapter, **kw)


# ---- digests -----------------------------------------------------------------------------------------------------
def test_a_flipped_exponent_bit_in_an_adapter_is_refused_naming_the_tensor(files):
    base, adapter = files
    _flip_bit(adapter / ADAPTER_WEIGHTS, "conv_in")
    with pytest.raises(TuneQDMError, match=r"tensor 'conv_in' does not match its SHA-256 digest \(the file is "
                                           r"damaged\): save the adapter again") as e:
        _load(base, adapter)
    _one_line(e)


def test_a_flipped_bit_in_a_base_tensor_outside_the_fingerprint_is_refused(files):
    base, _ = files
    _flip_bit(base / QUANT_WEIGHTS, "conv_norm_out.weight")  # a float tensor: not part of the fingerprint
    with pytest.raises(TuneQDMError, match=r"tensor 'conv_norm_out.weight' does not match its SHA-256 digest"):
        tuneqdm.load_quantized(base)


def test_edited_settings_and_config_json_are_refused(files):
    base, adapter = files
    _edit_json(base / "config.json", lambda c: c.update(norm_eps=1e-2), drop_digests=False)  # loads, computes otherwise
    with pytest.raises(TuneQDMError, match=r"config.json was changed after saving \(it does not match its SHA-256"):
        tuneqdm.load_quantized(base)
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(num_train_timesteps=7), drop_digests=False)
    with pytest.raises(TuneQDMError, match=r"adapter_config.json was changed after saving"):
        tuneqdm.load_adapter(tuneqdm.quantize_(small_unet(), QuantConfig(bits=4, init="mse")), adapter)


def test_files_without_digests_load_the_same_model(files, saved):
    """Files written before digests existed are accepted (see tuneqdm.files.check_digests): same outputs."""
    base, adapter = files
    _edit_json(base / QUANT_MAP, lambda m: None)
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: None)
    torch.testing.assert_close(_outputs(_load(base, adapter)), saved[1], rtol=0, atol=0)


# ---- scales, dtypes, settings against tensors ---------------------------------------------------------------------
@pytest.mark.parametrize("value, error", [(float("nan"), "NaN or infinite scales"), (float("inf"), "NaN or infinite"),
                                          (0.0, "scales equal to 0")])
def test_non_finite_or_zero_scales_are_refused_naming_the_layer(files, value, error):
    base, adapter = files
    _edit_tensors(adapter, ADAPTER_WEIGHTS, ADAPTER_CONFIG, lambda t: t["conv_out"].view(-1)[5].fill_(value))
    with pytest.raises(TuneQDMError, match=rf"adapter .*: layer 'conv_out' has {error}"):
        _load(base, adapter)
    _edit_tensors(base, QUANT_WEIGHTS, QUANT_MAP, lambda t: t["conv_out.scale"].view(-1)[0].fill_(value))
    base_error = "tensor 'conv_out.scale' holds NaN|layer 'conv_out' has quantization scales <= 0"
    with pytest.raises(TuneQDMError, match=base_error):
        tuneqdm.load_quantized(base)


def test_a_negative_trained_scale_loads_but_a_negative_quantization_scale_does_not(files):
    """Training can move a small scale across zero (it flips that channel); the quantizer's scales are always > 0."""
    base, adapter = files
    _edit_tensors(adapter, ADAPTER_WEIGHTS, ADAPTER_CONFIG, lambda t: t["conv_out"].view(-1)[0].fill_(-1e-3))
    model = _load(base, adapter)
    assert tuneqdm.quantized_layers(model)["conv_out"].s_out[0][0].item() == pytest.approx(-1e-3)
    _edit_tensors(base, QUANT_WEIGHTS, QUANT_MAP, lambda t: t["conv_out.scale"].view(-1)[0].fill_(-1e-3))
    with pytest.raises(TuneQDMError, match="layer 'conv_out' has quantization scales <= 0"):
        tuneqdm.load_quantized(base)


def test_save_adapter_refuses_non_finite_scales(tmp_path):
    model = tuneqdm.quantize_(small_unet(), QuantConfig(bits=4, method="peqa", init="minmax"))
    with torch.no_grad():
        tuneqdm.quantized_layers(model)["conv_in"].s_out[0][1] = float("inf")
    with pytest.raises(TuneQDMError, match="cannot save the adapter: layer 'conv_in' has NaN or infinite scales"):
        tuneqdm.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float64])
def test_adapter_tensors_of_another_dtype_are_refused_not_cast(files, dtype):
    base, adapter = files
    _edit_tensors(adapter, ADAPTER_WEIGHTS, ADAPTER_CONFIG, lambda t: t.update(conv_in=t["conv_in"].to(dtype)))
    with pytest.raises(TuneQDMError, match=rf"tensor 'conv_in' is {dtype}, adapters hold float32"):
        _load(base, adapter)


def test_num_train_timesteps_must_be_what_the_adapter_was_trained_with(files, tmp_path):
    base, adapter = files
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(num_train_timesteps=1))
    with pytest.raises(TuneQDMError, match=r"adapter_config.json: experts=4 is more than the 1 training timesteps it "
                                           r"routes \(num_train_timesteps\)$"):
        _load(base, adapter)
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(num_train_timesteps=7))
    with pytest.raises(TuneQDMError, match="was trained with num_train_timesteps 7, but this scheduler uses 1000"):
        _load(base, adapter, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def sd_adapter(tmp_path_factory):
    """A tiny SD pipeline folder and a scale adapter of its UNet (T = 1000, as its scheduler), named by its path."""
    from diffusers import UNet2DConditionModel

    from tiny_pipelines import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    sd = tiny_sd_pipeline(root / "sd")
    unet = tuneqdm.quantize_(UNet2DConditionModel.from_pretrained(sd / "unet"),
                             QuantConfig(bits=4, method="tas", experts=2, init="minmax"))
    quant_state(unet).base_id = str(sd)
    tuneqdm.save_adapter(unet, root / "adapter")
    return sd, root / "adapter"


def test_load_pipeline_checks_the_adapters_timesteps_against_the_base_scheduler(sd_adapter, tmp_path):
    sd, adapter = sd_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    _edit_json(tmp_path / "adapter" / ADAPTER_CONFIG, lambda c: c.update(num_train_timesteps=7))
    with pytest.raises(TuneQDMError, match="trained with num_train_timesteps 7, but this scheduler uses 1000") as e:
        tuneqdm.load_pipeline(sd, adapter=tmp_path / "adapter")
    _one_line(e)


def test_generate_with_a_damaged_adapter_fails_in_one_line_and_writes_nothing(sd_adapter, tmp_path, capsys):
    from tuneqdm.cli import main

    _, adapter = sd_adapter
    shutil.copytree(adapter, tmp_path / "adapter")
    _flip_bit(tmp_path / "adapter" / ADAPTER_WEIGHTS, "conv_out")
    assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "a box", "--num_images", "1",
                 "--num_inference_steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor 'conv_out' does not match its SHA-256 digest" in err, err
    assert not (tmp_path / "out").exists()


def test_experts_are_checked_against_the_tensors_before_anything_is_allocated(files):
    base, adapter = files
    # experts: 100000 would be 9.5 GB of scales for SD 1.5
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(experts=100000, num_train_timesteps=10**6))
    with pytest.raises(TuneQDMError, match=r"has shape \(4, \d+\), its config implies one row per expert \(100000\)"):
        read_adapter_config(adapter)  # what load_pipeline reads before it quantizes the base
    _edit_json(adapter / ADAPTER_CONFIG, lambda c: c.update(experts=5))
    model = tuneqdm.configure_(tuneqdm.load_quantized(base), method="peqa", experts=1)
    with pytest.raises(TuneQDMError, match=r"one row per expert \(5\)"):
        tuneqdm.load_adapter(model, adapter)
    assert all(len(layer.s_out) == 1 for layer in tuneqdm.quantized_layers(model).values())  # model untouched


@pytest.mark.parametrize("edit, error", [
    (lambda c: [1, 2], "adapter_config.json is not a JSON object: save the adapter again"),
    (lambda c: c.pop("experts") and None, "adapter_config.json lacks the key 'experts'"),
    (lambda c: c.pop("base_fingerprint") and None, "lacks the key 'base_fingerprint'"),
    (lambda c: c.pop("intervals") and None, "lacks the key 'intervals'"),
    (lambda c: c.update(bits="4"), "'bits' must be an integer, not \"4\""),
    (lambda c: c.update(experts=True), "'experts' must be an integer, not true"),
    (lambda c: c.update(intervals="x"), "'intervals' must be a list"),
    (lambda c: c.update(intervals=[[1]]), "'intervals' must be a list of \\[start, end\\] integer pairs"),
    (lambda c: c.update(method=3), "'method' must be a string"),
    (lambda c: c.update(method="dreambooth"), "unknown method 'dreambooth'"),
    (lambda c: c.update(train_s_in=False), "'train_s_in' is False, method 'tuneqdm' implies True"),
    (lambda c: c.update(base_id=5), "'base_id' must be a string or null"),
])
def test_adapter_config_errors_are_one_line(files, edit, error):
    base, adapter = files
    _edit_json(adapter / ADAPTER_CONFIG, edit)
    with pytest.raises(TuneQDMError, match=error) as e:
        _load(base, adapter)
    _one_line(e)


# ---- quantized bases -----------------------------------------------------------------------------------------------
def test_quant_config_bits_must_match_the_layers(files):
    base, _ = files
    _edit_json(base / QUANT_MAP, lambda m: m["quant_config"].update(bits=8))
    with pytest.raises(TuneQDMError, match=r"layer '.*' is 4-bit but quant_config.bits is 8"):
        tuneqdm.load_quantized(base)


@pytest.mark.parametrize("damage, error", [
    ("shape", r"tensor 'conv_norm_out.weight' is torch.float32 \[4\], the model expects torch.float32 \[8\]"),
    ("dtype", r"tensor 'conv_in.qweight' is torch.int32 \[\d+\], the model expects torch.uint8"),
    ("type", r"layer 'conv_in' is a Conv2d, quantization.json says 'QFancy'"),
    ("layer_shape", r"layer 'conv_in' has weight shape \[8, 4, 3, 3\], quantization.json says \[9, 4, 3, 3\]"),
    ("no_config", "no quantized base at .*: config.json is missing"),
    ("config_value", r"config.json does not describe a UNet2DConditionModel \("),
])
def test_quantized_base_errors_are_one_line(files, damage, error):
    base, _ = files
    if damage in ("shape", "dtype"):
        _edit_json(base / QUANT_MAP, lambda m: None)
        tensors = load_file(base / QUANT_WEIGHTS)
        if damage == "shape":
            tensors["conv_norm_out.weight"] = tensors["conv_norm_out.weight"][:4].clone()
        else:
            tensors["conv_in.qweight"] = tensors["conv_in.qweight"].to(torch.int32)
        save_file(tensors, base / QUANT_WEIGHTS)
    elif damage == "type":
        _edit_json(base / QUANT_MAP, lambda m: m["layers"]["conv_in"].update(type="QFancy"))
    elif damage == "layer_shape":
        _edit_json(base / QUANT_MAP, lambda m: m["layers"]["conv_in"].update(shape=[9, 4, 3, 3]))
    elif damage == "no_config":
        (base / "config.json").unlink()
    else:
        _edit_json(base / QUANT_MAP, lambda m: None)
        _edit_json(base / "config.json", lambda c: c.update(block_out_channels="abc"))
    with pytest.raises(TuneQDMError, match=error) as e:
        tuneqdm.load_quantized(base)
    _one_line(e)


def test_model_class_is_looked_up_among_diffusers_exports_never_imported(files, tmp_path, monkeypatch):
    base, _ = files
    (tmp_path / "diffusers_evil.py").write_text("raise RuntimeError('diffusers_evil was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("diffusers_evil.UNet2DConditionModel", "diffusers.utils.os", "diffusers.__class__"):
        _edit_json(base / QUANT_MAP, lambda m, name=name: m.update(model_class=name))
        with pytest.raises(TuneQDMError, match=f"holds a {name}: pass an empty instance"):
            tuneqdm.load_quantized(base)
    assert "diffusers_evil" not in sys.modules
    _edit_json(base / QUANT_MAP, lambda m: m.update(model_class="diffusers.UNet2DConditionModel"))  # exported name
    assert type(tuneqdm.load_quantized(base)).__name__ == "UNet2DConditionModel"


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def _training():
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, get_scheduler("constant", optimizer)


@pytest.fixture
def checkpoint(tmp_path):
    model, optimizer, scheduler = _training()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return ckpt.save(tmp_path, 1, dict(model.named_parameters()), optimizer, scheduler, {"identity": {}})


@pytest.mark.parametrize("edit, error", [
    (lambda m: m.update(step="abc"), "'step' must be an integer, not \"abc\": resume from another checkpoint"),
    (lambda m: m.update(step=-2), "step or rng states are malformed"),
    (lambda m: m.pop("optimizer") and None, "lacks the key 'optimizer'"),
    (lambda m: m.pop("rng") and None, "lacks the key 'rng'"),
    (lambda m: m["rng"].pop("numpy") and None, r"state.json \(rng\) lacks the key 'numpy'"),
    (lambda m: m["rng"]["numpy"][1].__setitem__(0, -5), "the checkpoint's RNG state does not fit this run"),
    (lambda m: m["optimizer"].update(param_groups=[{"lr": 1}]), "the checkpoint's optimizer state does not fit"),
])
def test_checkpoint_errors_are_one_line(checkpoint, edit, error):
    _edit_json(checkpoint / ckpt.STATE_JSON, edit)
    with pytest.raises(TuneQDMError, match=error) as e:
        tensors, meta = ckpt.load(checkpoint)
        _, optimizer, scheduler = _training()
        ckpt.restore(tensors, meta, optimizer, scheduler)
    _one_line(e)


def test_damaged_or_edited_checkpoints_are_refused(checkpoint):
    meta = json.loads((checkpoint / ckpt.STATE_JSON).read_text())
    _edit_json(checkpoint / ckpt.STATE_JSON, lambda m: m["lr_scheduler"].update(base_lrs=[1.0]), drop_digests=False)
    with pytest.raises(TuneQDMError, match=r"state.json was changed after saving"):
        ckpt.load(checkpoint)
    (checkpoint / ckpt.STATE_JSON).write_text(json.dumps(meta))
    _flip_bit(checkpoint / ckpt.STATE_TENSORS, "model.weight")
    with pytest.raises(TuneQDMError, match=r"tensor 'model.weight' does not match its SHA-256 digest"):
        ckpt.load(checkpoint)
