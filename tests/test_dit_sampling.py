"""generate / quantize / quantize-activations / evaluate on diffusion-transformer pipelines (Flux, SD3, PixArt), with
adapters written through the Python API (quantize_ + perturbed scales + the training result writer)."""

import json

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.denoisers import denoiser, family
from tuneqdm.sampling import base_id, generate, pipeline_from
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


def test_adaround_quantize_calibrates_a_dit_layer_by_layer(folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\na blue ball\n")
    out = tmp_path / "q"
    code, err = _run(capsys, "quantize", "--pretrained_model_name_or_path", str(folders["flux"]), "--bits", "4",
                     "--calib_prompts", str(prompts), "--calib_samples", "2", "--num_inference_steps", "2",
                     "--iters", "3", "--batch_size", "4", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "quantization.json").read_text())["calibration"]
    model = load_quantized(out)
    assert record["rows"] == 2 * 2  # 2 images x 2 steps; Flux's distilled guidance: no unconditional half
    blocks = {b["block"]: b["layers"] for b in record["blocks"]}  # outside the timestep embedders: one per layer
    assert sum(blocks.values()) == len(quantized_layers(model)) and blocks["x_embedder"] == 1
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
