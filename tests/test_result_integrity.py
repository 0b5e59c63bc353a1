"""LoRA, QLoRA and fp results and training.json are checked as scale adapters are (issue 31): SHA-256 digests of
every weight tensor, of the fine-tuned denoiser's config and of training.json, NaN/inf weights refused, a truncated
file one line; before, a damaged result sampled black images with exit status 0 or ended in a traceback."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneqdm
from tuneqdm import TuneQDMError
from tuneqdm.cli import main
from tuneqdm.results import FP_UNET, LORA_WEIGHTS, TRAINING_JSON, check_result, read_training_json
from tuneqdm.train import TrainConfig, train


@pytest.fixture(scope="module")
def results(base, photos, tmp_path_factory):
    out = {}
    for method in ("lora", "qlora", "fp", "tuneqdm"):
        folder = tmp_path_factory.mktemp(method)
        train(TrainConfig(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), method=method,
                          instance_prompt="a sks box", output_dir=str(folder), resolution=32, max_train_steps=2,
                          quiet=True, quant_init="minmax", force=True))
        out[method] = folder
    return out


@pytest.fixture
def copy(results, tmp_path):
    def make(method):
        shutil.copytree(results[method], tmp_path / method)
        return tmp_path / method
    return make


def _weights(folder) -> "Path":
    return folder / LORA_WEIGHTS if (folder / LORA_WEIGHTS).is_file() else next((folder / FP_UNET).glob("*.safetensors"))


def _flip_bit(path, byte=3, bit=6):
    """Flip an exponent bit of the first value of the first tensor of a safetensors file."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    data[8 + n + header[name]["data_offsets"][0] + byte] ^= 1 << bit
    path.write_bytes(bytes(data))
    return name


def _edit_training(folder, edit, drop_digests=False):
    info = json.loads((folder / TRAINING_JSON).read_text())
    if drop_digests:
        info.pop("digests")
    edit(info)
    (folder / TRAINING_JSON).write_text(json.dumps(info))


def _refused(folder, match):
    with pytest.raises(TuneQDMError, match=match) as e:
        tuneqdm.load_pipeline(adapter=folder)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("method", ("lora", "qlora", "fp"))
def test_a_flipped_bit_in_a_result_is_refused_naming_the_tensor(method, copy):
    folder = copy(method)
    name = _flip_bit(_weights(folder))
    _refused(folder, f"tensor '{name}' does not match its SHA-256 digest .*train the adapter again")


@pytest.mark.parametrize("method", ("lora", "qlora", "fp"))
def test_nan_weights_are_refused_even_without_digests(method, copy):
    """100 damaged floats, in a result written before training.json held digests (or with them recomputed)."""
    folder = copy(method)
    path = _weights(folder)
    tensors = load_file(path)
    name = sorted(k for k, t in tensors.items() if t.numel() >= 100)[0]
    tensors[name].view(-1)[:100] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    _edit_training(folder, lambda i: None, drop_digests=True)
    _refused(folder, f"tensor '{name}' holds NaN or infinite values: train the adapter again")


@pytest.mark.parametrize("method", ("lora", "qlora", "fp"))
def test_a_truncated_result_is_one_line(method, copy):
    folder = copy(method)
    path = _weights(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(folder, "is corrupt or truncated .*train the adapter again")


@pytest.mark.parametrize("method", ("lora", "qlora", "fp", "tuneqdm"))
def test_an_edited_training_json_is_refused(method, copy):
    folder = copy(method)
    _edit_training(folder, lambda i: i.update(base_fingerprint="0" * 16, steps=10**9))
    _refused(folder, "training.json was changed after saving .*train the adapter again")


def test_a_training_json_of_wrong_types_is_one_line(copy, tmp_path, capsys):
    folder = copy("qlora")
    _edit_training(folder, lambda i: i.update(steps=1e9), drop_digests=True)
    _refused(folder, "'steps' must be an integer, not 1000000000.0: train the adapter again")
    _edit_training(folder, lambda i: i.update(steps=2, classes=[["box"]]))
    assert main(["generate", "--adapter", str(folder), "--prompt", "a sks <class>", "--out", str(tmp_path / "o"),
                 "--num_images", "1", "--num_inference_steps", "1"]) == 2
    assert capsys.readouterr().err.endswith("'classes' must be a list of strings: train the adapter again\n")


def test_an_edited_fine_tuned_config_is_refused(copy):
    folder = copy("fp")
    config = json.loads((folder / FP_UNET / "config.json").read_text())
    config["layers_per_block"] = 2  # "Cannot copy out of meta tensor" before
    (folder / FP_UNET / "config.json").write_text(json.dumps(config))
    _refused(folder, "unet/config.json was changed after saving .*train the adapter again")


def test_generate_with_a_damaged_qlora_result_fails_in_one_line_and_writes_nothing(copy, tmp_path, capsys):
    folder = copy("qlora")
    _flip_bit(_weights(folder))
    assert main(["generate", "--adapter", str(folder), "--prompt", "a box", "--num_images", "1",
                 "--num_inference_steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match its SHA-256 digest" in err, err
    assert not (tmp_path / "out").exists()


def test_pristine_results_load_and_record_every_tensor(results):
    for method, folder in results.items():
        kind, info = check_result(folder)
        assert read_training_json(folder) == info
        recorded = info["digests"]["tensors"]
        if kind == "scales":
            assert recorded == {}  # adapter_config.json holds the scales' digests
        else:
            assert set(recorded) == set(load_file(_weights(folder)))
            tuneqdm.load_pipeline(adapter=folder)


def test_the_writer_refuses_non_finite_weights(results, tmp_path):
    from tuneqdm.results import result_digests

    shutil.copytree(results["lora"], tmp_path / "r")
    tensors = load_file(tmp_path / "r" / LORA_WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, tmp_path / "r" / LORA_WEIGHTS)
    with pytest.raises(TuneQDMError, match=f"tensor '{name}' holds NaN or infinite values: the training diverged"):
        result_digests(tmp_path / "r", "lora", {})
