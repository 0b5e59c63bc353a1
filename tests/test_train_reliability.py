"""What a hostile user or a flaky machine does to `tuneqdm train` (issue 16, training part): folders replaced as one
unit, resumes that compare resolved settings, settings checked before the model loads, non-finite results refused,
failed writes that keep a checkpoint, SIGTERM and repeated signals, stale temporaries, huge photos."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import tuneqdm
from tuneqdm import files
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.train import TrainConfig, TrainWarning, train
from tuneqdm.train import checkpoint as ckpt
from tuneqdm.train.data import load_folder



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.full((40, 40, 3), (30, 90, 200), np.uint8)
        x, y = rng.integers(0, 20, 2)
        a[y:y + 20, x:x + 20] = (230, 40, 40)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def settings(base, photos, out, **kw):
    s = dict(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
             output_dir=str(out), resolution=32, max_train_steps=4, checkpointing_steps=2, quiet=True,
             quant_init="minmax")
    s.update(kw)
    return s


def argv_of(s: dict) -> list[str]:
    out = ["train"]
    for k, v in s.items():
        if v is True:
            out.append(f"--{k}")
        elif v not in (None, False):
            out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def reference(base, photos, tmp_path_factory):
    """An uninterrupted 4-step run: what every resumed run below must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "out"
    train(TrainConfig(**settings(base, photos, out)))
    return out


def killed_at(step):
    def kill(trainer, s):
        if s == step:
            raise RuntimeError("killed")

    return kill


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- atomic_dir: whole-folder swap, umask ---------------------------------------------------------------------------
def _folder(path, files_):
    path.mkdir()
    for name, text in files_.items():
        (path / name).write_text(text)


def _contents(path):
    return {p.name: p.read_text() for p in path.iterdir()} if path.exists() else None


def test_atomic_dir_replaces_the_folder_as_one_unit_at_every_point_of_death(tmp_path, monkeypatch):
    old, new = {"weights": "old", "config": "old", "extra": "old"}, {"weights": "new", "config": "new"}
    real_replace = os.replace
    for death in range(4):  # the process dies at the 1st, 2nd, 3rd rename (3: it lives)
        target = tmp_path / f"t{death}"
        _folder(target, old)
        calls = []

        def replace(src, dst, death=death, calls=calls):
            calls.append(1)
            if len(calls) > death and death < 3:
                raise OSError("died")  # this rename and every later one (a dead process renames nothing)
            return real_replace(src, dst)

        monkeypatch.setattr(files.os, "replace", replace)
        try:
            with files.atomic_dir(target) as tmp:
                for name, text in new.items():
                    (tmp / name).write_text(text)
        except OSError:
            pass
        monkeypatch.setattr(files.os, "replace", real_replace)
        assert _contents(target) in (old, new, None), death  # never new weights beside an old config
        if _contents(target) is None:  # the old folder waits under a temporary name: the next start restores it
            parked = next(tmp_path.glob(f".t{death}.old-{os.getpid()}-*"))
            parked.rename(parked.with_name(parked.name.replace(f"-{os.getpid()}-", f"-{dead_pid()}-")))
            files.remove_stale_temporaries(tmp_path)
            assert _contents(target) == old, death
    assert _contents(tmp_path / "t3") == new  # "extra" went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t0", "t1", "t2", "t3"]


def test_write_file_atomically_keeps_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "table.md"
    target.write_text("old")
    previous = os.umask(0o077)
    try:
        assert files.write_file_atomically(target, "new ü") == target
        assert target.read_bytes() == "new ü".encode() and target.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_file_atomically(target, b"half")
    assert target.read_bytes() == "new ü".encode() and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_glibc_mmap_threshold_is_pinned_unless_the_user_set_it(monkeypatch):
    """Pinning trades step time for peak memory; a user who set glibc's own MALLOC_MMAP_THRESHOLD_ chose otherwise,
    and training must not override it (the C library is not even opened)."""
    import ctypes

    from tuneqdm import memory

    opened = []

    def fake_cdll(*args, **kwargs):
        opened.append(args)
        raise OSError("no libc in this test")

    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    monkeypatch.setenv(memory.MMAP_THRESHOLD_ENV, "33554432")
    assert memory.pin_mmap_threshold() is False and opened == []
    monkeypatch.delenv(memory.MMAP_THRESHOLD_ENV)
    assert memory.pin_mmap_threshold() is False
    assert len(opened) == (1 if sys.platform.startswith("linux") else 0)


def test_atomic_dir_keeps_carried_entries_and_honours_the_umask(tmp_path):
    target = tmp_path / "out"
    _folder(target, {"adapter": "old", "log": "rows"})
    previous = os.umask(0o022)
    try:
        with files.atomic_dir(target, carry=lambda name: name != "adapter") as tmp:
            save_file({"x": torch.zeros(2)}, tmp / "adapter")
            (tmp / "sub").mkdir()
        assert sorted(p.name for p in target.iterdir()) == ["adapter", "log", "sub"]
        assert (target / "log").read_text() == "rows"
        modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
        assert target.stat().st_mode & 0o777 == 0o755 and modes == {"adapter": 0o644, "log": 0o644, "sub": 0o755}
        os.umask(0o077)
        with files.atomic_dir(tmp_path / "private") as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "private" / "f").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, me = dead_pid(), os.getpid()
    names = [f".out.tmp-{dead}-abc", f".out.tmp-{me}-live", ".out.tmp-k2j3h4_x", f".other.tmp-{dead}-x", "out"]
    for n in names:
        (tmp_path / n).mkdir()
    removed = files.remove_stale_temporaries(tmp_path, "out")
    assert sorted(p.name for p in removed) == sorted([f".out.tmp-{dead}-abc", ".out.tmp-k2j3h4_x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.tmp-{me}-live", f".other.tmp-{dead}-x", "out"])


# ---- settings checked before the model loads ---------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--lr_scheduler", "polynomial", "--lr_power", "-1"],
     "--lr_power must be a positive finite number for --lr_scheduler polynomial, got -1.0"),
    (["--lr_scheduler", "polynomial", "--lr_warmup_steps", "400"],
     "--lr_warmup_steps (400) must be below --max_train_steps (400) for --lr_scheduler polynomial"),
    (["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"],
     "--lr_scheduler polynomial decays to 1e-07: --learning_rate must be above it, got 1e-08"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1), got 1.5"),
    (["--adam_beta2", "-0.1"], "--adam_beta2 must be in [0, 1), got -0.1"),
    (["--adam_epsilon", "-1"], "--adam_epsilon must be a positive finite number, got -1.0"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number >= 0, got nan"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295, got -1"),
    (["--seed", "99999999999"], "--seed must be an integer from 0 to 4294967295, got 99999999999"),
    (["--learning_rate", "inf"], "--learning_rate must be finite, got inf"),
    (["--method", "peqa", "--experts", "4"], "--method peqa uses one scale set: --experts must be 1, got 4"),
    (["--method", "tas", "--experts", "1"], "--method tas needs --experts 2 or more, got 1"),
    (["--method", "lora", "--experts", "2"], "--experts applies to the scale methods, not --method lora"),
    (["--method", "s1", "--s1_intervals", "300-100"], "--s1_intervals '300-100': each interval A-B needs A < B"),
])
def test_bad_optimizer_schedule_seed_and_method_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["train", "--instance_data_dir", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"


def test_s1_intervals_beyond_the_base_timesteps_are_refused_before_the_model_loads(base, photos, tmp_path, capsys,
                                                                                   monkeypatch):
    from tuneqdm.train import Trainer

    monkeypatch.setattr(Trainer, "_accelerator", lambda self: pytest.fail("got past the checks that need no model"))
    argv = argv_of(settings(base, photos, tmp_path / "out", method="s1", s1_intervals="0-250,900-1200"))
    assert main(argv) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --s1_intervals '0-250,900-1200': this base has 1000 "
                                       "timesteps, so an interval must end at 1000 or below\n")


def test_a_missing_resume_checkpoint_is_reported_before_the_model_loads(tmp_path, photos, capsys):
    no_model = tmp_path / "no-model"  # loading it would fail: the resume error must come first
    argv = argv_of(settings(no_model, photos, tmp_path / "out")) + ["--resume_from_checkpoint", str(tmp_path / "c")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: --resume_from_checkpoint {tmp_path / 'c'}: no checkpoint "
                                       "there (state.json is missing)\n")



def test_a_second_run_in_one_process_must_keep_its_mixed_precision(photos, tmp_path):
    """accelerate keeps one state per process; tuneqdm reuses it (no private reset), so a change is one line."""
    from dataclasses import replace

    from accelerate import Accelerator

    from tuneqdm.train import Trainer

    Accelerator(cpu=True)  # what an earlier run in this process leaves behind: accelerate's state, precision "no"
    cfg = TrainConfig(instance_data_dir=str(photos), instance_prompt="a sks box", output_dir=str(tmp_path / "out"),
                      mixed_precision="bf16")
    with pytest.raises(TuneQDMError) as e:
        Trainer(cfg)._accelerator()
    assert str(e.value) == ("--mixed_precision bf16: this process already trained with --mixed_precision no, and "
                            "accelerate keeps one per process: run this training in a new process (e.g. the tuneqdm "
                            "train command)")
    assert Trainer(replace(cfg, mixed_precision="no"))._accelerator().mixed_precision == "no"

# ---- resume compares resolved settings; a finished run is done; the log has no duplicate rows -----------------
def test_resume_refuses_changed_settings_and_accepts_defaults_spelled_out(base, photos, reference, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        train(TrainConfig(**settings(base, photos, out)), callbacks=[killed_at(3)])
    good = out / "checkpoints" / "checkpoint-2"
    moved = tmp_path / "moved-photos"  # the same photos elsewhere: the same subject
    shutil.copytree(photos, moved)
    other = tmp_path / "other-photos"
    shutil.copytree(photos, other)
    Image.new("RGB", (40, 40), (1, 2, 3)).save(other / "0.png")
    tail = ": resume with the same settings, or start over with --force"
    for change, message in [
        (dict(learning_rate=5e-3), f"was made with another learning_rate (0.006; this run: 0.005){tail}"),
        (dict(instance_prompt="a zwx box"),
         f"was made with another instance_prompts (['a sks box']; this run: ['a zwx box']){tail}"),
        (dict(lr_scheduler="cosine"), f"was made with another lr_scheduler ('constant'; this run: 'cosine'){tail}"),
        (dict(seed=1), f"was made with another seed (0; this run: 1){tail}"),
        (dict(instance_data_dir=str(other)),
         "was trained on other photos (the --instance_data_dir files differ): resume with the same photos, or start "
         "over with --force"),
    ]:
        with pytest.raises(TuneQDMError) as e:
            train(TrainConfig(**settings(base, photos, out, resume_from_checkpoint="latest", **change)))
        assert str(e.value) == f"checkpoint {good} {message}", change

    # defaults spelled out, the photos moved, harmless settings changed: accepted, and bit-identical
    stale = [out.parent / f".out.tmp-{dead_pid()}-x", out / "checkpoints" / ".checkpoint-4.tmp-k2j3h4_x"]
    for folder in stale:
        folder.mkdir()
    steps = []
    train(TrainConfig(**settings(base, photos, out, resume_from_checkpoint="latest", experts=4, learning_rate=6e-3,
                                 instance_data_dir=str(moved), checkpointing_steps=3, validation_steps=7)),
          callbacks=[lambda trainer, step: steps.append(step)])
    assert steps == [3, 4]
    assert not any(folder.exists() for folder in stale)  # temporaries of dead runs are gone
    ref = (reference / "adapter.safetensors").read_bytes()
    assert (out / "adapter.safetensors").read_bytes() == ref

    # resuming the finished run: says so, trains nothing, rewrites nothing, exit 0
    log = (out / "train_log.jsonl").read_text()
    argv = argv_of(settings(base, photos, out, quiet=False)) + ["--resume_from_checkpoint", "latest"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == f"{out} already holds this finished run (4 steps): nothing to train\n"
    assert captured.out == ""
    assert (out / "train_log.jsonl").read_text() == log and (out / "adapter.safetensors").read_bytes() == ref
    with pytest.raises(TuneQDMError) as e:  # ... unless it is asked to continue it with other settings
        train(TrainConfig(**settings(base, photos, out, resume_from_checkpoint="latest", learning_rate=1e-3)))
    assert str(e.value).startswith(f"checkpoint {out / 'checkpoints' / 'checkpoint-3'} was made with another "
                                   "learning_rate (0.006; this run: 0.001)")


def test_resume_without_a_checkpoint_says_so_and_the_log_has_no_duplicate_rows(base, photos, reference, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):  # killed after step 1, before the first checkpoint
        train(TrainConfig(**settings(base, photos, out)), callbacks=[killed_at(1)])
    assert [json.loads(r)["step"] for r in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    argv = argv_of(settings(base, photos, out)) + ["--resume_from_checkpoint", "latest"]
    assert main(argv) == 0
    assert capsys.readouterr().err == (f"tuneqdm: warning: no checkpoint in {out / 'checkpoints'}: "
                                       "starting from step 0\n")
    assert [json.loads(r)["step"] for r in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()


# ---- non-finite results, failed writes ----------------------------------------------------------------------------
def test_non_finite_weights_at_the_end_write_no_adapter(base, photos, tmp_path):
    def blow_up(trainer, step):  # what --learning_rate 1e6 does in the last step
        if step == 4:
            with torch.no_grad():
                for layer in tuneqdm.quantized_layers(trainer.model).values():
                    for p in layer.s_out:
                        p.fill_(float("inf"))

    with pytest.raises(TuneQDMError) as e:
        train(TrainConfig(**settings(base, photos, tmp_path)), callbacks=[blow_up])
    good = tmp_path / "checkpoints" / "checkpoint-2"
    assert str(e.value) == (f"the trained weights became NaN or infinite at step 4; stopped, the last good checkpoint "
                            f"is {good} (a resume repeats this run's settings): lower --learning_rate and start over "
                            "with --force")
    assert not (tmp_path / "adapter.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()


def test_a_huge_learning_rate_writes_no_adapter_even_when_the_weights_stay_finite(base, photos, tmp_path, capsys):
    # --learning_rate 1e6 for 3 steps: the scales stay finite (about 1e6 x their RMS), but sampling would overflow
    out = tmp_path / "out"
    argv = argv_of(settings(base, photos, out, max_train_steps=3, learning_rate=1e6))
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "tuneqdm: error: the trained model's output became NaN or infinite at step 3 (its weights are finite but far "
        f"too large); stopped, the last good checkpoint is {out / 'checkpoints' / 'checkpoint-2'} (a resume repeats "
        "this run's settings): lower --learning_rate and start over with --force\n")
    assert not (out / "adapter.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # the final state was not kept as a checkpoint


def _full_disk(*args, **kwargs):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


def test_a_full_disk_at_the_final_save_keeps_the_trained_state(base, photos, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(tuneqdm.serialization, "save_file", _full_disk)
    with pytest.raises(TuneQDMError) as e:
        train(TrainConfig(**settings(base, photos, out)))
    kept = out / "checkpoints" / "checkpoint-4"
    assert str(e.value) == (f"cannot write the result into {out} (Error while serializing: IoError(Os {{ code: 28, "
                            'kind: StorageFull, message: "No space left on device" })); nothing partial was left, the '
                            f"last good checkpoint is {kept}: make room and continue with --resume_from_checkpoint "
                            "latest")
    assert not (out / "adapter.safetensors").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    steps = []
    train(TrainConfig(**settings(base, photos, out, resume_from_checkpoint="latest")),
          callbacks=[lambda trainer, step: steps.append(step)])
    assert steps == [] and (out / "adapter.safetensors").read_bytes() == (
        reference / "adapter.safetensors").read_bytes()


def test_a_full_disk_while_checkpointing_or_validating_is_one_line(base, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_file", _full_disk)
    with pytest.raises(TuneQDMError) as e:
        train(TrainConfig(**settings(base, photos, tmp_path / "a")))
    assert str(e.value).startswith(f"cannot write checkpoint {tmp_path / 'a' / 'checkpoints' / 'checkpoint-2'} "
                                   "(Error while serializing: IoError(")
    assert str(e.value).endswith("nothing partial was left, no earlier checkpoint exists")
    monkeypatch.undo()

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(TuneQDMError) as e:
        train(TrainConfig(**settings(base, photos, tmp_path / "b", validation_prompt="a sks box", validation_steps=3,
                                     num_validation_images=1, validation_inference_steps=1)))
    assert str(e.value) == (f"cannot write {tmp_path / 'b' / 'validation' / 'step-000003'} (No space left on device); "
                            f"nothing partial was left, the last good checkpoint is "
                            f"{tmp_path / 'b' / 'checkpoints' / 'checkpoint-3'}: make room and continue with "
                            "--resume_from_checkpoint latest")
    assert not (tmp_path / "b" / "validation").exists() or not any((tmp_path / "b" / "validation").iterdir())


def test_a_full_disk_while_logging_keeps_the_state_of_that_step(base, photos, reference, tmp_path, monkeypatch):
    from tuneqdm.train import loop

    class FullAfterTwoRows:
        def __init__(self, path, mode):
            self.f, self.rows = open(path, mode), 0

        def write(self, text):
            self.rows += 1
            if self.rows == 3:
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    out = tmp_path / "out"
    monkeypatch.setattr(loop, "open", FullAfterTwoRows, raising=False)
    with pytest.raises(TuneQDMError) as e:
        train(TrainConfig(**settings(base, photos, out, checkpointing_steps=100)))
    kept = out / "checkpoints" / "checkpoint-3"
    assert str(e.value) == (f"cannot write {out / 'train_log.jsonl'} (No space left on device); nothing partial was "
                            f"left, the last good checkpoint is {kept}: make room and continue with "
                            "--resume_from_checkpoint latest")
    monkeypatch.undo()
    train(TrainConfig(**settings(base, photos, out, checkpointing_steps=100, resume_from_checkpoint="latest")))
    assert (out / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()
    rows = [json.loads(r)["step"] for r in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 4]  # step 3's row went with the full disk; its state did not


# ---- --force replaces the run as one unit -------------------------------------------------------------------------
def test_force_over_a_run_never_leaves_new_weights_beside_the_old_config(base, photos, reference, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    old = {name: (out / name).read_bytes() for name in ("adapter.safetensors", "adapter_config.json")}
    real_replace = os.replace
    died = []

    def dies_in_the_swap(src, dst):
        if died or (".tmp-" in str(src) and str(dst) == str(out)):  # the old run renamed away, the new one not in
            died.append(1)
            raise OSError("died")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", dies_in_the_swap)
    with pytest.raises((OSError, TuneQDMError)) as e:
        train(TrainConfig(**settings(base, photos, out, instance_prompt="a zwx box", force=True)))
    monkeypatch.undo()
    assert str(e.value).startswith(f"cannot write the result into {out} (died)")
    # no mixed folder: the old run waits intact under a temporary name; `out` holds no result (only the empty
    # checkpoints folder the failed attempt to keep a checkpoint made; a dead process makes none)
    assert not any((out / name).exists() for name in (*old, "training.json"))
    shutil.rmtree(out)
    parked = next(tmp_path.glob(f".out.old-{os.getpid()}-*"))
    assert {name: (parked / name).read_bytes() for name in old} == old
    parked.rename(parked.with_name(parked.name.replace(f"-{os.getpid()}-", f"-{dead_pid()}-")))

    # the next start puts the old run back, then --force replaces it whole
    train(TrainConfig(**settings(base, photos, out, instance_prompt="a zwx box", force=True)))
    assert json.loads((out / "adapter_config.json").read_text())["instance_prompts"] == ["a zwx box"]
    assert json.loads((out / "training.json").read_text())["instance_prompts"] == ["a zwx box"]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # the new run's checkpoint, carried into the new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- signals ------------------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_exits_143_and_a_second_signal_does_not_abort_the_save(base, photos, reference,
                                                                                         tmp_path, capsys,
                                                                                         monkeypatch):
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    sigint_handler = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, unhandled)
    out = tmp_path / "a"
    argv = argv_of(settings(base, photos, out, checkpointing_steps=100))
    real_save = ckpt.save

    def interrupted_save(*args, **kwargs):  # Ctrl-C pressed again while the handler writes its checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    from tuneqdm.train import Trainer

    real_step = Trainer._step

    def sigterm_in_step_3(self, *args):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args)

    try:
        monkeypatch.setattr(Trainer, "_step", sigterm_in_step_3)
        monkeypatch.setattr(ckpt, "save", interrupted_save)
        assert main(argv) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    saved = out / "checkpoints" / "checkpoint-2"
    assert capsys.readouterr().err == (f"tuneqdm: terminated at step 2; checkpoint {saved}: continue with "
                                       "--resume_from_checkpoint latest\n")
    assert json.loads((saved / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is sigint_handler  # the handlers are given back
    monkeypatch.undo()
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert (out / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()


# ---- photos -------------------------------------------------------------------------------------------------------
def test_decompression_bombs_are_skipped_and_huge_photos_warn_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels and refuses above 2000
    for name, side in (("a.png", 20), ("b.png", 40), ("c.png", 50)):
        Image.new("RGB", (side, side), (200, 10, 10)).save(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photos = load_folder(tmp_path, 16)
    assert [p.path.name for p in photos] == ["a.png", "b.png"]
    assert [(w.category, str(w.message)) for w in caught] == [
        (TrainWarning, f"{tmp_path / 'b.png'} is very large (40x40 px): reading it takes time and memory"),
        (TrainWarning, f"skipping {tmp_path / 'c.png'}: too large to read safely (Image size (2500 pixels) exceeds "
                       "limit of 2000 pixels)"),
    ]


# ---- --report_to tensorboard ----------------------------------------------------------------------------------------
def test_report_to_tensorboard_needs_tensorboard(base, photos, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    assert main(argv_of(settings(base, photos, tmp_path / "out")) + ["--report_to", "tensorboard"]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --report_to tensorboard needs TensorBoard, which is not "
                                       "installed: pip install tensorboard\n")
    assert not (tmp_path / "out").exists()


def test_report_to_tensorboard_writes_events_beside_the_jsonl_log(base, photos, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    train(TrainConfig(**settings(base, photos, out, max_train_steps=2, report_to="tensorboard")))
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


def test_resuming_a_checkpoint_past_max_train_steps_says_so_instead_of_claiming_fewer_steps(base, photos, tmp_path,
                                                                                           capsys):
    """Before, resuming checkpoint-2 with --max_train_steps 1 wrote the checkpoint's 2-step state as the result and
    printed "trained tuneqdm for 1 steps"."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        train(TrainConfig(**settings(base, photos, out)), callbacks=[killed_at(3)])
    argv = argv_of(settings(base, photos, out, max_train_steps=1)) + ["--resume_from_checkpoint", "latest"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: checkpoint {out / 'checkpoints' / 'checkpoint-2'} has "
                                       "already trained 2 steps, more than --max_train_steps 1: pass "
                                       "--max_train_steps 2 or more to continue it, or --force to start over\n")
    assert not (out / "adapter.safetensors").exists()
