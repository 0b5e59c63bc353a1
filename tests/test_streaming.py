"""Streaming quantization (tuning.streaming): same model as quantize_ on the float model, never the float model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneqdm
from tuneqdm.errors import TuneQDMError
from tuneqdm.tuning.streaming import quantize_pretrained
from tiny_models import perturb_scales, tiny_sd3_transformer, tiny_unet


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8])


BUILDERS = {"unet": tiny_unet, "sd3": tiny_sd3_transformer, "flux": tiny_flux}


def _save(model, folder, shard="40KB", dtype=torch.bfloat16):
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_streamed_model_equals_quantize_of_the_loaded_float_model(tmp_path, arch, init):
    folder = _save(BUILDERS[arch](), tmp_path / "m")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    config = tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=2, init=init)
    cls = type(BUILDERS[arch]())
    want = tuneqdm.quantize_(cls.from_pretrained(folder, torch_dtype=torch.float32), config)
    got = quantize_pretrained(folder, config)
    mine, theirs = got.state_dict(), want.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert tuneqdm.fingerprint(got) == tuneqdm.fingerprint(want)


def test_streamed_sd3_routes_per_sample_like_quantize_(tmp_path):
    from test_diffusers import ARCHS

    folder = _save(tiny_sd3_transformer(), tmp_path / "m", dtype=torch.float32)
    got = quantize_pretrained(folder, bits=4, method="tuneqdm", experts=4, init="minmax")
    perturb_scales(got)
    call = ARCHS["sd3"][1]
    with torch.no_grad():
        both = call(got, 2, torch.tensor([50, 950]))()
        second = call(got, 2, torch.tensor([950, 950]))()
    torch.testing.assert_close(both[1], second[1], rtol=1e-4, atol=1e-5)


def test_single_file_and_saved_quantized_base_round_trip(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m", shard="10GB", dtype=torch.float32)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    model = quantize_pretrained(folder, bits=8, init="minmax")
    tuneqdm.save_quantized(model, tmp_path / "q")
    again = tuneqdm.load_quantized(tmp_path / "q")
    assert tuneqdm.fingerprint(again) == tuneqdm.fingerprint(model)


def _index(folder):
    return json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())


def test_a_missing_shard_is_one_line(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m")
    shard = sorted(set(_index(folder)["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(TuneQDMError, match=f"^shard {folder / shard} is missing: download the model again$"):
        quantize_pretrained(folder, bits=4)


def test_a_shard_that_does_not_match_its_index_is_one_line(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m")
    index = _index(folder)
    key, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(folder / shard)
    del tensors[key]
    save_file(tensors, folder / shard)
    with pytest.raises(TuneQDMError, match=rf"^shard {folder / shard} does not match .*index.json \(e.g. '{key}'\)"):
        quantize_pretrained(folder, bits=4)


def test_a_tensor_of_an_unreadable_dtype_is_one_line(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m")
    key, shard = next(iter(_index(folder)["weight_map"].items()))
    tensors = load_file(folder / shard)
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, folder / shard)
    with pytest.raises(TuneQDMError, match=rf"tensor '{key}' is torch.int32, not a float weight"):
        quantize_pretrained(folder, bits=4)


def test_a_class_outside_diffusers_is_refused_by_name(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "os.system"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TuneQDMError, match=r"^'os.system' is not a diffusers model class"):
        quantize_pretrained(folder, bits=4)


def test_a_folder_without_weights_or_config_is_one_line(tmp_path):
    folder = _save(tiny_unet(), tmp_path / "m")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TuneQDMError, match="holds no diffusion_pytorch_model.safetensors"):
        quantize_pretrained(empty, bits=4)
    (folder / "config.json").unlink()
    with pytest.raises(TuneQDMError, match="has no config.json"):
        quantize_pretrained(folder, bits=4)


def test_quantize_cli_streams_a_dit_folder_and_a_unet_without_splits(tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from tiny_pipelines import tiny_sd_pipeline
    from tuneqdm.cli import main

    flux = _save(tiny_flux(), tmp_path / "flux")
    assert main(["quantize", "--pretrained_model_name_or_path", str(flux), "--bits", "4", "--calibrate", "mse",
                 "--out", str(tmp_path / "qf")]) == 0
    meta = json.loads((tmp_path / "qf" / "quantization.json").read_text())
    assert meta["calibration"]["streamed_from"] == str(flux.resolve())
    want = quantize_pretrained(flux, bits=4, method="peqa", init="mse")
    assert tuneqdm.fingerprint(tuneqdm.load_quantized(tmp_path / "qf")) == tuneqdm.fingerprint(want)

    base = tiny_sd_pipeline(tmp_path / "sd")
    assert main(["quantize", "--pretrained_model_name_or_path", str(base), "--bits", "4", "--calibrate", "minmax",
                 "--no-split_shortcuts", "--out", str(tmp_path / "qu")]) == 0
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    want = tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    assert tuneqdm.fingerprint(tuneqdm.load_quantized(tmp_path / "qu")) == tuneqdm.fingerprint(want)
