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


FIX = "download the model again, or restore its config.json"
CONFIG_CASES = [  # (family, file, key, value, the message after "tuneqdm: error: " with {folder})
    ("flux", "transformer/config.json", "num_layers", 0,
     "the transformer of {folder} ({folder}/transformer) holds 'transformer_blocks.0.attn.add_k_proj.bias', which its "
     f"config.json's FluxTransformer2DModel does not use (32 such tensors): {FIX}"),
    ("flux", "transformer/config.json", "guidance_embeds", False,
     "the transformer of {folder} ({folder}/transformer) holds 'time_text_embed.guidance_embedder.linear_1.bias', "
     f"which its config.json's FluxTransformer2DModel does not use (4 such tensors): {FIX}"),
    ("flux", "transformer/config.json", "num_single_layers", 2,
     "the transformer of {folder} ({folder}/transformer) lacks the weight 'single_transformer_blocks.1.norm.linear."
     f"weight' that its config.json's FluxTransformer2DModel needs: {FIX}"),
    ("flux", "transformer/config.json", "num_attention_heads", 4,
     "the transformer of {folder} ({folder}/transformer) holds 'time_text_embed.timestep_embedder.linear_1.weight' "
     f"of shape [32, 256], but its config.json's FluxTransformer2DModel needs [64, 256]: {FIX}"),
    ("sd", "vae/config.json", "latent_channels", 8,
     "the vae of {folder} ({folder}/vae) holds 'encoder.conv_out.weight' of shape [8, 32, 3, 3], but its "
     f"config.json's AutoencoderKL needs [16, 32, 3, 3]: {FIX}"),
    ("flux", "scheduler/scheduler_config.json", "num_train_timesteps", 0,
     "the scheduler configuration of {folder} sets num_train_timesteps to 0, which must be a positive integer: "
     "download the model again, or restore its config"),
    ("sd", "unet/config.json", "downsample_padding", [],  # found by the fuzzer: a traceback while sampling
     "the unet configuration of {folder} sets downsample_padding to [], which UNet2DConditionModel does not take (it "
     "expects int): download the model again, or restore its config"),
    ("sd", "scheduler/scheduler_config.json", "beta_schedule", "scaled_linea",  # NotImplementedError in diffusers
     "cannot build the pipeline {folder} from its configuration files (NotImplementedError: scaled_linea is not "
     "implemented for <class 'diffusers.schedulers.scheduling_ddim.DDIMScheduler'>): download the model again, or "
     "restore its configs"),
    ("sd", "unet/config.json", "downsample_padding", -5,  # of the right type: fails only in the UNet's forward
     "sampling StableDiffusionPipeline failed (RuntimeError: negative padding is not supported): a configuration "
     "file of the pipeline may be damaged: download the model again, or restore its configs"),
    ("sd", "model_index.json", "unet", None,  # found by the fuzzer: KeyError: 'unet'
     "{folder}/model_index.json names no unet component (the denoiser of a StableDiffusionPipeline, as [library, "
     "class]): download the model again, or restore its model_index.json"),
    ("sd3", "vae/config.json", "sample_size", 0,
     "the vae configuration of {folder} sets sample_size to 0, which must be a positive integer: download the model "
     "again, or restore its config"),
]


@pytest.mark.parametrize("family, file, key, value, message", CONFIG_CASES,
                         ids=[f"{c[0]}-{c[2]}={c[3]}" for c in CONFIG_CASES])
def test_a_config_that_does_not_match_its_weights_is_one_line_naming_the_tensor(family, file, key, value, message,
                                                                                 folders, tmp_path, capsys):
    """Before: tracebacks ("Cannot copy out of meta tensor", an IndexError in the scheduler) or, for num_layers 0 and
    guidance_embeds false, images of another model with exit status 0 (diffusers only warned of unused weights)."""
    import json

    folder = tmp_path / family
    shutil.copytree(folders[family], folder)
    config = json.loads((folder / file).read_text())
    config[key] = value
    (folder / file).write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a box",
                 "--num_inference_steps", "1", "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == "tuneqdm: error: " + message.format(folder=folder) + "\n"
    assert not out.exists()


def test_train_refuses_a_mismatched_component_before_loading(folders, photos, tmp_path, capsys):
    import json

    folder = tmp_path / "flux"
    shutil.copytree(folders["flux"], folder)
    config = json.loads((folder / "transformer/config.json").read_text())
    (folder / "transformer/config.json").write_text(json.dumps({**config, "num_layers": 0}))
    out = tmp_path / "out"
    assert main(["train", "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(photos),
                 "--instance_prompt", "a sks box", "--output_dir", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"tuneqdm: error: the transformer of {folder} ({folder}/transformer) "
                                              "holds 'transformer_blocks.0.attn.add_k_proj.bias', which its")
    assert not out.exists()


def test_a_broken_denoiser_config_in_quantize_is_named_before_the_calibration_prompts(folders, tmp_path, capsys):
    """Before: "--calib_prompts is required ...", although the folder could not have been quantized at all."""
    import json

    folder = tmp_path / "flux"
    shutil.copytree(folders["flux"], folder)
    config = json.loads((folder / "transformer/config.json").read_text())
    (folder / "transformer/config.json").write_text(json.dumps({**config, "num_attention_heads": "x"}))
    assert main(["quantize", "--pretrained_model_name_or_path", str(folder), "--out", str(tmp_path / "q"),
                 "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: the transformer configuration of {folder} sets "
                                       "num_attention_heads to \"x\", which FluxTransformer2DModel does not take (it "
                                       "expects int): download the model again, or restore its config\n")


def test_a_weight_format_tuneqdm_cannot_read_says_convert_not_download_again(folders, tmp_path, capsys):
    """An FP8 kind other than e4m3/e5m2 (here MX's e8m0 scales) is a whole file in a format tuneqdm does not read:
    downloading it again cannot help."""
    import json
    import struct

    folder = tmp_path / "flux"
    shutil.copytree(folders["flux"], folder)
    shard = next((folder / "transformer").glob("*.safetensors"))
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    key = sorted(k for k in head if k != "__metadata__")[0]
    head[key]["dtype"] = "F8_E8M0"
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a box", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: {shard}: tensor {key!r} is stored as 'F8_E8M0', which "
                                       "tuneqdm cannot read (weights: F64, F32, F16, BF16, F8_E4M3, F8_E5M2): convert "
                                       "the model to one of those (e.g. save it in bf16)\n")


def test_components_no_pipeline_tuneqdm_assembles_uses_are_not_checked(folders, tmp_path):
    """A safety checker (SD 1.5 ships one, of the library "stable_diffusion") is left out of every pipeline tuneqdm
    assembles, so the config-and-weights check leaves it alone too (it could not even build its class)."""
    import json

    import torch
    from safetensors.torch import save_file

    from tuneqdm.loading import resolve

    folder = tmp_path / "sd"
    shutil.copytree(folders["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker/config.json").write_text(json.dumps({"_class_name": "StableDiffusionSafetyChecker"}))
    save_file({"x": torch.zeros(2)}, folder / "safety_checker/diffusion_pytorch_model.safetensors")
    assert resolve(str(folder)).used_components() == ["text_encoder", "unet", "vae"]
