"""Sampling never writes black (NaN) images with exit status 0 (issue 31): non-finite settings are refused before
any model loads, a LoRA file holding NaN is refused when it loads, and a denoiser output, latent or decoded image
that becomes NaN or infinite ends sampling with one line naming the cause."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneqdm
from tuneqdm import TuneQDMError
from tuneqdm.cli import main
from tuneqdm.results import LORA_WEIGHTS
from tuneqdm.sampling import generate
from tuneqdm.train import TrainConfig, train


@pytest.fixture(scope="module")
def lora(base, photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    train(TrainConfig(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), method="lora",
                      instance_prompt="a sks box", output_dir=str(folder), resolution=32, max_train_steps=2,
                      quiet=True, learning_rate=1e-2, force=True))
    return folder / LORA_WEIGHTS


def _generate(base, out, *flags):
    return main(["generate", "--pretrained_model_name_or_path", str(base), "--prompt", "a box", "--num_images", "1",
                 "--num_inference_steps", "2", "--out", str(out), "--quiet", *flags])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tuneqdm: error: "), err
    return err[len("tuneqdm: error: "):-1]


@pytest.mark.parametrize("flags, error", [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
    (["--guidance_scale=-inf"], "--guidance_scale must be a finite number, got -inf"),
    (["--lora_scale", "2"], "--lora_scale weights a --lora file: add --lora FILE, or drop --lora_scale"),
    (["--max_sequence_length", "-1"], "--max_sequence_length -1: give 1 to 512 T5 tokens, or leave it out for the "
                                          "pipeline's own"),
    (["--height", "1000000"], "--height 1000000: give a positive multiple of 8 up to 8192 (the VAE's "
                                    "latent grid), or leave it out for the model's native size"),
])
def test_generate_refuses_bad_settings_before_loading(flags, error, tmp_path, capsys):
    assert _generate(tmp_path / "missing-base", tmp_path / "out", *flags) == 2  # the base is never read
    assert _one_line(capsys) == error
    assert not (tmp_path / "out").exists()


def test_a_lora_file_holding_nan_is_refused_naming_the_tensor(base, lora, tmp_path, capsys):
    tensors = load_file(lora)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[:100] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    assert _generate(base, tmp_path / "out", "--lora", str(tmp_path / "nan.safetensors")) == 2
    assert _one_line(capsys) == (f"{tmp_path / 'nan.safetensors'}: tensor {name!r} holds NaN or infinite values: "
                                 "use an undamaged copy of the LoRA")
    assert not (tmp_path / "out").exists()


def test_a_huge_lora_scale_stops_sampling_naming_the_lora(base, lora, tmp_path, capsys):
    assert _generate(base, tmp_path / "out", "--lora", str(lora), "--lora_scale", "1e30") == 2
    assert _one_line(capsys) == ("sampling stopped at denoising step 1: the UNet's output is NaN or infinite (its "
                                 "weights with the LoRA: check --lora and lower --lora_scale)")
    assert not (tmp_path / "out").exists()
    assert _generate(base, tmp_path / "ok", "--lora", str(lora), "--lora_scale", "0.5") == 0


def test_non_finite_weights_or_an_overflowing_guidance_stop_sampling_in_one_line(base):
    pipe = tuneqdm.load_pipeline(base=str(base))
    with pytest.raises(TuneQDMError, match="^sampling stopped at denoising step 2: the latent became NaN, infinite "
                                           r"or 1e\+04 times its initial size \(the guidance scale times the model's "
                                           r"output overflowed\): lower --guidance_scale$"):
        generate(pipe, "a box", num_inference_steps=3, guidance_scale=1e38)
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(TuneQDMError, match=r"^sampling stopped at denoising step 1: the UNet's output is NaN or "
                                           r"infinite \(its weights: check the --adapter and the base\)$"):
        generate(pipe, "a box", num_inference_steps=2)


def test_a_non_finite_vae_output_is_one_line(base):
    pipe = tuneqdm.load_pipeline(base=str(base))
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("inf")
    with pytest.raises(TuneQDMError, match="^sampling stopped: the VAE decoded NaN or infinite pixels"):
        generate(pipe, "a box", num_inference_steps=1)


def test_evaluate_fid_refuses_a_t5_length_it_would_ignore(tmp_path, capsys):
    assert main(["evaluate", "--metric", "fid", "--max_sequence_length", "3", "--out", str(tmp_path / "e")]) == 2
    assert _one_line(capsys) == ("--metric fid samples the embedded toy pipeline, which has no T5 encoder: drop "
                                 "--max_sequence_length")


def test_running_out_of_memory_while_sampling_is_not_blamed_on_the_model_files(base, monkeypatch):
    """A failed allocation is a RuntimeError too; it says to ask for less, not to download the model again."""
    from tuneqdm.loading import pipeline_from

    pipe = pipeline_from(base)

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                           "allocate 1099511627776 bytes.")

    monkeypatch.setattr(pipe.unet, "forward", exhausted)
    with pytest.raises(TuneQDMError, match=r"^sampling StableDiffusionPipeline ran out of memory \(\[enforce fail at "
                                           r"alloc_cpu.cpp:117\] DefaultCPUAllocator: not enough memory: .*\): use a "
                                           r"smaller --height/--width, or a device with more memory$"):
        generate(pipe, "a box", num_inference_steps=1)
