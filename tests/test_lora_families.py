"""LoRA and QLoRA on every pipeline family that diffusers has a LoRA loader for (SD's UNet, Flux, SD3): each trains,
its result generates through the CLI, and its LoRA file adds on top of a quantized denoiser with --lora (issue 31:
diffusers' Flux loader reads ``module.weight.data`` of every Linear, which a tuneqdm-quantized layer does not have)."""

import json

import numpy as np
import pytest
from PIL import Image

from tuneqdm.cli import main

from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
T5 = {"sd": [], "flux": ["--max_sequence_length", "32"], "sd3": ["--max_sequence_length", "32"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def results(folders, photos, tmp_path_factory):
    """family x {lora, qlora}: a 2-step training through the CLI (the train leg of the matrix)."""
    out = {}
    for name, folder in folders.items():
        for method in ("lora", "qlora"):
            target = tmp_path_factory.mktemp(f"{name}-{method}")
            argv = ["train", "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(photos),
                    "--instance_prompt", "a sks box", "--output_dir", str(target), "--method", method,
                    "--resolution", "32", "--max_train_steps", "2", "--quant_init", "minmax", "--quiet",
                    "--force", "--learning_rate", "1e-2", *T5[name]]
            assert main(argv) == 0, (name, method)
            out[name, method] = target
    return out


def _generate(folder, out, *extra, family="sd"):
    return main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a sks box",
                 "--num_images", "1", "--num_inference_steps", "2", "--height", "32", "--width", "32", "--out",
                 str(out), "--quiet", *T5[family], *extra])


@pytest.mark.parametrize("family", tuple(BUILDERS))
@pytest.mark.parametrize("method", ("lora", "qlora"))
def test_each_family_trains_and_generates_with_its_lora_result(family, method, folders, results, tmp_path, capsys):
    result = results[family, method]
    assert (result / "pytorch_lora_weights.safetensors").is_file()
    assert _generate(folders[family], tmp_path / "with", "--adapter", str(result), family=family) == 0, \
        capsys.readouterr().err
    assert _generate(folders[family], tmp_path / "without", family=family) == 0
    with_lora = np.asarray(Image.open(tmp_path / "with" / "000.png"), dtype=np.float32)
    assert np.isfinite(with_lora).all() and with_lora.std() > 0
    assert "No LoRA keys" not in capsys.readouterr().err  # diffusers' notice stays out of the output


@pytest.mark.parametrize("family", tuple(BUILDERS))
@pytest.mark.parametrize("method", ("lora", "qlora"))
def test_each_familys_lora_file_adds_onto_a_quantized_denoiser(family, method, folders, results, tmp_path, capsys):
    """--lora on top of the qlora result's quantized denoiser (a tuneqdm-quantized Linear without a float weight)."""
    lora_file = results[family, method] / "pytorch_lora_weights.safetensors"
    status = _generate(folders[family], tmp_path / "on-top", "--adapter", str(results[family, "qlora"]), "--lora",
                       str(lora_file), "--lora_scale", "0.5", family=family)
    assert status == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "on-top" / "generate.json").read_text())
    assert meta["lora"] == str(lora_file) and meta["lora_scale"] == 0.5
