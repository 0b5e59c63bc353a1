"""One loading path (tuneqdm.loading): from a model's files to a ready pipeline without the float denoiser or a float
text encoder in memory; the cache of quantized bases; a model's files checked before anything loads."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tuneqdm
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.loading import QuantizedCache, assemble, denoiser_skeleton, quantized_denoiser, resolve
from tuneqdm.loading.streamed import is_streamed
from tuneqdm.tuning import QuantConfig

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "pixart": tiny_pixart_pipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _encoders(pipe) -> list[str]:
    return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_streamed_text_encoders_give_the_resident_numbers_one_module_at_a_time(folders, name):
    source = resolve(folders[name])
    streamed = assemble(source, denoiser_skeleton(source), text_encoders="stream")
    resident = assemble(source, denoiser_skeleton(source), text_encoders="resident")
    for n in _encoders(streamed):
        encoder = getattr(streamed, n)
        assert is_streamed(encoder) and not is_streamed(getattr(resident, n))
        largest = max(p.numel() for p in getattr(resident, n).parameters())

        def held_now():  # float values held: every parameter is on the meta device or a one-value placeholder
            return sum(p.untyped_storage().nbytes() // p.element_size() for p in encoder.parameters() if not p.is_meta)

        assert held_now() == 1 and next(encoder.parameters()).device == torch.device("cpu")
        held = []

        def count(module, args, held=held):
            held.append(held_now())

        handles = [m.register_forward_pre_hook(count) for m in encoder.modules()]
        ids = torch.tensor([[1, 5, 7, 3, 2, 9]])
        with torch.no_grad():
            got, want = encoder(ids)[0], getattr(resident, n)(ids)[0]
        for h in handles:
            h.remove()
        assert torch.equal(got, want)  # the same weights through the same operations
        assert 1 < max(held) <= largest + 1  # never more than one module's weights at a time
        assert held_now() == 1  # dropped again after the call
    assert streamed._execution_device == torch.device("cpu")


def test_streamed_float_denoiser_samples_the_resident_ones_images(folders):
    from tuneqdm.loading import float_denoiser
    from tuneqdm.sampling import generate

    source = resolve(folders["sd"])
    images = {}
    for stream in (False, True):
        pipe = assemble(source, float_denoiser(source, stream=stream))
        images[stream] = np.stack([np.asarray(i) for i in generate(pipe, "a box", 2, num_inference_steps=3)])
    assert np.array_equal(images[False], images[True])


# ---- the denoiser is never held in float: a model whose float copy would exceed the bound ------------------------
def _big_flux(folder):
    """The tiny Flux pipeline with a 0.13 B-parameter transformer (hidden 1536) in bf16: 0.5 GB as float32, 65 MB
    packed at W4, so a float copy anywhere in the process shows in its peak."""
    from diffusers import FluxTransformer2DModel

    tiny_flux_pipeline(folder)
    torch.manual_seed(0)
    big = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=128, num_attention_heads=12, joint_attention_dim=32,
                                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    shutil.rmtree(folder / "transformer")
    big.to(torch.bfloat16).save_pretrained(folder / "transformer")
    return sum(p.numel() for p in big.parameters())


def _peak_rss(argv, cwd, env) -> int:
    """The whole-process peak resident set of a tuneqdm command, in bytes (the kernel's count, read at exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneqdm.cli", *argv, "--quiet"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()
    return usage.ru_maxrss * 1024


def test_train_and_generate_never_hold_the_float_denoiser(tmp_path, photos):
    small, big = tmp_path / "small", tmp_path / "big"
    tiny_flux_pipeline(small)
    params = _big_flux(big)
    env = {**os.environ, "TUNEQDM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    train = ["train", "--instance_data_dir", str(photos), "--instance_prompt", "a sks box", "--max_train_steps", "1",
             "--quant_init", "minmax", "--max_sequence_length", "16"]
    baseline = _peak_rss([*train, "--pretrained_model_name_or_path", str(small), "--output_dir", "a"], tmp_path, env)
    trained = _peak_rss([*train, "--pretrained_model_name_or_path", str(big), "--output_dir", "b"], tmp_path, env)
    sampled = _peak_rss(["generate", "--adapter", "b", "--prompt", "a sks box", "--num_images", "1",
                         "--num_inference_steps", "1", "--max_sequence_length", "16", "--out", "g"], tmp_path, env)
    float32 = 4 * params
    # packed W4 (params / 2 bytes) + scales and AdamW moments for K = 4 experts: far below one float32 copy
    assert trained - baseline < 0.4 * float32, (trained - baseline) / float32
    assert sampled - baseline < 0.4 * float32, (sampled - baseline) / float32


# ---- the cache of quantized bases ----------------------------------------------------------------------------------
def _forbid_quantizing(monkeypatch):
    import tuneqdm.loading.denoiser as loading_denoiser

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(loading_denoiser, "quantize_pretrained", refuse)


def test_a_base_is_quantized_once_then_read_from_the_cache_by_content(folders, tmp_path, monkeypatch):
    cache = QuantizedCache(tmp_path / "cache")
    config = QuantConfig(bits=4, init="minmax", method="peqa")
    first = quantized_denoiser(resolve(folders["flux"]), config, cache=cache)
    entries = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(entries) == 1
    meta = json.loads((entries[0] / "quantization.json").read_text())
    assert meta["cache"]["source"] == str(folders["flux"].resolve())
    copy = shutil.copytree(folders["flux"], tmp_path / "moved")  # the same files elsewhere: the same entry
    _forbid_quantizing(monkeypatch)
    again = quantized_denoiser(resolve(copy), config, cache=cache)
    assert tuneqdm.fingerprint(again) == tuneqdm.fingerprint(first)
    with pytest.raises(AssertionError, match="quantized again"):  # other settings: another entry
        quantized_denoiser(resolve(copy), QuantConfig(bits=8, init="minmax", method="peqa"), cache=cache)
    monkeypatch.undo()
    changed = shutil.copytree(folders["flux"], tmp_path / "changed")
    flux = tuneqdm.loading.float_denoiser(resolve(changed))
    with torch.no_grad():
        flux.proj_out.weight.mul_(1.01)
    flux.save_pretrained(changed / "transformer")
    quantized_denoiser(resolve(changed), config, cache=cache)
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 2  # changed weights: a new entry


def _train_args(base, photos, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--instance_prompt", "a sks box", "--max_train_steps", "1", "--quant_init", "minmax",
            "--output_dir", str(out), "--quiet", *extra]


def test_a_damaged_cache_entry_is_one_line_and_never_used(folders, photos, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_train_args(folders["sd"], photos, tmp_path / "a", "--quantized_cache", str(cache))) == 0
    (entry,) = (cache / "quantized").iterdir()
    data = bytearray((entry / "quantized.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (entry / "quantized.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_train_args(folders["sd"], photos, tmp_path / "b", "--quantized_cache", str(cache))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: the quantized-base cache entry {entry} is damaged (") and err.count("\n") == 1
    assert err.endswith(f"delete it (rm -r {entry}) and run again, or pass --no_quantized_cache\n")
    assert not (tmp_path / "b").exists()
    assert main(_train_args(folders["sd"], photos, tmp_path / "c", "--no_quantized_cache")) == 0  # bypassed


def test_no_room_or_a_failed_write_for_the_cache_is_one_line_and_leaves_nothing(folders, photos, tmp_path, capsys,
                                                                                 monkeypatch):
    import tuneqdm.loading.cache as cache_module

    cache = tmp_path / "cache"
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert main(_train_args(folders["sd"], photos, tmp_path / "a", "--quantized_cache", str(cache))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: the quantized-base cache {cache} needs about ") and err.count("\n") == 1
    assert err.endswith("GiB free: free space, choose another --quantized_cache, or pass --no_quantized_cache\n")
    monkeypatch.undo()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuneqdm.serialization, "save_file", full_disk)
    assert main(_train_args(folders["sd"], photos, tmp_path / "b", "--quantized_cache", str(cache))) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuneqdm: error: cannot write the quantized-base cache entry ") and err.count("\n") == 1
    assert "(No space left on device); nothing partial was left" in err
    assert list((cache / "quantized").iterdir()) == []  # neither an entry nor its temporary folder
    assert not (tmp_path / "b").exists()


def test_no_quantized_cache_writes_nothing_and_gives_the_same_adapter(folders, photos, tmp_path):
    assert main(_train_args(folders["sd"], photos, tmp_path / "a", "--quantized_cache", str(tmp_path / "c"))) == 0
    assert main(_train_args(folders["sd"], photos, tmp_path / "b", "--no_quantized_cache")) == 0
    assert main(_train_args(folders["sd"], photos, tmp_path / "d", "--quantized_cache", str(tmp_path / "c"))) == 0
    adapters = [(tmp_path / run / "adapter.safetensors").read_bytes() for run in "abd"]
    assert adapters[0] == adapters[1] == adapters[2]


# ---- a model's files, checked before anything loads ------------------------------------------------------------
def test_a_truncated_shard_is_one_line_before_any_model_loads(folders, photos, tmp_path, capsys):
    folder = shutil.copytree(folders["flux"], tmp_path / "flux")
    shard = folder / "text_encoder_2" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(_train_args(folder, photos, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneqdm: error: {shard} is truncated (") and err.endswith(": download the model again\n")
    assert not (tmp_path / "out").exists()


def test_fp8_stored_weights_stream_into_the_integers_of_their_float_values(tmp_path):
    from tiny_models import tiny_unet

    unet = tiny_unet()
    fp8 = tmp_path / "fp8"
    unet.to(torch.float8_e4m3fn).save_pretrained(fp8)
    want = tuneqdm.quantize_(tiny_unet().to(torch.float8_e4m3fn).float(), QuantConfig(bits=4, init="mse"))
    got = tuneqdm.quantize_pretrained(fp8, QuantConfig(bits=4, init="mse"))
    assert tuneqdm.fingerprint(got) == tuneqdm.fingerprint(want)


def test_a_hub_id_is_read_from_the_local_hub_cache_like_a_folder(folders, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    shutil.copytree(folders["flux"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from tuneqdm.errors import TuneQDMError\nfrom tuneqdm.loading import resolve\n"
            "s = resolve('someone/tiny-flux')\nprint(s.folder, s.base_id, s.fingerprint('transformer'))\n"
            "try:\n    resolve('someone/missing')\nexcept TuneQDMError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",  # read when imported
           "PYTHONPATH": os.pathsep.join(sys.path)}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    fingerprint = resolve(folders["flux"]).fingerprint("transformer")  # the same files as the local folder
    assert lines[0] == f"{repo / 'snapshots' / commit} someone/tiny-flux {fingerprint}"
    assert lines[1].startswith("cannot load the pipeline someone/missing: ")


def test_a_missing_local_folder_is_one_line_not_a_hub_lookup(tmp_path):
    with pytest.raises(TuneQDMError, match=f"^cannot load the pipeline {tmp_path / 'nothing'}: no such folder"):
        resolve(str(tmp_path / "nothing"))


# ---- memory, every phase --------------------------------------------------------------------------------------
def test_training_records_every_phases_peak_and_the_whole_process_peak(folders, photos, tmp_path):
    out = tmp_path / "out"
    assert main([*_train_args(folders["sd"], photos, out)[:-1], "--with_prior_preservation", "--class_prompt",
                 "a box", "--num_class_images", "1", "--prior_inference_steps", "1"]) == 0
    memory = json.loads((out / "training.json").read_text())["memory"]
    assert set(memory["phases_mib"]) == {"encode", "class_images", "denoiser", "prepare", "loop", "save"}
    assert memory["measured"] == "rss" and memory["peak_mib"] >= max(memory["phases_mib"].values()) > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert 0 < log[-1]["peak_mem_mib"] <= memory["phases_mib"]["loop"]


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_a_vae_stored_in_bfloat16_decodes_in_bfloat16_and_the_rest_in_float32(folders, tmp_path, name):
    """Decoding is generate's peak: a bf16 VAE's decoder runs in bf16 (half the activations), its encoder and the
    pipeline around it in float32; the image is that of the same weights stored (and decoded) in float32 to within
    bf16 rounding."""
    from diffusers import AutoencoderKL

    from tuneqdm.sampling import generate

    images = {}
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        shutil.copytree(folders[name], folder)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.bfloat16)
        vae.to(dtype).save_pretrained(folder / "vae")  # the same bf16 values, stored in bf16 or in float32
        source = resolve(folder)
        pipe = assemble(source, quantized_denoiser(source, QuantConfig(bits=8), cache=False))
        decoder = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        assert {p.dtype for p in pipe.vae.decoder.parameters()} == {decoder}
        assert {p.dtype for p in pipe.vae.encoder.parameters()} == {torch.float32}
        images[dtype] = np.asarray(generate(pipe, "a red box", num_inference_steps=2)[0], dtype=np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean((images[torch.bfloat16] - images[torch.float32]) ** 2))
    assert 30 < psnr < np.inf, psnr


def test_generate_frees_the_denoiser_before_the_last_batch_decodes_when_asked(folders):
    """Decoding is a run's peak: `tuneqdm generate` (done with the pipeline after one call) frees the denoiser when
    its last batch starts decoding, and earlier batches still have it; a pipeline that only samples holds no VAE
    encoder weights; the images are those of a run that keeps both."""
    from tuneqdm.sampling import generate

    source = resolve(folders["sd"])
    kept = generate(assemble(source, quantized_denoiser(source, QuantConfig(bits=4), cache=False)), "a red box",
                    num_images=3, num_inference_steps=2, batch_size=2)
    pipe = assemble(source, quantized_denoiser(source, QuantConfig(bits=4), cache=False), vae_encoder=False)
    assert all(0 in p.stride() for p in pipe.vae.encoder.parameters()) and pipe.vae.device == torch.device("cpu")
    held_at_decoding = []
    pipe.vae.decoder.conv_in.register_forward_pre_hook(  # runs inside the decoder, after its start
        lambda m, a: held_at_decoding.append(not any(p.is_meta for p in pipe.unet.parameters())))
    freed = generate(pipe, "a red box", num_images=3, num_inference_steps=2, batch_size=2, release_denoiser=True)
    assert held_at_decoding == [True, False]
    assert all(p.is_meta for p in pipe.unet.parameters())
    assert [np.asarray(i).tobytes() for i in freed] == [np.asarray(i).tobytes() for i in kept]


def test_a_pipeline_with_a_transformers_named_safety_checker_loads_with_one_warning_line(tmp_path, capsys):
    """Real SD 1.x folders ship `safety_checker/model.safetensors` (library "stable_diffusion", transformers' file
    name): tuneqdm never builds the checker, so neither its file name nor diffusers' multi-line notice stops it."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    folder = tiny_sd_pipeline(tmp_path / "sd")
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(small, vocab_size=100), projection_dim=8,
                                            vision_config=dict(small, image_size=32, patch_size=8))
                                 ).save_pretrained(folder / "safety_checker")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["generate", "--pretrained_model_name_or_path", str(folder), "--prompt", "a box", "--num_images",
                 "1", "--num_inference_steps", "2", "--out", str(tmp_path / "g"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "safety" in line] == [
        "tuneqdm: warning: the pipeline's safety checker is not run: tuneqdm samples without it, as diffusers does "
        "with safety_checker=None (check images yourself before sharing them)"], err
    assert (tmp_path / "g" / "000.png").is_file()
