"""generate / quantize / quantize-activations / evaluate on diffusion-transformer pipelines (Flux, SD3, PixArt), with
adapters written through the Python API (quantize_ + perturbed scales + the training result writer)."""

import json

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.families import denoiser, family
from tuneqdm.sampling import generate
from tuneqdm.loading import base_id, pipeline_from
from tuneqdm.serialization import fingerprint, load_quantized
from tuneqdm.tuning import QuantConfig, quantize_
from tuneqdm.tuning.model import quant_state, quantized_layers

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "pixart": tiny_pixart_pipeline}
SAMPLE = {"num_inference_steps": 2, "max_sequence_length": 32}  # tiny pipelines, short T5 prompts
PROMPT = "a red box"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _sample(pipe, seed=0):
    return _pixels(generate(pipe, PROMPT, num_images=2, seed=seed, **SAMPLE))


def write_adapter(folder, out, bits=4, seed=0):
    """A TuneQDM adapter without training: the base's denoiser quantized as `train` does, every scale perturbed by a
    seeded ±30 %, written by the training result writer. Returns the perturbed pipeline (to compare with)."""
    from tuneqdm.train.outputs import save_result

    pipe = pipeline_from(str(folder))
    model = denoiser(pipe)
    quantize_(model, QuantConfig(bits=bits, method="tuneqdm", experts=4, init="mse"))
    quant_state(model).base_id = base_id(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            for p in [*layer.s_out, *layer.s_in]:
                p.mul_(1 + 0.3 * (2 * torch.rand(p.shape, generator=g) - 1))
    info = {"base_id": base_id(folder), "tuneqdm_method": "tuneqdm", "classes": ["box"],
            "instance_prompts": ["a sks box"]}
    save_result(model, out, "tuneqdm", type(pipe), info)
    return pipe


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapter_on_each_dit_samples_its_scales_and_w8_stays_close_to_float(folders, tmp_path, name):
    tuned = write_adapter(folders[name], tmp_path / "adapter")
    loaded = tuneqdm.load_pipeline(adapter=tmp_path / "adapter")
    assert type(denoiser(loaded)).__name__ == type(denoiser(tuned)).__name__
    with_adapter = _sample(loaded)
    assert with_adapter.shape == (2, 32, 32, 3)  # the native size (Flux's from its VAE, not the pipeline's 1024 px)
    assert np.array_equal(with_adapter, _sample(tuned))  # the adapter holds exactly the perturbed scales

    untuned = pipeline_from(str(folders[name]))
    quantize_(denoiser(untuned), QuantConfig(bits=4, method="tuneqdm", experts=4, init="mse"))
    assert fingerprint(denoiser(untuned)) == fingerprint(denoiser(loaded))  # same integers, other scales
    assert psnr(with_adapter, _sample(untuned)) < 35  # the scales change the images: measured 27.5 / 27.2 / 32.4 dB

    floating = _sample(pipeline_from(str(folders[name])))
    w8 = pipeline_from(str(folders[name]))
    quantize_(denoiser(w8), QuantConfig(bits=8, method="peqa", init="mse"))
    assert psnr(_sample(w8), floating) > 50  # measured (flux / sd3 / pixart, 2 steps, 32 px): 58.3 / 55.1 / 61.3 dB


def _run(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_quantize_streams_each_dit_folder_and_generate_loads_it(folders, tmp_path, capsys, name):
    out = tmp_path / "q"
    code, err = _run(capsys, "quantize", "--pretrained_model_name_or_path", str(folders[name]), "--bits", "8",
                     "--calibrate", "mse", "--out", str(out))
    assert (code, err) == (0, [])
    record = json.loads((out / "quantization.json").read_text())["calibration"]
    assert record["streamed_from"] == str((folders[name] / "transformer").resolve())
    in_memory = pipeline_from(str(folders[name]))
    quantize_(denoiser(in_memory), QuantConfig(bits=8, method="peqa", init="mse"))
    assert fingerprint(load_quantized(out)) == fingerprint(denoiser(in_memory))  # the same integers, streamed

    code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--quantized_base",
                     str(out), "--prompt", PROMPT, "--num_images", "2", "--num_inference_steps", "2",
                     "--max_sequence_length", "32", "--out", str(tmp_path / "g"))
    assert code == 0, err
    from PIL import Image

    images = _pixels([Image.open(tmp_path / "g" / f"{i:03d}.png") for i in range(2)])
    assert np.array_equal(images, _sample(in_memory))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adaround_quantize_calibrates_a_dit_layer_by_layer(folders, tmp_path, capsys, name):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\na blue ball\n")
    out = tmp_path / "q"
    code, err = _run(capsys, "quantize", "--pretrained_model_name_or_path", str(folders[name]), "--bits", "4",
                     "--calib_prompts", str(prompts), "--calib_samples", "2", "--num_inference_steps", "2",
                     "--iters", "3", "--batch_size", "4", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "quantization.json").read_text())["calibration"]
    model = load_quantized(out)
    guided = name != "flux"  # Flux's distilled guidance runs no unconditional half
    assert record["rows"] == 2 * 2 * (2 if guided else 1)  # 2 images x 2 steps (x 2 guidance halves)
    blocks = {b["block"]: b["layers"] for b in record["blocks"]}  # outside the timestep embedders: one per layer
    assert sum(blocks.values()) == len(quantized_layers(model)) and blocks["proj_out"] == 1
    assert all(b["adaround"] <= b["round_to_nearest"] * 1.5 for b in record["blocks"])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_quantize_activations_wraps_each_dit_attention_processor(folders, tmp_path, capsys, name):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\n")
    out = tmp_path / "a"
    code, err = _run(capsys, "quantize-activations", "--pretrained_model_name_or_path", str(folders[name]),
                     "--calib_prompts", str(prompts), "--num_inference_steps", "2", "--max_sequence_length", "32",
                     "--groups", "2", "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "activations.json").read_text())
    assert len(meta["timesteps"]) == 2 and meta["groups"] == 2

    from tuneqdm.ptq.activation_calibration import load_activations
    from tuneqdm.ptq.attention import WrappedAttnProcessor

    pipe = pipeline_from(str(folders[name]))
    model = denoiser(pipe)
    assert meta["exclude"] == list(family(pipe).first_last)  # input and output layers: full-precision activations
    assert set(meta["exclude"]) <= dict(model.named_modules()).keys() and not set(meta["exclude"]) & set(meta["layers"])
    own = {k: type(p) for k, p in model.attn_processors.items()}
    floating = _sample(pipe)
    q = load_activations(out).install(model, family(pipe))
    wrapped = model.attn_processors
    assert all(isinstance(p, WrappedAttnProcessor) and type(p.inner) is own[k] for k, p in wrapped.items())
    a8 = _sample(pipe)
    assert q.skipped_attention == set()  # every processor's attention went through the quantized softmax
    assert 25 < psnr(a8, floating) < float("inf")
    q.remove()
    assert {k: type(p) for k, p in model.attn_processors.items()} == own
    assert np.array_equal(_sample(pipe), floating)

    code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--activation_bits",
                     "8", "--groups", "2", "--activations", str(out), "--prompt", PROMPT, "--num_images", "2",
                     "--num_inference_steps", "2", "--max_sequence_length", "32", "--out", str(tmp_path / "g"))
    assert (code, err) == (0, [])


def _attend(start, keep_start, mode="log"):
    from tuneqdm.ptq.attention import QuantizedAttnProcessor, _QuantizedSDPA

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8)
    v = torch.eye(7).expand(2, 2, 7, 7)  # the output rows are the probabilities themselves
    sdpa = _QuantizedSDPA(QuantizedAttnProcessor(8, mode), start if keep_start else None)
    return sdpa.attend(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_wrapped_attention_keeps_the_start_key_exact_and_log_quantizes_the_rest_per_sample():
    from tuneqdm.ptq.attention import LOG_OCTAVES

    probs, exact = _attend(start=4, keep_start=True)
    assert torch.allclose(probs[..., 4], exact[..., 4], atol=1e-6)  # <start> (SD3: the first text key) kept
    rest = torch.cat([exact[..., :4], exact[..., 5:]], dim=-1)
    delta = rest.reshape(2, -1).amax(dim=1)  # one scale per sample (all heads and queries), <start> left out
    for b in range(2):
        got = torch.cat([probs[b, ..., :4], probs[b, ..., 5:]], dim=-1)
        levels = -torch.log2(got[got > 0] / delta[b]) / (LOG_OCTAVES / 255)
        assert torch.allclose(levels, levels.round(), atol=1e-3)  # on the grid delta * 2^(-q r)
        assert torch.allclose(got, torch.cat([exact[b, ..., :4], exact[b, ..., 5:]], -1), rtol=0.05, atol=1e-6)
    t5, _ = _attend(start=4, keep_start=False)  # T5 prompts: no start token, every key log-quantized
    assert not torch.allclose(t5[..., 4], exact[..., 4], atol=1e-6)


def test_evaluate_scores_an_adapter_on_a_tiny_dit_through_the_cli(folders, tmp_path, capsys):
    from tuneqdm.toy.subjects import write_subject

    write_subject(5, tmp_path / "s5", n_photos=2)
    write_adapter(folders["sd3"], tmp_path / "adapter")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\na {0} {1} on the beach\n")
    code, err = _run(capsys, "evaluate", "--adapter", str(tmp_path / "adapter"), "--instance_data_dir",
                     str(tmp_path / "s5"), "--prompts", str(prompts), "--class_word", "box", "--evaluator", "toy",
                     "--images_per_prompt", "2",
                     "--num_inference_steps", "2", "--out", str(tmp_path / "e"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [p["prompt"] for p in metrics["per_prompt"]] == ["a sks box", "a sks box on the beach"]
    assert metrics["guidance_scale"] == family(pipeline_from(str(folders["sd3"]))).guidance == 7.0
    assert all(-1 <= metrics[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
    images = sorted((tmp_path / "e" / "images").iterdir())
    assert len(images) == 4
    pipe = tuneqdm.load_pipeline(adapter=tmp_path / "adapter")
    from PIL import Image

    again = generate(pipe, "a sks box", num_images=2, num_inference_steps=2, seed=0)  # prompt 0: seeds 0, 1
    assert np.array_equal(_pixels(again), _pixels([Image.open(p) for p in images[:2]]))


# ---- bad input: one line each, nothing written ----------------------------------------------------------------------
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Flux folder whose transformer is saved in several safetensors shards with an index."""
    import shutil

    from diffusers import FluxTransformer2DModel

    folder = tiny_flux_pipeline(tmp_path_factory.mktemp("sharded") / "flux")
    model = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer", max_shard_size="60KB")
    assert len(json.loads((folder / "transformer" / INDEX).read_text())["weight_map"]) > 1
    return folder


def _set_dtype(shard, key, dtype):
    """Rewrite the safetensors header of ``shard`` so that ``key`` claims ``dtype``."""
    import struct

    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _damage(folder, how: str) -> str:
    """Damage a copy's transformer checkpoint; returns what the one-line error must contain."""
    transformer = folder / "transformer"
    index = json.loads((transformer / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = min(k for k, v in index["weight_map"].items() if v == shards[1])
    if how == "index names a tensor missing from its shard":
        index["weight_map"]["ghost.weight"] = shards[0]
        (transformer / INDEX).write_text(json.dumps(index))
        return f"shard {transformer / shards[0]} does not match {INDEX} (e.g. 'ghost.weight'): download the model again"
    if how == "shard holds a tensor the index does not list":
        del index["weight_map"][key]
        (transformer / INDEX).write_text(json.dumps(index))
        return f"shard {transformer / shards[1]} does not match {INDEX} (e.g. {key!r}): download the model again"
    if how == "missing shard":
        (transformer / shards[1]).unlink()
        return f"shard {transformer / shards[1]} is missing: download the model again"
    _set_dtype(transformer / shards[1], key, "Q7")  # a dtype safetensors cannot read
    return (f"{transformer / shards[1]}: tensor {key!r} is stored as 'Q7', which tuneqdm cannot read (weights: F64, "
            "F32, F16, BF16, F8_E4M3, F8_E5M2): download the model again")


DAMAGES = ["index names a tensor missing from its shard", "shard holds a tensor the index does not list",
           "missing shard", "unknown dtype"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_dit_checkpoint_is_one_line_and_writes_nothing(sharded, tmp_path, capsys, how):
    import shutil

    folder = shutil.copytree(sharded, tmp_path / "flux")
    expected = _damage(folder, how)
    for command in (["quantize", "--calibrate", "mse"], ["generate", "--prompt", PROMPT, "--num_inference_steps", "1"]):
        out = tmp_path / command[0]
        code, err = _run(capsys, *command, "--pretrained_model_name_or_path", str(folder), "--out", str(out))
        assert code == 2 and len(err) == 1 and err[0].startswith("tuneqdm: error: "), (command, err)
        assert expected in err[0], (command, err)
        assert not out.exists() and list(tmp_path.iterdir()) == [folder]  # no output folder, no temporary


def test_a_weight_of_a_dtype_that_is_no_float_is_refused_by_streaming(sharded, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(sharded, tmp_path / "flux")
    transformer = folder / "transformer"
    weight_map = json.loads((transformer / INDEX).read_text())["weight_map"]
    key = "x_embedder.weight"
    _set_dtype(transformer / weight_map[key], key, "I32")  # same byte size as F32: readable, but no float weight
    code, err = _run(capsys, "quantize", "--calibrate", "mse", "--pretrained_model_name_or_path", str(folder),
                     "--out", str(tmp_path / "q"))
    assert (code, err) == (2, [(f"tuneqdm: error: {transformer / weight_map[key]}: tensor {key!r} is torch.int32, "
                                "not a float weight: download the model again")])
    assert not (tmp_path / "q").exists()


def test_an_unsupported_pipeline_is_refused_by_every_command_before_any_work(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tuneqdm.families import PIPELINES
    from tuneqdm.toy.subjects import write_subject

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a box\n")
    write_subject(5, tmp_path / "s5", n_photos=2)
    expected = [(f"tuneqdm: error: DDPMPipeline is not supported: tuneqdm personalizes {', '.join(PIPELINES)} "
                 "(pass a folder or hub id of one of them)")]
    base = ["--pretrained_model_name_or_path", str(tmp_path / "ddpm")]
    commands = {"generate": ["--prompt", PROMPT], "quantize": ["--calibrate", "mse"],
                "quantize-activations": ["--calib_prompts", str(prompts)],
                "evaluate": ["--instance_data_dir", str(tmp_path / "s5"), "--class_word", "box"]}
    for command, extra in commands.items():
        out = tmp_path / f"out-{command}"
        assert _run(capsys, command, *base, *extra, "--out", str(out)) == (2, expected), command
        assert not out.exists()
    assert _run(capsys, "quantize", *base, "--calib_prompts", str(prompts), "--out", str(tmp_path / "q")) == \
        (2, expected)  # the calibrated (adaround) path too


def test_a_prompt_over_the_t5_limit_is_one_warning_line(folders, tmp_path, capsys):
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    diffusers_log = Records()  # what diffusers' own handler would print
    logging.getLogger("diffusers").addHandler(diffusers_log)
    prompt = "a red house on a very long beach with many trees"  # 38 letters + <start> + </s>: 40 tokens
    try:
        code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders["flux"]), "--prompt",
                         prompt, "--num_images", "1", "--num_inference_steps", "1", "--max_sequence_length", "32",
                         "--out", str(tmp_path / "g"))
    finally:
        logging.getLogger("diffusers").removeHandler(diffusers_log)
    assert code == 0
    assert err == [("tuneqdm: warning: the prompt is 40 T5 tokens, longer than max_sequence_length 32: the model "
                    "reads only its first 32 (shorten it, or raise --max_sequence_length)")]
    assert not [m for m in diffusers_log.messages if "truncated" in m]  # diffusers' CLIP and T5 notices dropped


def test_pixart_bins_sizes_only_where_its_bins_are_defined_and_flow_pipelines_keep_their_scheduler(folders, capsys,
                                                                                                   tmp_path):
    from types import SimpleNamespace

    from tuneqdm.families.pixart import in_resolution_bins as _in_resolution_bins

    def pixart(sample_size):
        return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
                               vae_scale_factor=8)

    assert _in_resolution_bins(pixart(128), None, None)  # PixArt-Σ 1024: its native 1024 x 1024 is a bin
    assert _in_resolution_bins(pixart(128), 768, 1344)
    assert not _in_resolution_bins(pixart(128), 1000, 1000)  # binning would sample another size and resize
    assert not _in_resolution_bins(pixart(16), None, None)  # no bins for this sample size: diffusers would raise

    for name in ("flux", "sd3"):
        code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--prompt", PROMPT,
                         "--scheduler", "ddim", "--out", str(tmp_path / name))
        own = type(pipeline_from(str(folders[name]))).__name__
        message = (f"tuneqdm: error: --scheduler ddim does not apply to {own}, a flow-matching pipeline (it samples "
                   "with its FlowMatchEulerDiscreteScheduler): drop --scheduler")
        assert (code, err) == (2, [message])


def test_a_processor_without_scaled_dot_product_attention_is_reported_and_left_in_full_precision(folders, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    from tuneqdm.ptq.activation_calibration import calibrate_activations
    from tuneqdm.ptq.activations import ActivationConfig

    pipe = pipeline_from(str(folders["pixart"]))
    model = denoiser(pipe)
    model.set_attn_processor(AttnProcessor())  # diffusers' explicit-softmax processor: no call to quantize
    q = calibrate_activations(pipe, [PROMPT], ActivationConfig(groups=2, exclude=family(pipe).first_last),
                              num_inference_steps=2, max_sequence_length=32)
    q.install(model, family(pipe))
    with_a8 = _sample(pipe)
    assert q.skipped_attention == {f"{name} (AttnProcessor)" for name in model.attn_processors}
    q.config.attention = "none"  # the same layers' activations, attention untouched: the same images
    q.remove()
    q.install(model, family(pipe))
    assert np.array_equal(_sample(pipe), with_a8)
