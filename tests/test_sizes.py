"""Sizes and counts a model cannot take end in one line naming the bound, before the heavy work (issue 31): SD3
``--height 256`` beyond its ``pos_embed_max_size`` was a traceback in generate, train and quantize-activations; a
Flux size off its 16-pixel grid was resized silently; ``--resolution 1000000`` a MemoryError; ``--experts 1001``
with 1000 timesteps was accepted (``1000000`` ran for ever allocating scales); ``--rank 100000`` allocated
rank x width per layer; ``train --max_sequence_length 100000`` passed."""

import shutil

import pytest

from tuneqdm import QuantConfig, TuneQDMError
from tuneqdm.cli import main

from tiny_pipelines import _flow_vae, tiny_flux_pipeline, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


SD3_MESSAGE = ("tuneqdm: error: {flag} 256 does not fit this model: the positional embedding of its "
               "SD3Transformer2DModel covers at most 128 px (pos_embed_max_size 32 patches of 2x2 latents): give 128 "
               "or less (its native size is 32)\n")


@pytest.mark.parametrize("command", ("generate", "train", "quantize-activations"))
def test_a_size_beyond_the_positional_embedding_is_one_line_naming_the_largest(command, sd3, photos, tmp_path,
                                                                              capsys, monkeypatch):
    """Refused before any weight of the denoiser is read (train: on its skeleton; generate and quantize-activations:
    on the pipeline's configs, before load_pipeline builds the denoiser)."""
    import tuneqdm.loading.adapters

    def no_denoiser(*args):
        raise AssertionError("the denoiser was loaded before the size was checked")

    monkeypatch.setattr(tuneqdm.loading.adapters, "_denoiser", no_denoiser)
    (tmp_path / "p.txt").write_text("a box\n")
    out = tmp_path / "out"
    argv = {"generate": ["generate", "--prompt", "a box", "--height", "256", "--out", str(out)],
            "train": ["train", "--instance_data_dir", str(photos), "--instance_prompt", "a sks box", "--resolution",
                      "256", "--output_dir", str(out)],
            "quantize-activations": ["quantize-activations", "--calib_prompts", str(tmp_path / "p.txt"), "--height",
                                     "256", "--out", str(out)]}[command]
    assert main([*argv, "--pretrained_model_name_or_path", str(sd3), "--num_inference_steps" if command != "train"
                 else "--max_train_steps", "1", "--quiet"]) == 2
    flag = "--resolution" if command == "train" else "--height"
    assert capsys.readouterr().err == SD3_MESSAGE.format(flag=flag)
    assert not out.exists()


def test_a_rotary_table_bounds_the_size_too(tmp_path, capsys):
    """Z-Image's rotary positions (axes_lens) end where SD3's learned table does: past them, an IndexError."""
    from tiny_pipelines import tiny_zimage_pipeline

    folder = tiny_zimage_pipeline(tmp_path / "zimage")
    capsys.readouterr()  # the builder's own saving bars
    out = tmp_path / "out"
    assert main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a box", "--width", "256",
                 "--num_inference_steps", "1", "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --width 256 does not fit this model: the positional embedding "
                                       "of its ZImageTransformer2DModel covers at most 128 px (axes_lens 32 rotary "
                                       "positions of 2x2 latents): give 128 or less (its native size is 32)\n")
    assert not out.exists()


def test_a_size_off_the_family_grid_is_refused_naming_the_multiple(tmp_path, capsys):
    """A Flux pipeline with an 8x VAE packs 2x2 latents: sizes are multiples of 16 (diffusers resized 24 to 16)."""
    from diffusers import AutoencoderKL

    folder = tiny_flux_pipeline(tmp_path / "flux")
    shutil.rmtree(folder / "vae")
    small = _flow_vae()
    AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, sample_size=128,
                  shift_factor=small.config.shift_factor, scaling_factor=small.config.scaling_factor,
                  ).save_pretrained(folder / "vae")
    out = tmp_path / "out"
    assert main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a box", "--height", "24",
                 "--num_inference_steps", "1", "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --height 24 does not fit this model: it must be a multiple of "
                                       "16 (its native size is 128)\n")
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--experts", "1001"], "--experts 1001 is more than this base's 1000 training timesteps: give at most 1000 "
                            "(one expert per timestep)"),
    (["--experts", "1000000"], "--experts 1000000 is more than this base's 1000 training timesteps: give at most "
                               "1000 (one expert per timestep)"),
    (["--resolution", "1000000"], "--resolution must be a positive multiple of 8 up to 8192, got 1000000"),
    (["--max_sequence_length", "100000"], "--max_sequence_length 100000: give 1 to 512 T5 tokens, or leave it out "
                                          "for the pipeline's own"),
    (["--method", "lora", "--rank", "100000"],
     "--rank 100000 is above the full rank of the LoRA's layers (down_blocks.1.attentions.0.transformer_blocks.0."
     "attn1.to_q has rank 64): give --rank 64 or less"),
])
def test_train_refuses_counts_the_model_cannot_take_before_loading_it(argv, message, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--instance_data_dir", str(photos), "--instance_prompt", "a sks box", *argv,
                 "--max_train_steps", "1", "--output_dir", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"
    assert not out.exists()


def test_quant_config_refuses_more_experts_than_timesteps():
    assert QuantConfig(experts=1000, num_train_timesteps=1000).experts == 1000
    with pytest.raises(TuneQDMError, match=r"^experts=1001 is more than the 1000 training timesteps it routes "
                                           r"\(num_train_timesteps\)$"):
        QuantConfig(experts=1001, num_train_timesteps=1000)
