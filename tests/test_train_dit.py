"""`tuneqdm train` on tiny Flux, SD3 and PixArt-Σ pipelines: the model's own timestep convention routes each sample
to its expert (in training and in the pipeline's sampling loop), resume is byte-identical through the CLI, the text
encoders and the VAE are released before the first step, prior preservation works, long prompts warn once."""

import gc
import json
import logging
import warnings
import weakref

import pytest
import torch

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.train import TrainConfig, Trainer, train
from tuneqdm.errors import TrainWarning
from tuneqdm.train.objective import Denoising, FlowObjective, encode_prompt
from tuneqdm.tuning import expert_for_timestep
from tuneqdm.tuning.model import quant_state

from tiny_models import perturb_scales
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "pixart": tiny_pixart_pipeline}
FAMILIES = tuple(BUILDERS)
L = 32  # T5 tokens: the tiny tokenizer spells prompts letter by letter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


def load(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def cfg(base, photos, out, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
                    output_dir=str(out), resolution=32, max_train_steps=3, checkpointing_steps=2, quiet=True,
                    quant_init="minmax", max_sequence_length=L)
    settings.update(kw)
    return TrainConfig(**settings)


def quantized_pipe(folder, experts=4):
    pipe = load(folder)
    tuneqdm.quantize_(pipe.transformer, tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=experts, init="minmax"))
    perturb_scales(pipe.transformer)
    return pipe


def test_flux_packing_helper_is_the_pipelines_own(folders):
    """``FluxPipeline._pack_latents`` (used because diffusers has no public twin) packs as ``prepare_latents`` does."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = load(folders["flux"])
    packed, ids = pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(3))
    raw = randn_tensor((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    d = Denoising(pipe, 32)
    assert torch.equal(d.to_model_layout(raw), packed)
    assert torch.equal(d.img_ids, ids) and d.guidance == 3.5


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_timesteps_in_a_batch_equal_each_sample_alone(folders, name):
    pipe = quantized_pipe(folders[name])
    d = Denoising(pipe, 32)
    cond = d.kwargs([encode_prompt(pipe, p, 32, "cpu", L) for p in ("a box", "a red cat")], "cpu")
    x = d.to_model_layout(torch.randn(2, 4, 16, 16))
    t = torch.tensor([900.0, 100.0])  # training timesteps (sigma 0.9 and 0.1 on the flow models): experts 3 and 0
    router = quant_state(pipe.transformer).router
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)
    with torch.no_grad():
        both = d.predict(pipe.transformer, x, t, cond)
        assert router.route.experts == [3, 0]
        alone = [d.predict(pipe.transformer, x[i:i + 1], t[i:i + 1],
                           {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in cond.items()})
                 for i in range(2)]
        other = d.predict(pipe.transformer, x, torch.tensor([600.0, 350.0]), cond)  # experts 2 and 1
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both, other, atol=1e-4)
    # the denoiser gets the timestep as its pipeline passes it: Flux t/1000 (= sigma), SD3 sigma x 1000, PixArt t
    assert seen[0].tolist() == pytest.approx([0.9, 0.1] if name == "flux" else [900.0, 100.0])


@pytest.mark.parametrize("name", (*FAMILIES, "flux-dynamic-shift"))
def test_sampling_routes_each_step_to_the_expert_of_its_timestep(folders, name):
    pipe = quantized_pipe(folders[name.split("-")[0]])
    if name == "flux-dynamic-shift":  # FLUX.1-dev's scheduler: the shift depends on the image's token count
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True,
                                                                     base_shift=0.5, max_shift=1.15)
    router = quant_state(pipe.transformer).router
    routed = []
    pipe.transformer.register_forward_hook(lambda m, a, out: routed.append(router.route.experts))
    extra = {"use_resolution_binning": False} if name == "pixart" else {}
    pipe("a box", num_inference_steps=8, height=32, width=32, max_sequence_length=L, output_type="latent",
         generator=torch.Generator().manual_seed(0), **extra)
    # the scheduler's timesteps of this run (shifted sigmas x 1000 on the flow models) onto 4 equal intervals of 0..T
    expected = expert_for_timestep(pipe.scheduler.timesteps, 4, pipe.scheduler.config.num_train_timesteps).tolist()
    assert len(set(expected)) >= 2
    assert [r[0] for r in routed] == expected
    assert all(len(set(r)) == 1 for r in routed)  # both halves of classifier-free guidance: the same expert


def test_flow_objective_is_rectified_flow_on_the_schedulers_sigmas(folders):
    pipe = load(folders["sd3"])
    for scheme in ("logit_normal", "none"):
        obj = FlowObjective(pipe.scheduler.config, scheme)
        t = obj.timesteps(4096, torch.Generator().manual_seed(0))
        assert set(t.tolist()) <= set(obj.scheduler.timesteps.tolist())  # shift 3 included
        sigma = t / 1000
        if scheme == "logit_normal":  # sigmoid(N(0, 1)), shifted: the middle of the range dominates
            centred = (sigma - 0.5).abs().mean()
        else:
            assert (sigma - 0.5).abs().mean() > centred
        x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        noisy, target = obj.noisy_and_target(x0, noise, t[:2])
        s = sigma[:2].reshape(2, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise)
        torch.testing.assert_close(target, noise - x0)


def _spy_components(monkeypatch):
    from tuneqdm.train import setup

    refs, real = [], setup.assemble

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        names = [n for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None)]
        refs.append({n: weakref.ref(getattr(pipe, n)) for n in names})
        return pipe

    monkeypatch.setattr(setup, "assemble", spy)  # where training assembles its pipelines
    return refs


@pytest.mark.parametrize("name", FAMILIES)
def test_text_encoders_and_vae_are_released_before_the_first_step(folders, photos, tmp_path, monkeypatch, name):
    refs = _spy_components(monkeypatch)
    trainer = Trainer(cfg(folders[name], photos, tmp_path / "out")).setup()
    gc.collect()
    encoders = {"flux": {"vae", "text_encoder", "text_encoder_2"}, "pixart": {"vae", "text_encoder"},
                "sd3": {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}}[name]
    assert set(refs[-1]) == encoders and all(r() is None for r in refs[-1].values())
    cond = trainer.tensors.conditioning([0])  # cached: CLIP and T5 embeddings, the pooled ones, PixArt's T5 mask
    assert cond["encoder_hidden_states"].shape[:2] == (1, {"flux": L, "sd3": 16 + L, "pixart": L}[name])
    if name == "pixart":
        assert cond["encoder_attention_mask"].shape == (1, L)
    else:
        assert cond["pooled_projections"].shape == (1, 32)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_prompt_longer_than_the_t5_limit_warns_once(folders, photos, tmp_path):
    import diffusers

    long_prompt = "a sks box on a table in a garden"  # the tiny tokenizer: one T5 token per letter
    logged, verbosity = _Records(), diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()  # quiet runs before this one turned it down
    logging.getLogger("diffusers").addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(cfg(folders["flux"], photos, tmp_path / "out", instance_prompt=long_prompt,
                        max_sequence_length=20, quiet=False)).setup()
    finally:
        logging.getLogger("diffusers").removeHandler(logged)
        diffusers.utils.logging.set_verbosity(verbosity)
    assert not [m for m in logged.messages if "truncated" in m]  # diffusers' own message would repeat it
    t5 = [str(w.message) for w in caught if issubclass(w.category, TrainWarning) and "T5" in str(w.message)]
    assert len(t5) == 1
    assert t5[0].startswith(f"the prompt {long_prompt!r} is longer than the T5 limit of 20 tokens")
    assert t5[0].endswith("it is truncated, the encoder does not see 'garden'")  # 24 letters + 2 special tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_prior_preservation_routes_each_sample_by_its_own_timestep(folders, photos, tmp_path, name):
    classes = tmp_path / "class"
    trainer = Trainer(cfg(folders[name], photos, tmp_path / "out", with_prior_preservation=True, class_prompt="a box",
                          class_data_dir=str(classes), num_class_images=2, prior_inference_steps=2,
                          train_batch_size=2, max_train_steps=2)).setup()
    assert len(list(classes.glob("*.png"))) == 2  # generated by the base pipeline at the training size
    router = quant_state(trainer.model).router
    batch = trainer.batch(1)
    assert len(batch["timesteps"]) == 4 and batch["n_instance"] == 2
    loss = trainer.loss(batch)
    assert torch.isfinite(loss)
    assert router.route.experts == expert_for_timestep(batch["timesteps"], 4, 1000).tolist()
    trainer.run()
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("name", FAMILIES)
def test_each_dit_trains_resumes_byte_identically_samples_and_evaluates_through_the_cli(folders, photos, tmp_path,
                                                                                      monkeypatch, capsys, name):
    """The issue's end-to-end check: train, resume after an interruption (same bytes), generate and evaluate, all
    through the CLI on a tiny random Flux, SD3 and PixArt-Σ folder."""
    def argv(out, *more):
        return ["train", "--pretrained_model_name_or_path", str(folders[name]), "--instance_data_dir", str(photos),
                "--instance_prompt", "a sks box", "--output_dir", str(out), "--resolution", "32",
                "--max_train_steps", "4", "--checkpointing_steps", "2", "--quiet", "--quant_init", "minmax",
                "--max_sequence_length", str(L), "--train_batch_size", "2", *more]

    assert main(argv(tmp_path / "a")) == 0
    reference = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    real_batch = Trainer.batch

    def interrupted(self, micro_step):
        if micro_step == 3:
            raise KeyboardInterrupt
        return real_batch(self, micro_step)

    monkeypatch.setattr(Trainer, "batch", interrupted)
    assert main(argv(tmp_path / "b")) == 130
    monkeypatch.setattr(Trainer, "batch", real_batch)
    assert main(argv(tmp_path / "b", "--resume_from_checkpoint", "latest")) == 0
    assert (tmp_path / "b" / "adapter.safetensors").read_bytes() == reference
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if name != "pixart":  # a flow model: another sigma sampling is another run, refused on resume in one line
        assert config["settings"]["weighting_scheme"] == "logit_normal"
        assert main(argv(tmp_path / "b", "--resume_from_checkpoint", "latest", "--weighting_scheme", "none",
                         "--max_train_steps", "4")) == 2
    capsys.readouterr()

    sample = ["--prompt", "a sks box on the beach", "--num_images", "1", "--num_inference_steps", "2", "--height", "32",
              "--width", "32", "--max_sequence_length", str(L), "--quiet"]
    assert main(["generate", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "tuned"), *sample]) == 0
    assert main(["generate", "--pretrained_model_name_or_path", str(folders[name]), "--out", str(tmp_path / "base"),
                 *sample]) == 0
    tuned, untuned = (sorted((tmp_path / d).glob("*.png")) for d in ("tuned", "base"))
    assert len(tuned) == len(untuned) == 1
    from PIL import Image

    assert Image.open(tuned[0]).size == (32, 32)
    assert Image.open(tuned[0]).tobytes() != Image.open(untuned[0]).tobytes()  # the adapter is in the samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    assert main(["evaluate", "--adapter", str(tmp_path / "a"), "--instance_data_dir", str(photos), "--prompts",
                 str(prompts), "--class_word", "box", "--evaluator", "toy", "--images_per_prompt", "1",
                 "--num_inference_steps", "2", "--max_sequence_length", str(L), "--quiet",
                 "--out", str(tmp_path / "e")]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert all(-1 <= metrics[k] <= 1 for k in ("dino", "clip_i", "clip_t"))


def test_sd3_and_pixart_train_with_each_scale_method(folders, photos, tmp_path):
    # s1 in [0, 10): the drawn sigmas miss it, so every step routes to the frozen base scales (no gradient at all,
    # which used to stop the run in backward)
    for name, method, extra in (("sd3", "peqa", {}), ("sd3", "s1", {"s1_intervals": "0-10"}),
                                ("pixart", "mcsu", {}), ("flux", "tas", {"weighting_scheme": "none"})):
        out = train(cfg(folders[name], photos, tmp_path / f"{name}-{method}", method=method, max_train_steps=2,
                        **extra))
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
        assert json.loads((out / "adapter_config.json").read_text())["method"] == method


def test_a_saved_quantized_transformer_trains_as_the_base_with_checkpointing(folders, photos, tmp_path):
    """--quantized_base on a DiT: the same integers as quantizing in the run, so the same adapter, bit for bit
    (gradient checkpointing on: the recomputed forward routes as the first one did)."""
    pipe = load(folders["sd3"])
    tuneqdm.quantize_(pipe.transformer, tuneqdm.QuantConfig(bits=4, method="peqa", init="minmax"))
    tuneqdm.save_quantized(pipe.transformer, tmp_path / "qbase")
    runs = {}
    for name, extra in (("quantized-here", {}), ("saved-base", {"quantized_base": str(tmp_path / "qbase")})):
        out = train(cfg(folders["sd3"], photos, tmp_path / name, max_train_steps=2, gradient_checkpointing=True,
                        **extra))
        runs[name] = (out / "adapter.safetensors").read_bytes()
    assert runs["quantized-here"] == runs["saved-base"]


def test_lora_qlora_and_fp_on_transformers(folders, photos, tmp_path, capsys):
    from safetensors.torch import load_file

    for name, method in (("flux", "lora"), ("sd3", "qlora")):
        out = train(cfg(folders[name], photos, tmp_path / f"{name}-{method}", method=method, max_train_steps=2))
        weights = load_file(out / "pytorch_lora_weights.safetensors")
        assert weights and all(k.startswith("transformer.") for k in weights)
        assert {k.split(".")[-4] for k in weights if "lora.down" in k} >= {"to_q", "to_k", "to_v"}
        pipe = load(folders[name])
        pipe.load_lora_weights(out)  # diffusers' own loader takes it
        assert "default_0" in pipe.get_list_adapters()["transformer"]
    out = train(cfg(folders["pixart"], photos, tmp_path / "pixart-fp", method="fp", max_train_steps=2))
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"
    tuned = tuneqdm.load_pipeline(adapter=out).transformer  # the fine-tuned transformer, of the class it names
    assert type(tuned).__name__ == "PixArtTransformer2DModel"
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                     load(folders["pixart"]).transformer.state_dict().values()))
    argv = ["train", "--pretrained_model_name_or_path", str(folders["pixart"]), "--instance_data_dir", str(photos),
            "--instance_prompt", "a sks box", "--output_dir", str(tmp_path / "pixart-lora"), "--method", "lora"]
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith(
        "--method lora: diffusers has no LoRA loader for PixArtSigmaPipeline, so its LoRA could not be used: train a "
        "scale method (e.g. --method tuneqdm) or fp\n")


def test_only_the_settings_a_base_uses_are_part_of_a_runs_identity(folders, base, photos, tmp_path):
    """A resume compares these: the flow settings on flow models only, the T5 length on T5 pipelines only (so a
    UNet run made before they existed still resumes)."""
    def settings(folder, **kw):
        return Trainer(cfg(folder, photos, tmp_path, **kw))._model_settings()

    assert settings(base, weighting_scheme="none") == {}
    assert settings(folders["pixart"]) == {"max_sequence_length": L}
    assert settings(folders["sd3"], weighting_scheme="none", max_sequence_length=None) == {
        "weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": None,
        "max_sequence_length": None}


def test_the_fidelity_benchmark_runs_on_a_dit(folders, tmp_path):
    """`tuneqdm benchmark fidelity --pretrained_model_name_or_path <Flux folder>`: a trained and an untuned cell,
    scored, at the model's native size."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\n")
    assert main(["benchmark", "fidelity", "--pretrained_model_name_or_path", str(folders["flux"]), "--subjects", "0",
                 "--methods", "tuneqdm,floor", "--max_train_steps", "2", "--prompts", str(prompts),
                 "--images_per_prompt", "1", "--num_inference_steps", "2", "--out", str(tmp_path / "fid"),
                 "--quiet"]) == 0
    rows = json.loads((tmp_path / "fid" / "fidelity.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"tuneqdm", "floor"}
    trained = next((tmp_path / "fid").rglob("training.json"))
    assert json.loads(trained.read_text())["resolution"] == 32  # the tiny Flux's native size
