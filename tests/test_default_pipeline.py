"""The embedded default pipeline: SD's format, offline loading, size, reproducible sampling, one-line damage errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.sampling import generate
from tuneqdm.toy.pipeline import DEFAULT_PIPELINE_DIR, default_pipeline

REINSTALL = "reinstall tuneqdm (pip install --force-reinstall tuneqdm)"


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return default_pipeline()


def test_is_a_stable_diffusion_pipeline_in_sd_format(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a sks dog").input_ids == [49406, 320, 48136, 1929, 49407]  # CLIP's own ids
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 16, 16)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())  # shipped fp16, upcast on load


def test_shipped_folder_is_at_most_25_mb():
    size = sum(p.stat().st_size for p in DEFAULT_PIPELINE_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024


def test_same_seed_same_image_and_any_prompt_works(pipe):
    a = generate(pipe, "a red star on the beach", num_images=1, num_inference_steps=3, seed=5)[0]
    b = generate(pipe, "a red star on the beach", num_images=1, num_inference_steps=3, seed=5)[0]
    c = generate(pipe, "a photograph of an astronaut riding a horse", num_images=1, num_inference_steps=3, seed=5)[0]
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_quantizes_to_w4_and_still_samples(pipe):
    import copy

    unet = copy.deepcopy(pipe.unet)
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    emb = torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        assert unet(x, t, emb).sample.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_install_is_one_line(tmp_path, damage):
    folder = tmp_path / "pipe"
    shutil.copytree(DEFAULT_PIPELINE_DIR, folder)
    weights = "unet/diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        data = (folder / weights).read_bytes()
        (folder / weights).write_bytes(data[: len(data) // 2])
        word = "corrupted"
    else:
        (folder / weights).unlink()
        word = "missing"
    with pytest.raises(TuneQDMError) as e:
        default_pipeline(path=folder)
    assert str(e.value) == f"the default pipeline file {weights} is {word}: {REINSTALL}"


def test_cli_generate_writes_images_and_refuses_a_used_folder(tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["generate", "--prompt", "a blue heart in the snow", "--num_images", "2", "--num_inference_steps", "2",
            "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "generate.json"]
    assert json.loads((out / "generate.json").read_text())["seeds"] == [0, 1]
    assert main(args) == 2
    assert capsys.readouterr().err.endswith(
        f"tuneqdm: error: output folder {out} is not empty: choose another --out or pass --force\n")
    assert main(args + ["--force", "--scheduler", "euler"]) == 0


def test_negative_and_huge_seeds_work_and_wrap_like_torch(pipe):
    huge = 2**64 + 5
    a = generate(pipe, "a star", num_images=1, num_inference_steps=2, seed=huge)[0]
    b = generate(pipe, "a star", num_images=1, num_inference_steps=2, seed=5)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))  # seeds are taken modulo 2**64
    c = generate(pipe, "a star", num_images=1, num_inference_steps=2, seed=-7)[0]
    d = generate(pipe, "a star", num_images=1, num_inference_steps=2, seed=2**64 - 7)[0]
    assert np.array_equal(np.asarray(c), np.asarray(d))


@pytest.mark.parametrize("installed, name", [("0.32.0", "torch_dtype"), ("0.39.0", "torch_dtype"),
                                             ("0.40.0", "dtype"), ("0.40.0.dev0", "torch_dtype"),
                                             ("0.42.1", "dtype"), ("1.0.0", "dtype")])
def test_the_dtype_argument_follows_the_diffusers_version(installed, name):
    from tuneqdm.libraries import dtype_kwarg

    assert dtype_kwarg(torch.float16, installed) == {name: torch.float16}


def test_the_installed_diffusers_loads_in_the_asked_dtype_without_a_deprecation_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers 0.40+ warns (FutureWarning) on torch_dtype=
        half = default_pipeline(dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float16


def test_refine_recipe_continues_the_shipped_pipeline(tmp_path):
    """``--refine_from``: the VAE is refined with its scaling factor kept; exported without a UNet stage, the source's
    UNet is kept bit for bit; with one, the UNet continues from the source's weights (one step at warm-up lr moves
    it by far less than fp16 rounding). The exported manifest records the source's training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from recipes.pretrain import main as pretrain

    work = tmp_path / "work"
    tiny = ["--work", str(work), "--refine_from", str(DEFAULT_PIPELINE_DIR), "--threads", "1", "--refine_vae_steps",
            "2", "--refine_vae_batch", "2", "--refine_pool", "4", "--latent_pool", "4", "--unet_steps", "1",
            "--unet_batch", "2"]
    pretrain([*tiny, "--stages", "tokenizer", "vae"])
    pretrain([*tiny, "--export", str(tmp_path / "vae_only")])
    pretrain(tiny)
    pretrain([*tiny, "--export", str(tmp_path / "continued")])
    source = json.loads((DEFAULT_PIPELINE_DIR / "tuneqdm_pretrain.json").read_text())
    old_vae = AutoencoderKL.from_pretrained(DEFAULT_PIPELINE_DIR / "vae")
    old_unet = UNet2DConditionModel.from_pretrained(DEFAULT_PIPELINE_DIR / "unet")
    for name, unet_steps, tolerance in (("vae_only", 0, 0.0), ("continued", 1, 2e-3)):
        out = tmp_path / name
        manifest = json.loads((out / "tuneqdm_pretrain.json").read_text())
        assert manifest["unet_steps"] == unet_steps and manifest["refined_from"]["unet_steps"] == source["unet_steps"]
        assert "files" not in manifest["refined_from"]
        new_vae = AutoencoderKL.from_pretrained(out / "vae")
        assert new_vae.config.scaling_factor == old_vae.config.scaling_factor
        assert not torch.equal(new_vae.decoder.conv_out.weight, old_vae.decoder.conv_out.weight)  # it trained
        new_unet = UNet2DConditionModel.from_pretrained(out / "unet")
        diffs = [float((a - b).abs().max()) for a, b in zip(old_unet.parameters(), new_unet.parameters())]
        assert max(diffs) <= tolerance
        loaded = default_pipeline(path=out)  # loads, digests checked
        assert {k: v for k, v in loaded.unet.config.items() if k != "_name_or_path"} == \
            {k: v for k, v in old_unet.config.items() if k != "_name_or_path"}


def test_pretrain_recipe_reuses_a_pipelines_vae_for_a_wider_unet_and_keeps_its_recipe(tmp_path):
    """``--vae_from`` copies a finished pipeline's tokenizer and VAE (bit for bit after the fp16 round trip) so that
    only the UNet stage is trained; ``--unet_channels`` sets the UNet's size; export rebuilds the UNet from the
    recipe the run was started with, and resuming with another recipe fails in one line instead of loading
    checkpoints of another shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from recipes.pretrain import main as pretrain

    work, out = tmp_path / "work", tmp_path / "out"
    tiny = ["--work", str(work), "--vae_from", str(DEFAULT_PIPELINE_DIR), "--unet_channels", "16,32,64",
            "--threads", "1", "--latent_pool", "4", "--unet_steps", "1", "--unet_batch", "2"]
    pretrain(tiny)
    pretrain(["--work", str(work), "--export", str(out)])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert tuple(unet.config.block_out_channels) == (16, 32, 64)
    shipped, copied = (AutoencoderKL.from_pretrained(d / "vae") for d in (DEFAULT_PIPELINE_DIR, out))
    assert copied.config.scaling_factor == shipped.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), copied.state_dict().values()))
    tokens = "tokenizer/tokenizer.json"
    assert (out / tokens).read_bytes() == (DEFAULT_PIPELINE_DIR / tokens).read_bytes()
    assert json.loads((out / "tuneqdm_pretrain.json").read_text())["recipe"]["unet_channels"] == "16,32,64"
    default_pipeline(path=out)  # loads, digests checked
    with pytest.raises(TuneQDMError) as e:
        pretrain([*tiny[:5], "32,64,128", *tiny[6:], "--unet_steps", "2"])
    assert str(e.value) == (f"{work} was started with --unet_channels '16,32,64', not '32,64,128': resume with the "
                            "same flags or choose a new --work")
    (work / "recipe.json").write_text('{"unet_channels": "16,32,64", "unet_widths": 1}')  # not ours
    with pytest.raises(TuneQDMError, match=r"recipe.json is not a recipe this version of tuneqdm wrote \(.*widths"):
        pretrain(["--work", str(work), "--export", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
    with pytest.raises(TuneQDMError, match=r"^--refine_from continues its pipeline's own VAE and UNet: drop"):
        pretrain(["--work", str(tmp_path / "other"), "--refine_from", str(DEFAULT_PIPELINE_DIR), *tiny[4:6]])
    assert not (tmp_path / "other").exists()


def test_pretrain_checkpoint_keeps_its_step_inside_the_one_file_it_replaces(tmp_path):
    """The recipe's resumable checkpoints: tensors and step in one atomically replaced file (no sidecar that could
    disagree after an interruption); a checkpoint written with the old sidecar JSON still loads."""
    from safetensors.torch import save_file

    from recipes.pretrain import _load, _save

    path = tmp_path / "unet_ckpt.safetensors"
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    _save(path, tensors, {"step": 7, "wall": 1.5})
    _save(path, {"w": tensors["w"] + 1}, {"step": 8, "wall": 2.5})
    loaded, meta = _load(path)
    assert torch.equal(loaded["w"], tensors["w"] + 1) and meta == {"step": 8, "wall": 2.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet_ckpt.safetensors"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old))
    old.with_suffix(".json").write_text(json.dumps({"step": 3, "wall": 0.5}))
    loaded, meta = _load(old)
    assert torch.equal(loaded["w"], tensors["w"]) and meta == {"step": 3, "wall": 0.5}
