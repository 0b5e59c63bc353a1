"""DGQ activation folders (`tuneqdm quantize-activations`) are checked like every other tuneqdm file (issue 31):
SHA-256 digests of every tensor and of the settings, the JSON schema, dtypes, shapes, group labels and finite ranges;
a calibration that produced NaN is refused before anything is written, and so is a non-finite --guidance_scale."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneqdm import TuneQDMError
from tuneqdm.cli import main
from tuneqdm.ptq.activation_calibration import CONFIG_FILE, TENSORS_FILE, load_activations, save_activations
from tuneqdm.ptq.activations import CHANNEL, POSITION, ActivationQuantizer, LayerParams
from tuneqdm.ptq.config import ActivationConfig


def _quantizer(lo=-4.0):
    params = {
        "proj": LayerParams(conv=False, dims=torch.tensor([CHANNEL, CHANNEL], dtype=torch.int8),
                            channel_labels=torch.tensor([[0, 1, 0, 1]] * 2, dtype=torch.uint8),
                            position_labels=torch.zeros(2, 0, dtype=torch.uint8),
                            lo=torch.tensor([[lo, -2.0], [-1.0, -0.5]]), hi=torch.tensor([[4.0, 2.0], [1.0, 0.5]])),
        "conv": LayerParams(conv=True, dims=torch.tensor([POSITION, CHANNEL], dtype=torch.int8),
                            channel_labels=torch.tensor([[0, 0, 0], [1, 0, 1]], dtype=torch.uint8),
                            position_labels=torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.uint8),
                            lo=torch.tensor([[-3.0, -1.0], [-1.0, -2.0]]), hi=torch.tensor([[3.0, 1.0], [1.0, 2.0]])),
    }
    config = ActivationConfig(bits=8, groups=2, attention="none", exclude=())
    return ActivationQuantizer(config, [900.0, 100.0], params, {"fingerprint": "f" * 16})


@pytest.fixture
def folder(tmp_path):
    return save_activations(_quantizer(), tmp_path / "activations-a8-k2")


def _edit_json(folder, edit, drop_digests=True):
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if drop_digests:
        meta.pop("digests")
    edit(meta)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))


def _edit_tensors(folder, edit):
    """A damaged tensor file in a folder written before digests existed (the digests dropped)."""
    tensors = load_file(folder / TENSORS_FILE)
    edit(tensors)
    save_file(tensors, folder / TENSORS_FILE)
    _edit_json(folder, lambda m: None)


def _refused(folder, match):
    with pytest.raises(TuneQDMError, match=match) as e:
        load_activations(folder)
    assert "\n" not in str(e.value)


def test_a_pristine_folder_loads_the_same_parameters(folder):
    q, loaded = _quantizer(), load_activations(folder)
    assert loaded.timesteps.tolist() == [900.0, 100.0] and set(loaded.layers) == set(q.layers)
    for name, p in q.layers.items():
        for part in ("dims", "channel_labels", "position_labels", "lo", "hi"):
            assert torch.equal(getattr(p, part), getattr(loaded.layers[name], part))
    assert "digests" in json.loads((folder / CONFIG_FILE).read_text())


def test_a_changed_value_is_refused_by_its_digest(folder):
    tensors = load_file(folder / TENSORS_FILE)
    tensors["proj.lo"][0, 0] = -4.5  # finite, ordered: only the digest can tell
    save_file(tensors, folder / TENSORS_FILE)
    _refused(folder, "tensor 'proj.lo' does not match its SHA-256 digest .*calibrate the activations again")
    _edit_json(folder, lambda m: None)  # without digests (an older folder) it loads
    assert load_activations(folder).layers["proj"].lo[0, 0] == -4.5


def test_edited_settings_are_refused(folder):
    _edit_json(folder, lambda m: m.update(timesteps=[800.0, 100.0]), drop_digests=False)
    _refused(folder, "activations.json was changed after saving")


def test_nan_ranges_are_refused_naming_the_layer(folder):
    _edit_tensors(folder, lambda t: t["conv.hi"].view(-1).__setitem__(1, float("nan")))
    _refused(folder, "layer 'conv' has NaN or infinite activation ranges: calibrate the activations again")


@pytest.mark.parametrize("edit, error", [
    (lambda m: m.pop("groups"), "lacks the key 'groups'"),
    (lambda m: m.update(groups="2"), "'groups' must be an integer"),
    (lambda m: m.update(groups=3), "--groups 3 is not supported"),
    (lambda m: m.update(timesteps=[]), "'timesteps' must be a non-empty list of finite numbers"),
    (lambda m: m.update(timesteps=[900.0, "x"]), "'timesteps' must be a non-empty list of finite numbers"),
    (lambda m: m.update(exclude="conv_in"), "'exclude' must be a list"),
    (lambda m: m["layers"].update(proj=[1]), r"activations.json \(layer 'proj'\) is not a JSON object"),
    (lambda m: m["layers"]["proj"].pop("channels"), "lacks the key 'channels'"),
    (lambda m: m["layers"]["proj"].update(kind="attention"), "layer 'proj' has kind 'attention'"),
    (lambda m: m["layers"]["proj"].update(channels=5), "tensor 'proj.channel_labels' is torch.uint8 of shape"),
    (lambda m: m["layers"].pop("conv"), "holds tensors its activations.json does not name"),
    (lambda m: m["layers"].update(extra=dict(m["layers"]["proj"])), "lacks 'extra.dims'"),
])
def test_settings_errors_are_one_line(folder, edit, error):
    _edit_json(folder, edit)
    _refused(folder, error)


@pytest.mark.parametrize("edit, error", [
    (lambda t: t["proj.channel_labels"].__setitem__((0, 0), 7), "'proj.channel_labels' names group 7 of 2"),
    (lambda t: t["conv.dims"].__setitem__(0, 5), "'conv.dims' holds a dimension other than"),
    (lambda t: t["proj.dims"].__setitem__(0, POSITION), "'proj.dims' holds a dimension other than"),
    (lambda t: t.__setitem__("proj.lo", t["proj.lo"].double()), "'proj.lo' is torch.float64"),
    (lambda t: t["proj.lo"].__setitem__((1, 0), 5.0), "layer 'proj' has a group whose lower bound exceeds"),
    (lambda t: t.pop("conv.position_labels"), "lacks 'conv.position_labels'"),
])
def test_tensor_errors_are_one_line(folder, edit, error):
    _edit_tensors(folder, edit)
    _refused(folder, error)


def test_a_truncated_tensor_file_is_one_line(folder):
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) - 5])
    _refused(folder, "is corrupt or truncated")


def test_saving_nan_ranges_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(TuneQDMError, match="cannot save the activation parameters: layer 'proj' has NaN or infinite "
                                           "activation ranges: the calibration produced NaN"):
        save_activations(_quantizer(lo=float("nan")), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, error", [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
    (["--guidance_scale", "inf"], "--guidance_scale must be a finite number, got inf"),
    (["--height", "-8"], "--height -8: give a positive multiple of 8"),
    (["--height", "13"], "--height 13: give a positive multiple of 8"),
    (["--max_sequence_length", "0"], "--max_sequence_length 0: give 1 to 512 T5 tokens"),
    (["--max_sequence_length", "100000"], "--max_sequence_length 100000: give 1 to 512 T5 tokens"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1, got 0"),
])
def test_quantize_activations_refuses_bad_sampling_settings_before_loading(flags, error, tmp_path, capsys):
    assert main(["quantize-activations", "--out", str(tmp_path / "a"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: {error}") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
