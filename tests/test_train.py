"""`tuneqdm train` on a tiny random SD pipeline: resume is bit-exact, Ctrl-C/NaN/full disk leave usable state, the
memory savers release the VAE and text encoder, prior preservation routes each sample by its own timestep."""

import errno
import gc
import json
import os
import signal
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import tuneqdm
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.train import TrainConfig, Trainer, train
from tuneqdm.train import checkpoint as ckpt
from tuneqdm.tuning import expert_for_timestep



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four 40x40 photos of a 'subject': a two-coloured square at varying places."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.full((40, 40, 3), (30, 90, 200), np.uint8)
        x, y = rng.integers(0, 20, 2)
        a[y:y + 20, x:x + 20] = (230, 40, 40)
        a[y:y + 10, x:x + 20] = (250, 230, 20)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class")


def cfg(base, photos, out, **kw):
    settings = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
                    output_dir=str(out), resolution=32, max_train_steps=4, checkpointing_steps=2, quiet=True,
                    quant_init="minmax")
    settings.update(kw)
    return TrainConfig(**settings)


def prior(class_dir):
    return dict(with_prior_preservation=True, class_prompt="a box", class_data_dir=str(class_dir), num_class_images=2,
                prior_inference_steps=2, train_batch_size=2)


def adapter_bytes(out):
    return (out / "adapter.safetensors").read_bytes()


def test_resume_after_a_kill_and_after_ctrl_c_is_byte_identical(base, photos, class_dir, tmp_path, capsys,
                                                                 monkeypatch):
    train(cfg(base, photos, tmp_path / "a", **prior(class_dir)))
    reference = adapter_bytes(tmp_path / "a")
    assert len(list(class_dir.glob("*.png"))) == 2  # generated once, cached for the runs below

    # a kill after step 3: only checkpoint-2 survives; resuming from it reproduces every bit
    def kill(trainer, step):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg(base, photos, tmp_path / "b", **prior(class_dir)), callbacks=[kill])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [2]
    assert not (tmp_path / "b" / "adapter.safetensors").exists()
    train(cfg(base, photos, tmp_path / "b", resume_from_checkpoint="latest", **prior(class_dir)))
    assert adapter_bytes(tmp_path / "b") == reference
    rows = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "loss", "lr", "s_per_step", "peak_mem_mib", "peak_mem"}
    assert rows[0]["peak_mem"] == "rss" and rows[0]["peak_mem_mib"] > 0 and rows[0]["lr"] == 6e-3  # tuneqdm's default

    # Ctrl-C in step 2: the state after step 1 is written, exit status 130; resuming reproduces every bit
    out = tmp_path / "c"
    argv = ["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--instance_prompt", "a sks box", "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--quiet", "--quant_init", "minmax", "--with_prior_preservation",
            "--class_prompt", "a box", "--class_data_dir", str(class_dir), "--num_class_images", "2",
            "--prior_inference_steps", "2", "--train_batch_size", "2"]
    real_batch = Trainer.batch

    def interrupted(self, micro_step):
        if micro_step == 1:
            raise KeyboardInterrupt
        return real_batch(self, micro_step)

    monkeypatch.setattr(Trainer, "batch", interrupted)
    assert main(argv) == 130
    saved = out / "checkpoints" / "checkpoint-1"
    assert capsys.readouterr().err == (f"tuneqdm: interrupted at step 1; checkpoint {saved}: continue with "
                                       "--resume_from_checkpoint latest\n")
    assert (saved / "state.safetensors").is_file() and json.loads((saved / "state.json").read_text())["step"] == 1
    monkeypatch.setattr(Trainer, "batch", real_batch)
    assert main(argv) == 2  # the folder holds a run: not silently overwritten
    assert "already holds a training run" in capsys.readouterr().err
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert adapter_bytes(out) == reference

    # a real SIGINT in the middle of step 2's optimizer update: held back until the step is complete, then written
    out = tmp_path / "d"
    argv[argv.index("--output_dir") + 1] = str(out)
    calls = []

    def sigint_in_update(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(sigint_in_update)
    try:
        assert main(argv) == 130
    finally:
        handle.remove()
    assert capsys.readouterr().err.startswith(f"tuneqdm: interrupted at step 2; checkpoint {out / 'checkpoints'}")
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert adapter_bytes(out) == reference


def test_lora_and_fp_resume_is_byte_identical(base, photos, tmp_path):
    for method, weights in (("lora", "pytorch_lora_weights.safetensors"),
                            ("fp", "unet/diffusion_pytorch_model.safetensors")):
        train(cfg(base, photos, tmp_path / method / "a", method=method, max_train_steps=3))

        def kill(trainer, step):
            if step == 3:
                raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            train(cfg(base, photos, tmp_path / method / "b", method=method, max_train_steps=3), callbacks=[kill])
        train(cfg(base, photos, tmp_path / method / "b", method=method, max_train_steps=3,
                  resume_from_checkpoint="latest"))
        a, b = (tmp_path / method / x / weights for x in "ab")
        assert a.read_bytes() == b.read_bytes(), method


def test_loss_goes_down_on_held_out_draws(base, photos, tmp_path):
    trainer = Trainer(cfg(base, photos, tmp_path, max_train_steps=20, checkpointing_steps=1000,
                          train_batch_size=2)).setup()  # the default (relative) learning rate

    def held_out():
        with torch.no_grad():
            return float(np.mean([trainer.loss(trainer.batch(10**6 + i)).item() for i in range(16)]))

    before = held_out()
    trainer.run()
    after = held_out()
    assert after < before * 0.99, (before, after)  # measured: 1.1493 -> 1.1223 (-2.3 %)
    cfg_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg_json["method"] == "tuneqdm" and cfg_json["experts"] == 4 and cfg_json["bits"] == 4
    assert cfg_json["instance_prompts"] == ["a sks box"] and cfg_json["base_id"] == str(base.resolve())


def _poison_at(at):
    def poison(trainer, step):
        if step == at:
            with torch.no_grad():
                for p in next(iter(tuneqdm.quantized_layers(trainer.model).values())).s_out:
                    p.fill_(float("nan"))  # every expert of one layer: whatever the next timesteps

    return poison


def test_nan_stops_and_names_the_last_good_checkpoint(base, photos, tmp_path, monkeypatch):
    # weights diverge in step 3: checkpoint-2 is the last good one, step 4's loss is NaN
    with pytest.raises(TuneQDMError) as e:
        train(cfg(base, photos, tmp_path / "a"), callbacks=[_poison_at(3)])
    good = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert str(e.value) == (f"loss became NaN at step 4; stopped, the last good checkpoint is {good} (a resume "
                            "repeats this run's settings): lower --learning_rate and start over with --force")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "a")] == [2]
    assert not (tmp_path / "a" / "adapter.safetensors").exists()
    tensors, _ = ckpt.load(good)
    assert all(torch.isfinite(t).all() for t in ckpt.model_tensors(tensors).values())

    # weights diverge in step 2, when a checkpoint is due: it is not written
    with pytest.raises(TuneQDMError) as e:
        train(cfg(base, photos, tmp_path / "b"), callbacks=[_poison_at(2)])
    assert str(e.value) == ("the trained weights became NaN or infinite at step 2; stopped, no good checkpoint "
                            "exists: lower --learning_rate and start again")
    assert ckpt.list_checkpoints(tmp_path / "b") == []

    # a NaN loss with finite weights (e.g. a bad batch): the state before it is kept as a checkpoint
    real_loss = Trainer.loss
    monkeypatch.setattr(Trainer, "loss", lambda self, b: real_loss(self, b) * (float("nan") if self.step == 2 else 1))
    with pytest.raises(TuneQDMError) as e:
        train(cfg(base, photos, tmp_path / "c", checkpointing_steps=100))
    kept = tmp_path / "c" / "checkpoints" / "checkpoint-2"
    assert str(e.value) == (f"loss became NaN at step 3; stopped, the last good checkpoint is {kept} (a resume "
                            "repeats this run's settings): lower --learning_rate and start over with --force")


def test_full_disk_while_checkpointing_leaves_nothing_partial(base, photos, tmp_path, monkeypatch):
    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(TuneQDMError) as e:
        train(cfg(base, photos, tmp_path))
    target = tmp_path / "checkpoints" / "checkpoint-2"
    assert str(e.value) == (f"cannot write checkpoint {target} (No space left on device); nothing partial was left, "
                            "no earlier checkpoint exists")
    assert list((tmp_path / "checkpoints").iterdir()) == []  # neither the checkpoint nor its temporary folder


def test_memory_savers_release_the_vae_and_text_encoder(base, photos, tmp_path, monkeypatch):
    import tuneqdm.train.setup as setup

    refs = []
    real = setup.assemble

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        refs.append((weakref.ref(pipe.vae), weakref.ref(pipe.text_encoder)))
        return pipe

    monkeypatch.setattr(setup, "assemble", spy)  # where training assembles its pipelines
    trainer = Trainer(cfg(base, photos, tmp_path / "on")).setup()
    gc.collect()
    assert refs and all(r() is None for r in refs[-1])  # quantized method: savers on by default
    assert trainer.tensors.dists["instance"][0].shape == (4, 4, 16, 16)
    trainer.run()

    trainer = Trainer(cfg(base, photos, tmp_path / "off", method="lora")).setup()
    gc.collect()
    assert all(r() is not None for r in refs[-1])  # fp/lora baselines keep them, like diffusers' script
    trainer = Trainer(cfg(base, photos, tmp_path / "lora-on", method="lora", memory_savers=True)).setup()
    gc.collect()
    assert all(r() is None for r in refs[-1])
    with_savers = trainer.loss(trainer.batch(0)).item()
    trainer = Trainer(cfg(base, photos, tmp_path / "lora-off", method="lora", memory_savers=False)).setup()
    assert trainer.loss(trainer.batch(0)).item() == pytest.approx(with_savers, rel=1e-5)  # same numbers either way


def test_prior_preservation_routes_each_sample_by_its_own_timestep(base, photos, class_dir, tmp_path):
    trainer = Trainer(cfg(base, photos, tmp_path, **prior(class_dir))).setup()
    layer = next(iter(tuneqdm.quantized_layers(trainer.model).values()))
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(list(m.router.route.experts)))
    mixed = False
    for m in range(6):
        b = trainer.batch(m)
        assert b["noisy"].shape[0] == 4 and b["n_instance"] == 2  # 2 instance + 2 class samples
        seen.clear()
        loss = trainer.loss(b)
        expected = expert_for_timestep(b["timesteps"], 4, 1000).tolist()
        assert seen[0] == expected
        mixed |= len(set(expected)) > 1
        if m == 0:
            loss.backward()
            got = [p.grad is not None for p in layer.s_out]
            assert got == [k in expected for k in range(4)]  # experts absent from the batch get no gradient
    assert mixed


def test_multi_subject_adapter_and_checkpoint_limit(base, photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (20 * i, 200, 20)).save(other / f"{i}.png")
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps([{"instance_data_dir": str(photos), "instance_prompt": "a sks box"},
                                    {"instance_data_dir": "other", "instance_prompt": "a zwx ball"}]))
    out = tmp_path / "out"
    train(cfg(base, photos, out, instance_data_dir=None, instance_prompt=None, subjects=str(subjects),
              checkpointing_steps=1, checkpoints_total_limit=2, method="peqa", max_train_steps=3,
              validation_prompt="a sks box on the beach", validation_steps=2, num_validation_images=1,
              validation_inference_steps=2))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["instance_prompts"] == ["a sks box", "a zwx ball"] and config["method"] == "peqa"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]  # the limit keeps the newest 2 (none at the end)
    for step in ("step-000002", "step-000003"):  # every --validation_steps, and at the end
        assert Image.open(out / "validation" / step / "000.png").size == (32, 32)
        assert (out / "validation" / step / "prompt.txt").read_text() == "a sks box on the beach\n"


def test_progress_bar_shows_loss_and_speed_unless_quiet(base, photos, tmp_path, capsys):
    argv = ["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--instance_prompt", "a sks box", "--resolution", "32", "--max_train_steps", "2", "--quant_init", "minmax"]
    assert main(argv + ["--output_dir", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "train: 100%" in captured.err and "loss=" in captured.err and "step/s" in captured.err
    assert captured.out == f"trained tuneqdm for 2 steps: {tmp_path / 'a'}\n"
    assert main(argv + ["--output_dir", str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_v_prediction_bases_train_on_the_velocity(base, photos, tmp_path):
    """SD 2.x-style schedulers (prediction_type v_prediction): the target is v, from the same draws as epsilon."""
    import shutil

    v_base = tmp_path / "v-base"
    shutil.copytree(base, v_base)
    sched = v_base / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    eps = Trainer(cfg(base, photos, tmp_path / "eps")).setup().batch(0)
    trainer = Trainer(cfg(v_base, photos, tmp_path / "v"))
    v = trainer.setup().batch(0)
    a = trainer.objective.scheduler.alphas_cumprod[v["timesteps"]].view(-1, 1, 1, 1)
    noise = (1 - a).sqrt() * v["noisy"] + a.sqrt() * v["target"]  # v = sqrt(a) eps - sqrt(1-a) x0
    torch.testing.assert_close(noise, eps["target"], rtol=0, atol=1e-5)
    assert not torch.allclose(v["target"], eps["target"])
