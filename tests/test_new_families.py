"""Every family on a tiny random pipeline built offline, table-driven: training's denoiser call is the pipeline's own,
timestep experts route by each family's timestep convention (the table below) in sampling, and a mixed-timestep batch
equals each sample alone. The families added after FLUX.1/SD3/PixArt (Chroma, SANA, Z-Image, Qwen-Image,
FLUX.2 [klein] and [dev]) also go through every command here: train (prior preservation included), byte-identical
resume, generate, evaluate, quantize, quantize-activations and qlora (where diffusers has a LoRA loader), through the CLI (the older families' command tests
are in test_train_dit.py, test_dit_sampling.py and the UNet modules)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import perturb_scales
from tiny_pipelines import (tiny_chroma_pipeline, tiny_flux2_klein_pipeline, tiny_flux2_pipeline, tiny_flux_pipeline,
                            tiny_pixart_pipeline, tiny_qwenimage_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline,
                            tiny_sdxl_pipeline, tiny_zimage_pipeline)

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.families import denoiser, family, guidance_kwargs
from tuneqdm.loading import pipeline_from
from tuneqdm.sampling import generate
from tuneqdm.serialization import fingerprint, load_quantized
from tuneqdm.train import Trainer
from tuneqdm.train.objective import Denoising, encode_prompt
from tuneqdm.tuning import QuantConfig, expert_for_timestep, quantize_
from tuneqdm.tuning.model import quant_state

# prompt tokens: the tiny tokenizers spell prompts letter by letter; FLUX.2 [dev]'s chat puts its system message
# (33 tokens) before the prompt
LENGTHS = {"flux2dev": 64}


def length(name: str) -> int:
    return LENGTHS.get(name, 32)


# family -> (builder, what its denoiser receives for the scheduler's timestep t (units of 0..1000), denoiser calls
# per sampling step with classifier-free guidance on)
FAMILIES = {
    "sd": (tiny_sd_pipeline, lambda t: t, 1),  # integer DDIM timesteps; both guidance halves in one call
    "sdxl": (tiny_sdxl_pipeline, lambda t: t, 1),
    "flux": (tiny_flux_pipeline, lambda t: t / 1000, 1),  # sigma; distilled guidance: one call
    "sd3": (tiny_sd3_pipeline, lambda t: t, 1),  # sigma x 1000
    "pixart": (tiny_pixart_pipeline, lambda t: t, 1),
    "chroma": (tiny_chroma_pipeline, lambda t: t / 1000, 2),  # sigma; guidance by two calls
    "sana": (tiny_sana_pipeline, lambda t: t, 1),  # raw t (x the config's timestep_scale, 1 here); a batch of two
    "zimage": (tiny_zimage_pipeline, lambda t: (1000 - t) / 1000, 1),  # 1 - sigma, as ``t``; a batch of two
    "qwenimage": (tiny_qwenimage_pipeline, lambda t: t / 1000, 2),  # sigma; true CFG by two calls
    "flux2klein": (tiny_flux2_klein_pipeline, lambda t: t / 1000, 2),  # sigma; guidance by two calls
    "flux2dev": (tiny_flux2_pipeline, lambda t: t / 1000, 1),  # sigma; distilled guidance: one call
}
NO_GUIDANCE = {"zimage": 0.0}  # the guidance scale that turns classifier-free guidance off (others: 1.0)
NEW = ["chroma", "sana", "zimage", "qwenimage", "flux2klein", "flux2dev"]  # through every command here
# what generate says with DGQ activations: SANA's self-attention is linear (no softmax to quantize): one line
DGQ_WARNINGS = {"sana": ["tuneqdm: warning: attention left in full precision in 1 layers whose processors compute no "
                         "scaled_dot_product_attention (e.g. transformer_blocks.0.attn1.processor "
                         "(SanaLinearAttnProcessor2_0))"]}
PROMPT = "a red box"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, (build, _, _) in FAMILIES.items()}


def quantized(folder, experts=4):
    pipe = pipeline_from(str(folder))
    quantize_(denoiser(pipe), QuantConfig(bits=4, method="tuneqdm", experts=experts, init="minmax"))
    perturb_scales(denoiser(pipe))
    return pipe


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# how the pipeline turns the denoiser's latent input and output into (B, C, h, w) latents and the flow velocity
LATENT_IN = {"zimage": lambda x: torch.stack(x).squeeze(2)}  # a list of [C, 1, H, W]
VELOCITY_OUT = {"zimage": lambda out: -torch.stack(out).squeeze(2),  # negated by the pipeline
                "pixart": lambda out: out.chunk(2, dim=1)[0]}  # its learned variance dropped


def _calls(model):
    """Every call of ``model``: (its arguments by name, its first output)."""
    import inspect

    signature, calls = inspect.signature(model.forward), []
    model.register_forward_hook(
        lambda m, a, k, out: calls.append((signature.bind(*a, **k).arguments, out[0])), with_kwargs=True)
    return calls


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_training_call_is_the_pipelines_own(folders, name):
    """What training feeds the denoiser (prompt conditioning, layout, timestep) gives the output the pipeline's own
    first denoiser call gave, from the same latent."""
    pipe = pipeline_from(str(folders[name]))
    model = denoiser(pipe)
    calls = _calls(model)
    fam, d = family(pipe), Denoising(pipe, 32)
    guidance = fam.guidance if fam.distilled_guidance else NO_GUIDANCE.get(name, 1.0)  # training's distilled guidance
    pipe(prompt=PROMPT, num_inference_steps=1, guidance_scale=guidance, output_type="latent",
         generator=torch.Generator().manual_seed(0), **fam.call_kwargs(pipe, 32, 32, length(name)))
    arguments, out = calls[0]
    x = next(iter(arguments.values()))  # the latent comes first
    x = LATENT_IN.get(name, lambda v: v)(x)
    t = fam.from_model_timestep(model, arguments[fam.timestep_argument])
    with torch.no_grad():
        mine = d.predict(model, x, t, d.kwargs([encode_prompt(pipe, PROMPT, 32, "cpu", length(name))], "cpu"))
    torch.testing.assert_close(mine, VELOCITY_OUT.get(name, lambda v: v)(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_routes_each_step_by_the_familys_timestep_convention(folders, name):
    _, convention, calls_per_step = FAMILIES[name]
    pipe = quantized(folders[name])
    model, router = denoiser(pipe), quant_state(denoiser(pipe)).router
    argument, calls, routed = family(pipe).timestep_argument, _calls(model), []
    model.register_forward_hook(lambda m, a, out: routed.append(router.route.experts))
    pipe(prompt=PROMPT, num_inference_steps=8, output_type="latent", generator=torch.Generator().manual_seed(0),
         **guidance_kwargs(pipe, None, 1), **family(pipe).call_kwargs(pipe, 32, 32, length(name)))  # the family's own guidance
    t = pipe.scheduler.timesteps.double()
    assert len(calls) == calls_per_step * len(t)
    first = [torch.as_tensor(c[0][argument]).reshape(-1)[0].double() for c in calls]  # UNets: a scalar
    received = torch.stack(first).reshape(len(t), calls_per_step)
    torch.testing.assert_close(received, convention(t)[:, None].expand(-1, calls_per_step).to(received.dtype))
    expected = expert_for_timestep(t, 4, 1000).tolist()  # K = 4 equal intervals of the training noise range
    assert len(set(expected)) >= 2
    assert all(len(set(r)) == 1 for r in routed)  # the guidance halves: one expert
    for call in range(calls_per_step):
        assert [r[0] for r in routed[call::calls_per_step]] == expected


def _inside(t: float, interval: dict, bounds: str) -> bool:
    lo = interval["from"] is None or (t >= interval["from"] if bounds == "[from, to)" else t > interval["from"])
    hi = interval["to"] is None or (t < interval["to"] if bounds == "[from, to)" else t <= interval["to"])
    return lo and hi


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_exported_schedule_routes_each_step_as_sampling_does(folders, name):
    """``tuneqdm export``'s expert schedule (lora_export.json) against the router's own choice while the pipeline
    samples: the switch's route, the recorded rule and intervals of the denoiser's own timestep argument, and the
    recorded per-step runs all give each step the expert sampling gave it (K experts, and S1's interval)."""
    from tuneqdm.export.schedule import route_of, schedule
    from tuneqdm.tuning.routing import Router, install_timestep_hook

    pipe = quantized(folders[name])
    model, router = denoiser(pipe), quant_state(denoiser(pipe)).router
    argument, calls, routed = family(pipe).timestep_argument, _calls(model), []
    model.register_forward_hook(lambda m, a, out: routed.append(router.route.experts[0]))
    s1, s1_routed = Router(QuantConfig(bits=4, method="s1", intervals=((0, 500),))), []  # S1's router, beside
    install_timestep_hook(model, s1)
    model.register_forward_hook(lambda m, a, out: s1_routed.append(s1.route.experts[0]))
    pipe(prompt=PROMPT, num_inference_steps=8, output_type="latent", generator=torch.Generator().manual_seed(0),
         **guidance_kwargs(pipe, None, 1), **family(pipe).call_kwargs(pipe, 32, 32, length(name)))
    steps = [float(torch.as_tensor(c[0][argument]).reshape(-1)[0].double()) for c in calls]
    for cfg, chosen in (({"experts": 4, "num_train_timesteps": 1000, "intervals": ()}, routed),
                        ({"experts": 1, "num_train_timesteps": 1000, "intervals": ((0, 500),)}, s1_routed)):
        sched = schedule(pipe, cfg, steps=8)
        assert len(set(chosen)) >= 2
        assert [route_of(t, sched["routing"], model) for t in steps] == chosen  # the switch
        conversion = json.loads(json.dumps(sched))["training_timestep"]
        u = [conversion["offset"] + conversion["scale"] * t for t in steps]  # the recorded rule, as documented
        if not cfg["intervals"]:
            assert [min(max(int(np.floor(v * 4 / 1000)), 0), 3) for v in u] == chosen
        else:
            assert [0 if 0 <= v < 500 else -1 for v in u] == chosen
        inside = [i for i in sched["intervals"] if "rest" not in i]
        for t, route in zip(steps, chosen):  # the recorded intervals of the denoiser's own argument
            assert [i["route"] for i in inside if _inside(t, i, sched["interval_bounds"])] == ([route] if route >= 0
                                                                                              else [])
        if sched["steps"] is not None:  # the recorded runs of the scheduler's steps (no dynamic shifting)
            per_step = [r["route"] for r in sched["steps"]["runs"] for _ in range(r["first_step"], r["last_step"] + 1)]
            assert per_step == chosen[::len(chosen) // 8]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_mixed_timestep_batch_equals_each_sample_alone(folders, name):
    pipe = quantized(folders[name])
    model, d = denoiser(pipe), Denoising(pipe, 32)
    rows = [encode_prompt(pipe, p, 32, "cpu", length(name)) for p in ("a box", "a red cat")]
    shape = family(pipe).encode_latents(pipe.vae, torch.zeros(1, 3, 32, 32))[0].shape[1:]  # the family's latent
    x = d.to_model_layout(torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)))
    t = torch.tensor([900.0, 100.0])  # training timesteps: experts 3 and 0
    router, routes = quant_state(model).router, []
    model.register_forward_hook(lambda m, a, out: routes.append(list(router.route.experts)))
    with torch.no_grad():
        both = d.predict(model, x, t, d.kwargs(rows, "cpu"))
        assert sorted(e for r in routes for e in r) == [0, 3]  # each sample its own expert (in one call or one each)
        alone = [d.predict(model, x[i:i + 1], t[i:i + 1], d.kwargs(rows[i:i + 1], "cpu")) for i in range(2)]
        other = d.predict(model, x, torch.tensor([600.0, 350.0]), d.kwargs(rows, "cpu"))  # experts 2 and 1
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both, other, atol=1e-4)


def _run(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("name", NEW)
def test_trains_with_prior_preservation_resumes_byte_identically_samples_and_evaluates_through_the_cli(
        folders, photos, tmp_path, monkeypatch, capsys, name):
    def argv(out, *more):
        return ["train", "--pretrained_model_name_or_path", str(folders[name]), "--instance_data_dir", str(photos),
                "--instance_prompt", "a sks box", "--output_dir", str(out), "--resolution", "32",
                "--max_train_steps", "3", "--checkpointing_steps", "2", "--quiet", "--quant_init", "minmax",
                "--max_sequence_length", str(length(name)), "--with_prior_preservation", "--class_prompt", "a box",
                "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2", "--prior_inference_steps",
                "2", *more]

    assert main(argv(tmp_path / "a")) == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # drawn by the base pipeline
    reference = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    real_batch = Trainer.batch

    def interrupted(self, micro_step):
        if micro_step == 2:
            raise KeyboardInterrupt
        return real_batch(self, micro_step)

    monkeypatch.setattr(Trainer, "batch", interrupted)
    assert main(argv(tmp_path / "b")) == 130
    monkeypatch.setattr(Trainer, "batch", real_batch)
    assert main(argv(tmp_path / "b", "--resume_from_checkpoint", "latest")) == 0
    assert (tmp_path / "b" / "adapter.safetensors").read_bytes() == reference
    capsys.readouterr()

    sample = ["--prompt", "a sks box on the beach", "--num_images", "1", "--num_inference_steps", "2",
              "--max_sequence_length", str(length(name)), "--height", "32", "--width", "32"]
    assert _run(capsys, "generate", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "tuned"), *sample)[0] == 0
    assert _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--out",
                str(tmp_path / "base"), *sample)[0] == 0
    tuned, untuned = (Image.open(tmp_path / d / "000.png") for d in ("tuned", "base"))
    assert tuned.size == (32, 32)
    assert tuned.tobytes() != untuned.tobytes()  # the adapter is in the samples
    meta = json.loads((tmp_path / "base" / "generate.json").read_text())
    assert meta["guidance_scale"] == family(pipeline_from(str(folders[name]))).guidance

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    code, err = _run(capsys, "evaluate", "--adapter", str(tmp_path / "a"), "--instance_data_dir", str(photos),
                     "--prompts", str(prompts), "--class_word", "box", "--evaluator", "toy", "--images_per_prompt",
                     "1", "--num_inference_steps", "2", "--max_sequence_length", str(length(name)), "--out", str(tmp_path / "e"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert all(-1 <= metrics[k] <= 1 for k in ("dino", "clip_i", "clip_t"))


@pytest.mark.parametrize("name", NEW)
def test_an_untrained_w8_adapter_samples_within_45_db_of_the_float_pipeline(folders, tmp_path, capsys, name):
    """The issue's target: ``tuneqdm generate`` of an untrained W8 adapter (the base quantized as training does, its
    scales as initialised, written by the training result writer) against the float pipeline's images."""
    from tuneqdm.loading import base_id
    from tuneqdm.train.outputs import save_result

    pipe = pipeline_from(str(folders[name]))
    quantize_(denoiser(pipe), QuantConfig(bits=8, method="tuneqdm", experts=4, init="mse"))
    quant_state(denoiser(pipe)).base_id = base_id(folders[name])
    save_result(denoiser(pipe), tmp_path / "adapter", "tuneqdm", type(pipe),
                {"base_id": base_id(folders[name]), "tuneqdm_method": "tuneqdm"})
    sample = ["--prompt", PROMPT, "--num_images", "2", "--num_inference_steps", "2", "--max_sequence_length", str(length(name))]
    assert _run(capsys, "generate", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "w8"),
                *sample)[0] == 0
    assert _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--out",
                str(tmp_path / "fp"), *sample)[0] == 0
    w8, floating = (_pixels([Image.open(tmp_path / d / f"{i:03d}.png") for i in range(2)]) for d in ("w8", "fp"))
    assert psnr(w8, floating) >= 45


@pytest.mark.parametrize("name", NEW)
def test_quantize_and_quantize_activations_through_the_cli(folders, tmp_path, capsys, name):
    out = tmp_path / "q"
    assert _run(capsys, "quantize", "--pretrained_model_name_or_path", str(folders[name]), "--bits", "8",
                "--calibrate", "mse", "--out", str(out)) == (0, [])
    in_memory = pipeline_from(str(folders[name]))
    quantize_(denoiser(in_memory), QuantConfig(bits=8, method="peqa", init="mse"))
    assert fingerprint(load_quantized(out)) == fingerprint(denoiser(in_memory))  # streamed: the same integers
    code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--quantized_base",
                     str(out), "--prompt", PROMPT, "--num_images", "1", "--num_inference_steps", "2",
                     "--max_sequence_length", str(length(name)), "--out", str(tmp_path / "g"))
    assert code == 0, err
    images = _pixels([Image.open(tmp_path / "g" / "000.png")])
    assert np.array_equal(images, _pixels(generate(in_memory, PROMPT, num_inference_steps=2, max_sequence_length=length(name))))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\n")
    code, err = _run(capsys, "quantize-activations", "--pretrained_model_name_or_path", str(folders[name]),
                     "--calib_prompts", str(prompts), "--num_inference_steps", "2", "--max_sequence_length", str(length(name)),
                     "--groups", "2", "--out", str(tmp_path / "act"))
    assert code == 0, err
    meta = json.loads((tmp_path / "act" / "activations.json").read_text())
    assert len(meta["timesteps"]) == 2 and meta["exclude"] == list(family(in_memory).first_last)
    from tuneqdm.ptq.activation_calibration import load_activations
    from tuneqdm.ptq.attention import WrappedAttnProcessor

    q = load_activations(tmp_path / "act").install(denoiser(in_memory), family(in_memory))
    attention = [m for m in denoiser(in_memory).modules() if hasattr(m, "set_processor")]  # Z-Image's: no registry
    assert attention and all(isinstance(m.processor, WrappedAttnProcessor) for m in attention)  # DGQ's softmax
    q.remove()
    assert not any(isinstance(m.processor, WrappedAttnProcessor) for m in attention)
    code, err = _run(capsys, "generate", "--pretrained_model_name_or_path", str(folders[name]), "--activation_bits",
                     "8", "--groups", "2", "--activations", str(tmp_path / "act"), "--prompt", PROMPT,
                     "--num_images", "1", "--num_inference_steps", "2", "--max_sequence_length", str(length(name)), "--out",
                     str(tmp_path / "a8"))
    assert (code, err) == (0, DGQ_WARNINGS.get(name, []))


ADAROUND_BLOCKED = {  # the families whose denoiser inputs AdaRound's block reconstruction cannot batch: one line
    "zimage": "Z-Image: its transformer takes its latents and captions as lists of per-sample tensors, each caption at "
              "its own length",
    "qwenimage": "Qwen-Image: its transformer takes each prompt at its own length (so do its blocks' text tokens and "
                 "rotary embeddings)"}


@pytest.mark.parametrize("name", ["chroma", "zimage", "qwenimage"])  # Chroma: guidance by two calls per step
def test_adaround_calibrates_every_step_of_a_two_call_guidance_or_refuses_in_one_line(folders, tmp_path, capsys, name):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "q"
    prompts.write_text("a red box\na blue ball\n")
    code, err = _run(capsys, "quantize", "--pretrained_model_name_or_path", str(folders[name]), "--bits", "4",
                     "--calib_prompts", str(prompts), "--calib_samples", "2", "--num_inference_steps", "2",
                     "--iters", "3", "--batch_size", "4", "--out", str(out))
    if name in ADAROUND_BLOCKED:
        assert (code, err) == (2, [f"tuneqdm: error: --calibrate adaround is not available for "
                                   f"{ADAROUND_BLOCKED[name]}, which the block-by-block reconstruction cannot batch "
                                   "yet; use --calibrate mse (or minmax)"])
        assert not out.exists()
        return
    assert code == 0, err
    record = json.loads((out / "quantization.json").read_text())["calibration"]
    assert record["steps"] == [0, 1] and record["rows"] == 2 * 2 * 2  # 2 images x 2 steps x both guidance calls
    assert all(b["adaround"] <= b["round_to_nearest"] * 1.5 for b in record["blocks"])


@pytest.mark.parametrize("name", NEW)
def test_qlora_where_diffusers_has_a_lora_loader(folders, photos, tmp_path, capsys, name):
    from safetensors.torch import load_file

    pipeline_class = type(pipeline_from(str(folders[name])))
    out = tmp_path / "qlora"
    code, err = _run(capsys, "train", "--pretrained_model_name_or_path", str(folders[name]), "--instance_data_dir",
                     str(photos), "--instance_prompt", "a sks box", "--output_dir", str(out), "--method", "qlora",
                     "--max_train_steps", "2", "--quant_init", "minmax", "--max_sequence_length", str(length(name)))
    if not hasattr(pipeline_class, "save_lora_weights"):
        assert code == 2 and err[-1].endswith("train a scale method (e.g. --method tuneqdm) or fp")
        return
    assert code == 0, err
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    pipe = tuneqdm.load_pipeline(adapter=out)  # the quantized base of training, the LoRA beside its integers
    assert "default_0" in pipe.get_list_adapters()["transformer"]
    code, err = _run(capsys, "generate", "--adapter", str(out), "--prompt", PROMPT, "--num_images", "1",
                     "--num_inference_steps", "2", "--max_sequence_length", str(length(name)), "--out", str(tmp_path / "g"))
    assert code == 0, err


def _pipeline_class(folder) -> str:
    return json.loads((folder / "model_index.json").read_text())["_class_name"]


@pytest.mark.parametrize("name", ["zimage", "flux2klein", "flux2dev"])  # the families that read a chat template
def test_a_tokenizer_without_the_chat_template_its_family_reads_is_one_line(tmp_path, photos, capsys, name):
    folder = FAMILIES[name][0](tmp_path / name, chat_template=None)
    expected = [f"tuneqdm: error: the tokenizer of this {_pipeline_class(folder)} has no chat template, which its "
                "prompts are read in: use the tokenizer the model was published with (tokenizer/chat_template.jinja)"]
    assert _run(capsys, "generate", "--pretrained_model_name_or_path", str(folder), "--prompt", PROMPT,
                "--out", str(tmp_path / "g")) == (2, expected)
    assert _run(capsys, "train", "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(photos),
                "--instance_prompt", "a sks box", "--output_dir", str(tmp_path / "t")) == (2, expected)
    assert not (tmp_path / "g").exists() and not (tmp_path / "t" / "adapter.safetensors").exists()


@pytest.mark.parametrize("name, depth, layers", [("flux2klein", 18, "9, 18, 27"), ("flux2dev", 20, "10, 20, 30")])
def test_a_text_encoder_shallower_than_the_layers_its_family_taps_is_one_line(tmp_path, capsys, name, depth, layers):
    folder = FAMILIES[name][0](tmp_path / name, encoder_layers=depth)
    expected = [f"tuneqdm: error: the text encoder of this {_pipeline_class(folder)} has {depth} layers, but its "
                f"prompts are read at hidden layers {layers}: use the encoder the model was published with"]
    assert _run(capsys, "generate", "--pretrained_model_name_or_path", str(folder), "--prompt", PROMPT,
                "--out", str(tmp_path / "g")) == (2, expected)
    assert not (tmp_path / "g").exists()
