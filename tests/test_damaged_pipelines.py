"""Damaged pipeline folders end in one line before any model loads (issue 31): a folder missing a tokenizer's
vocabulary made transformers build an empty tokenizer, and generate and train exited 0 having dropped every prompt
(Flux without tokenizer_2, SD3 without tokenizer_2/3, PixArt without tokenizer; Flux without its CLIP tokenizer
crashed instead)."""

import shutil

import pytest

from tuneqdm.cli import main

from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline,
            "pixart": tiny_pixart_pipeline}
CASES = [("sd", "tokenizer"), ("flux", "tokenizer"), ("flux", "tokenizer_2"), ("sd3", "tokenizer_2"),
         ("sd3", "tokenizer_3"), ("pixart", "tokenizer")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("family, tokenizer", CASES)
@pytest.mark.parametrize("how", ("folder", "vocabulary"))
@pytest.mark.parametrize("command", ("generate", "train"))
def test_a_missing_tokenizer_is_one_line_before_loading(family, tokenizer, how, command, folders, photos, tmp_path,
                                                        capsys):
    folder = tmp_path / family
    shutil.copytree(folders[family], folder)
    if how == "folder":
        shutil.rmtree(folder / tokenizer)
    else:  # the config left, the vocabulary gone
        (folder / tokenizer / "tokenizer.json").unlink()
    out = tmp_path / "out"
    argv = {"generate": ["generate", "--prompt", "a red dog", "--out", str(out)],
            "train": ["train", "--instance_data_dir", str(photos), "--instance_prompt", "a sks dog",
                      "--output_dir", str(out)]}[command]
    assert main([*argv, "--pretrained_model_name_or_path", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == (f"tuneqdm: error: the pipeline {folder} lacks the vocabulary of its {tokenizer} "
                   f"({folder / tokenizer} holds none of tokenizer.json, vocab.json, spiece.model, ...): without it "
                   "every prompt would be dropped; download or save the pipeline again\n")
    assert not out.exists()


@pytest.mark.parametrize("value", (float("nan"), float("inf")))
@pytest.mark.parametrize("family", ("sd", "flux"))
def test_a_checkpoint_with_a_non_finite_weight_is_refused_at_quantize_time_naming_it(value, family, folders, tmp_path,
                                                                                    capsys):
    """Before, one NaN streamed into a quantized base that every later command refused ("save the quantized base
    again", which cannot help)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / family
    shutil.copytree(folders[family], folder)
    component = "unet" if family == "sd" else "transformer"
    path = next((folder / component).glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.endswith(".weight") and tensors[k].dim() == 2)[0]
    tensors[name].view(-1)[5] = value
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "q"
    assert main(["quantize", "--pretrained_model_name_or_path", str(folder), "--calibrate", "minmax",
                 "--no-split_shortcuts", "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: {path}: tensor {name!r} holds NaN or infinite values, which "
                                       "no model could be built from: download the model again\n")
    assert not out.exists()


@pytest.fixture(scope="module")
def flux_base(folders, tmp_path_factory):
    """A quantized base of the tiny Flux transformer."""
    import tuneqdm
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folders["flux"] / "transformer")
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=4, init="minmax"))
    return tuneqdm.save_quantized(model, tmp_path_factory.mktemp("flux-w4") / "base")


@pytest.mark.parametrize("command", ("generate", "evaluate", "quantize-activations"))
def test_a_quantized_base_of_another_architecture_is_one_line(command, folders, flux_base, photos, tmp_path, capsys):
    argv = {"generate": ["generate", "--prompt", "a box"],
            "evaluate": ["evaluate", "--instance_data_dir", str(photos), "--class_word", "box", "--evaluator", "toy"],
            "quantize-activations": ["quantize-activations", "--calib_prompts", str(photos / "p.txt")]}[command]
    (photos / "p.txt").write_text("a box\n")
    out = tmp_path / "out"
    assert main([*argv, "--pretrained_model_name_or_path", str(folders["sd"]), "--quantized_base", str(flux_base),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: --quantized_base {flux_base} was made from another transformer than the "
                          "pipeline's (config differs in ") and err.endswith(
        "pass the quantized base of this model, or this base's own --pretrained_model_name_or_path\n"), err
    assert err.count("\n") == 1 and not out.exists()
