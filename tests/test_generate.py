"""`tuneqdm generate --adapter` and `tuneqdm.load_pipeline`: scale adapters (re-quantized base or saved quantized
base give the same images), LoRA and fp results, SDXL, and one-line errors for a foreign base or a wrong folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.sampling import generate
from tuneqdm.train import TrainConfig, train

from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline


def _train(base, photos, out, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos),
                    instance_prompt="a sks box", output_dir=str(out), resolution=32, max_train_steps=2, quiet=True,
                    quant_init="minmax", learning_rate=5e-2)
    settings.update(kw)
    return train(TrainConfig(**settings))


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _sample(pipe, n=1):
    return _pixels(generate(pipe, "a sks box", num_images=n, num_inference_steps=3, seed=7))


@pytest.fixture(scope="module")
def scales(base, photos, tmp_path_factory):
    return _train(base, photos, tmp_path_factory.mktemp("tuneqdm") / "out")


def test_scale_adapter_cli_matches_python_and_changes_the_picture(base, scales, tmp_path, capsys):
    pipe = tuneqdm.load_pipeline(adapter=scales)  # the base is read from the adapter
    assert tuneqdm.quantized_layers(pipe.unet) and not pipe.unet.training
    tuned = _sample(pipe, 2)
    plain = _sample(tuneqdm.load_pipeline(base), 2)
    assert np.abs(tuned - plain).mean() > 0.5

    out = tmp_path / "gen"
    assert main(["generate", "--adapter", str(scales), "--prompt", "a sks box", "--num_images", "2",
                 "--num_inference_steps", "3", "--seed", "7", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"2 images of 'a sks box' in {out}\n"
    assert np.array_equal(_pixels([Image.open(out / f"00{i}.png") for i in range(2)]), tuned)
    meta = json.loads((out / "generate.json").read_text())
    assert meta["adapter"] == str(scales) and meta["seeds"] == [7, 8]


def test_quantized_base_gives_the_same_images_as_requantizing(base, photos, scales, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    qdir = tuneqdm.save_quantized(unet, tmp_path / "w4", base_id=str(base))
    with_q = tuneqdm.load_pipeline(adapter=scales, quantized_base=qdir)
    assert np.array_equal(_sample(with_q), _sample(tuneqdm.load_pipeline(adapter=scales)))

    # training from the quantized base records it; generate then uses it without being told
    out = _train(base, photos, tmp_path / "from-q", quantized_base=str(qdir))
    assert json.loads((out / "adapter_config.json").read_text())["quantized_base"] == str(qdir.resolve())
    pipe = tuneqdm.load_pipeline(adapter=out)
    assert tuneqdm.fingerprint(pipe.unet) == tuneqdm.fingerprint(unet)
    base_only = tuneqdm.load_pipeline(base, quantized_base=qdir)  # no adapter: the quantized base itself
    assert not np.array_equal(_sample(base_only), _sample(pipe))
    # without a base, the one recorded in quantization.json (a local folder) is used
    assert np.array_equal(_sample(tuneqdm.load_pipeline(quantized_base=qdir)), _sample(base_only))


def test_adapter_for_another_base_is_refused_in_one_line(base, scales, tmp_path, capsys):
    other = tiny_sd_pipeline(tmp_path / "other", seed=1)
    assert main(["generate", "--adapter", str(scales), "--pretrained_model_name_or_path", str(other),
                 "--prompt", "x", "--out", str(tmp_path / "g"), "--quiet"]) == 2  # no loading line before the error
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: adapter {scales} belongs to base fingerprint ") and err.count("\n") == 1
    assert f"(base '{base.resolve()}'), but this model's fingerprint is " in err
    assert err.endswith(f": pass --pretrained_model_name_or_path {base.resolve()} (the base it was trained on), or "
                        "train again on this one\n")
    assert not (tmp_path / "g").exists()

    # a quantized base made otherwise (mse grid) than the adapter's (minmax): the error says both ways out
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    with torch.no_grad():
        next(iter(tuneqdm.quantized_layers(unet).values())).zero_point.add_(1)  # other integers, same settings
    qdir = tuneqdm.save_quantized(unet, tmp_path / "w4", base_id=str(base))
    assert main(["generate", "--adapter", str(scales), "--quantized_base", str(qdir), "--prompt", "x",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: adapter {scales} belongs to base fingerprint ") and err.count("\n") == 1
    assert err.endswith(": drop --quantized_base (the adapter's own base is then quantized as in training), or train "
                        f"with --quantized_base {qdir} to use that one\n")

    (tmp_path / "empty").mkdir()
    assert main(["generate", "--adapter", str(tmp_path / "empty"), "--prompt", "x", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err == (
        f"tuneqdm: error: --adapter {tmp_path / 'empty'} holds no adapter (adapter_config.json, "
        "pytorch_lora_weights.safetensors or unet/): point it at a `tuneqdm train` --output_dir\n")


@pytest.mark.parametrize("method, lr", [("lora", 5e-2), ("fp", 1e-3)])
def test_lora_and_fp_results_load_and_change_the_picture(base, photos, tmp_path, method, lr):
    out = _train(base, photos, tmp_path / method, method=method, learning_rate=lr)
    pipe = tuneqdm.load_pipeline(adapter=out)
    assert not tuneqdm.quantized_layers(pipe.unet)
    assert np.abs(_sample(pipe) - _sample(tuneqdm.load_pipeline(base))).mean() > 0.5
    with pytest.raises(TuneQDMError, match=f"^--quantized_base applies to scale adapters; {out} is a {method} "
                                           "result: drop --quantized_base$"):
        tuneqdm.load_pipeline(adapter=out, quantized_base=tmp_path)
    if method == "lora":
        other = tiny_sd_pipeline(tmp_path / "other", seed=1)
        with pytest.raises(TuneQDMError, match=f"^LoRA {out} belongs to base fingerprint [0-9a-f]{{16}} "
                                               f"\\(base '{base.resolve()}'\\), but this model's fingerprint is "):
            tuneqdm.load_pipeline(other, adapter=out)


def test_sdxl_trains_two_steps_and_generates(photos, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    sdxl = tiny_sdxl_pipeline(tmp_path / "sdxl")
    out = _train(sdxl, photos, tmp_path / "out", experts=2)
    assert json.loads((out / "adapter_config.json").read_text())["experts"] == 2
    pipe = tuneqdm.load_pipeline(adapter=out)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert main(["generate", "--adapter", str(out), "--prompt", "a sks box on the beach", "--num_images", "1",
                 "--num_inference_steps", "2", "--scheduler", "euler", "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "000.png").size == (32, 32)


def test_class_placeholder_comes_from_the_subject_json(base, photos, tmp_path, capsys):
    import shutil

    subject = tmp_path / "subject"
    shutil.copytree(photos, subject)
    (subject / "subject.json").write_text(json.dumps({"class": "box", "class_prompt": "a box"}))
    out = tmp_path / "out"
    assert main(["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(subject),
                 "--instance_prompt", "a sks <class>", "--output_dir", str(out), "--resolution", "32",
                 "--max_train_steps", "1", "--quiet", "--quant_init", "minmax", "--validation_prompt",
                 "a sks <class> in the snow", "--num_validation_images", "1", "--validation_inference_steps", "1"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["instance_prompts"] == ["a sks box"]
    assert (out / "validation" / "step-000001" / "prompt.txt").read_text() == "a sks box in the snow\n"
    assert main(["generate", "--adapter", str(out), "--prompt", "a sks <class> on the beach", "--num_images", "1",
                 "--num_inference_steps", "2", "--out", str(tmp_path / "g")]) == 0
    assert capsys.readouterr().out == f"1 images of 'a sks box on the beach' in {tmp_path / 'g'}\n"

    assert main(["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
                 "--instance_prompt", "a sks <class>", "--output_dir", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: the prompt has a <class> placeholder but {photos} has no "
                                       "subject.json naming the class: write the class word instead\n")
    assert main(["generate", "--prompt", "a <class>", "--out", str(tmp_path / "g2")]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: the prompt has a <class> placeholder but no --adapter trained "
                                       "on one toy subject names the class: write the class word instead\n")


def test_weight_cache_gives_bit_identical_images_within_its_budget(scales):
    from tuneqdm.quant import cached_weights

    pipe = tuneqdm.load_pipeline(adapter=scales)  # TuneQDM, 4 experts
    rebuilt = _pixels(generate(pipe, "a sks box", num_inference_steps=3, seed=7, weight_cache_bytes=0))
    assert np.array_equal(_sample(pipe), rebuilt)  # default: cached

    layers = list(tuneqdm.quantized_layers(pipe.unet).values())
    sizes = [4 * layer.weight_shape.numel() for layer in layers]
    with cached_weights(pipe.unet) as cache:
        generate(pipe, "a sks box", num_inference_steps=3, seed=7)
    experts = {k[1] for k in cache._weights}
    assert len(experts) == 3  # DDIM's 3 steps fall in 3 of the 4 timestep intervals
    assert cache.bytes == len(experts) * sum(sizes) and all(w is not None for w in cache._weights.values())
    assert all(layer.weight_cache is None for layer in layers)  # released on exit

    with cached_weights(pipe.unet, max_bytes=min(sizes)) as cache:  # room for one layer of one expert
        small = _pixels(generate(pipe, "a sks box", num_inference_steps=3, seed=7, weight_cache_bytes=min(sizes)))
    assert np.array_equal(small, rebuilt) and cache.bytes <= min(sizes)


def test_height_and_width_default_to_the_native_size(base, tmp_path, capsys):
    def run(out, *extra):
        return main(["generate", "--pretrained_model_name_or_path", str(base), "--prompt", "a box", "--num_images", "1",
                     "--num_inference_steps", "2", "--out", str(tmp_path / out), *extra])

    assert run("native") == 0 and Image.open(tmp_path / "native" / "000.png").size == (32, 32)  # 16x16 latents x 2
    assert run("wide", "--height", "16", "--width", "48") == 0
    assert Image.open(tmp_path / "wide" / "000.png").size == (48, 16)
    meta = json.loads((tmp_path / "wide" / "generate.json").read_text())
    assert (meta["height"], meta["width"]) == (16, 48)
    expected = generate(tuneqdm.load_pipeline(base), "a box", num_inference_steps=2, height=16, width=48)
    assert np.array_equal(_pixels([Image.open(tmp_path / "wide" / "000.png")]), _pixels(expected))
    capsys.readouterr()
    assert run("bad", "--width", "20") == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --width 20: give a positive multiple of 8 up to 8192 (the "
                                       "VAE's latent grid), or leave it out for the model's native size\n")


@pytest.fixture(scope="module")
def fp16_variant(base, tmp_path_factory):
    """The tiny base saved as a variant only (``*.fp16.safetensors``; the tensors stay float32): no download."""
    from diffusers import DiffusionPipeline

    folder = tmp_path_factory.mktemp("variant") / "sd"
    DiffusionPipeline.from_pretrained(base, safety_checker=None).save_pretrained(folder, variant="fp16")
    assert not list(folder.glob("unet/*model.safetensors")) and list(folder.glob("unet/*.fp16.safetensors"))
    return folder


def test_variant_reaches_every_command_that_loads_a_pipeline(base, photos, scales, fp16_variant, tmp_path, capsys):
    var = ["--pretrained_model_name_or_path", str(fp16_variant)]
    gen = ["generate", "--prompt", "a sks box", "--num_images", "1", "--num_inference_steps", "3", "--seed", "7"]
    assert main([*gen, *var, "--variant", "fp16", "--out", str(tmp_path / "g")]) == 0
    expected = _sample(tuneqdm.load_pipeline(base))
    assert np.array_equal(_pixels([Image.open(tmp_path / "g" / "000.png")]), expected)
    assert json.loads((tmp_path / "g" / "generate.json").read_text())["variant"] == "fp16"

    # train with the variant: the same adapter as on the plain folder, and generate reads the variant from it
    out = _train(fp16_variant, photos, tmp_path / "t", variant="fp16")
    assert (out / "adapter.safetensors").read_bytes() == (scales / "adapter.safetensors").read_bytes()
    assert np.array_equal(_sample(tuneqdm.load_pipeline(adapter=out)), _sample(tuneqdm.load_pipeline(adapter=scales)))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\n")
    assert main(["quantize", *var, "--variant", "fp16", "--calibrate", "minmax", "--calib_prompts", str(prompts),
                 "--calib_samples", "1", "--num_inference_steps", "2", "--out", str(tmp_path / "q")]) == 0
    assert main(["evaluate", *var, "--variant", "fp16", "--quantized_base", str(tmp_path / "q"),
                 "--instance_data_dir", str(photos), "--prompts", str(prompts), "--class_word", "box",
                 "--evaluator", "toy", "--images_per_prompt", "1", "--num_inference_steps", "2",
                 "--out", str(tmp_path / "e")]) == 0
    assert main(["quantize-activations", *var, "--variant", "fp16", "--quantized_base", str(tmp_path / "q"),
                 "--calib_prompts", str(prompts), "--calib_samples", "1", "--num_inference_steps", "2",
                 "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()

    def err(*argv):
        assert main([*gen, *argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
        return capsys.readouterr().err

    assert err(*var) == (  # the files are checked before anything loads
        f"tuneqdm: error: {fp16_variant / 'text_encoder'} holds no model.safetensors nor model.safetensors.index.json, "
        "but the variant fp16 (model.fp16.safetensors): pass --variant fp16\n")
    assert err(*var, "--revision", "v1") == (
        f"tuneqdm: error: --revision v1 names a version of a hub repository, but {fp16_variant} is a local folder: "
        "drop --revision (the folder holds one version)\n")
    assert err("--variant", "fp16") == (
        "tuneqdm: error: --revision and --variant apply to the model of --pretrained_model_name_or_path; the "
        "embedded pipeline has one version: drop them or name the model\n")
    assert not (tmp_path / "x").exists()
