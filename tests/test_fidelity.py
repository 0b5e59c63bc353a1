"""`tuneqdm benchmark fidelity`: cells, the table over subjects, resume without redoing cells, one-line errors."""

import json
import statistics

import pytest

import tuneqdm
from tuneqdm.cli import main

from tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("fidelity") / "base")


def _args(base, tmp_path, methods, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    return ["benchmark", "fidelity", "--pretrained_model_name_or_path", str(base), "--subjects", "0,1",
            "--methods", methods, "--max_train_steps", "2", "--images_per_prompt", "1", "--num_inference_steps", "2",
            "--prompts", str(prompts), "--out", str(tmp_path / "fid"), "--quiet", *extra]  # stderr: errors only


def test_table_resume_and_trainable_counts(base, tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(_args(base, tmp_path, "peqa,floor")) == 0
    cells = {p.parent.parent.relative_to(out / "cells").as_posix(): p for p in out.glob("cells/*/*/eval/metrics.json")}
    assert sorted(cells) == ["floor-w4/s0", "floor-w4/s1", "peqa-w4/s0", "peqa-w4/s1"]
    stamps = {k: p.stat().st_mtime_ns for k, p in cells.items()}

    rows = {r["method"]: r for r in json.loads((out / "fidelity.json").read_text())["rows"]}
    for method in ("peqa", "floor"):
        ms = [json.loads(cells[f"{method}-w4/s{i}"].read_text()) for i in (0, 1)]
        assert rows[method]["dino"] == pytest.approx(statistics.fmean(m["dino"] for m in ms))
        assert rows[method]["clip_t_std"] == pytest.approx(statistics.pstdev(m["clip_t"] for m in ms))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    total = sum(p.numel() for p in unet.parameters())
    tuneqdm.quantize_(unet, tuneqdm.QuantConfig(bits=4, method="peqa"))
    assert rows["peqa"]["trainable_params"] == sum(p.numel() for p in tuneqdm.scale_parameters(unet))
    assert rows["peqa"]["trainable_fraction"] == pytest.approx(rows["peqa"]["trainable_params"] / total)
    assert rows["floor"]["trainable_params"] == 0

    assert main(_args(base, tmp_path, "peqa,floor,tas")) == 0  # resumes: finished cells are not redone
    assert all(cells[k].stat().st_mtime_ns == t for k, t in stamps.items())
    assert (out / "cells" / "tas-w4" / "s1" / "eval" / "metrics.json").is_file()
    assert "| tas | 4 | 0.002 | 2 |" in (out / "fidelity.md").read_text()

    # other settings for a finished cell are refused, not mixed into the table
    assert main(_args(base, tmp_path, "peqa", "--learning_rate", "peqa=5e-2")) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: {out / 'cells/peqa-w4/s0'} was made with learning_rate "
                                       f"0.002, this run asks 0.05: use another --out or the same settings\n")
    metrics = json.loads(cells["floor-w4/s0"].read_text())
    del metrics["settings"]
    cells["floor-w4/s0"].write_text(json.dumps(metrics))
    assert main(_args(base, tmp_path, "floor")) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: {out / 'cells/floor-w4/s0'} was made by an older tuneqdm: "
                                       f"use another --out\n")


def test_a_changed_base_is_refused_not_mixed(base, tmp_path, capsys):
    """A folder resumed after the base changed — here only its VAE, as when the embedded default's VAE was refined —
    is refused: the cell's settings hold the whole pipeline's fingerprint."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from tuneqdm.loading import pipeline_fingerprint, resolve

    assert main(_args(base, tmp_path, "floor", "--subjects", "0")) == 0
    other = tmp_path / "other"
    shutil.copytree(base, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(other / "vae")
    before, after = (pipeline_fingerprint(resolve(str(b))) for b in (base, other))
    assert before != after
    capsys.readouterr()
    assert main(_args(other, tmp_path, "floor", "--subjects", "0")) == 2
    cell = tmp_path / "fid" / "cells" / "floor-w4" / "s0"
    assert capsys.readouterr().err == (f"tuneqdm: error: {cell} was made with base_fingerprint {before!r}, this run "
                                       f"asks {after!r}: use another --out or the same settings\n")


def test_per_method_learning_rate_reaches_training(base, tmp_path):
    out = tmp_path / "fid"
    assert main(_args(base, tmp_path, "peqa,fp,s1", "--subjects", "0", "--learning_rate", "fp=1e-3",
                      "--s1_intervals", "0-500")) == 0
    config = lambda cell: json.loads((out / "cells" / cell / "s0" / "run" / "training.json").read_text())  # noqa
    assert config("fp")["learning_rate"] == 1e-3 and config("peqa-w4")["learning_rate"] == 2e-3
    s1 = json.loads((out / "cells" / "s1-w4" / "s0" / "run" / "adapter_config.json").read_text())
    assert "0-500" in json.dumps(s1)  # the intervals reached training
    rows = {r["method"]: r for r in json.loads((out / "fidelity.json").read_text())["rows"]}
    assert rows["fp"]["learning_rate"] == 1e-3 and rows["peqa"]["learning_rate"] == 2e-3

    # --table_only: one table over more (method, bits) than were run (e.g. W4-only ablations beside W4/W8), no training
    finished = sorted(p.relative_to(out) for p in out.glob("cells/*/*"))
    args = _args(base, tmp_path, "peqa,fp,s1,tas", "--subjects", "0", "--bits", "4", "8", "--table_only")
    assert main(args) == 0
    assert sorted(p.relative_to(out) for p in out.glob("cells/*/*")) == finished
    table = json.loads((out / "fidelity.json").read_text())["rows"]
    assert [(r["method"], r["bits"]) for r in table] == [("peqa", 4), ("fp", None), ("s1", 4)]
    assert table == [rows["peqa"], rows["fp"], rows["s1"]]


@pytest.mark.parametrize("extra,message", [
    (["--methods", "dreambooth"], "unknown method 'dreambooth' in --methods: choose from fp, lora, qlora, peqa, "
                                  "tuneqdm, mcsu, tas, s1, floor"),
    (["--subjects", "a-b"], "--subjects 'a-b': write toy subject seeds like 0-9 or 0,3,5"),
    (["--shard", "2/2"], "--shard '2/2': write i/n with 0 <= i < n, e.g. 0/2"),
    (["--learning_rate", "fp=1e-4"], "--learning_rate 'fp=1e-4': 'fp' is not a trained method of --methods"),
    (["--learning_rate", "peqa:1e-4"], "--learning_rate 'peqa:1e-4': write METHOD=LR, e.g. fp=1e-4"),
    (["--methods", "s1"], "--methods s1 needs --s1_intervals (e.g. 0-250), and --s1_intervals needs s1 in --methods"),
])
def test_bad_arguments_are_one_line(base, tmp_path, capsys, extra, message):
    assert main(_args(base, tmp_path, "peqa") + extra) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"
    assert not (tmp_path / "fid").exists()


def test_table_only_without_cells_is_one_line(base, tmp_path, capsys):
    assert main(_args(base, tmp_path, "peqa", "--table_only")) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: --table_only: {tmp_path / 'fid'} holds no finished cells; "
                                       f"run the benchmark into it first\n")
    assert not (tmp_path / "fid").exists()


def test_a_subject_written_by_another_shard_meanwhile_is_used(base, tmp_path, monkeypatch):
    import errno

    import tuneqdm.toy.subjects as subjects

    real = subjects.write_subject

    def lose_the_race(seed, folder, **kw):  # the other shard renames its folder into place first
        real(seed, folder, **kw)
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(subjects, "write_subject", lose_the_race)
    assert main(_args(base, tmp_path, "floor", "--subjects", "0")) == 0
    assert (tmp_path / "fid" / "cells" / "floor-w4" / "s0" / "eval" / "metrics.json").is_file()


def test_activation_variants_train_and_sample_as_asked(base, tmp_path):
    """--activation_bits 8 trains the cells on int8 activations and samples them so (``-w4a8``); --sample_activation_bits
    8 samples float-trained cells (here the floor) on int8 activations (``-w4-sa8``): images near, not equal to, the
    float-sampled cell's."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "fid"
    assert main(_args(base, tmp_path, "peqa", "--subjects", "0", "--activation_bits", "8")) == 0
    assert json.loads((out / "cells/peqa-w4a8/s0/run/training.json").read_text())["activation_bits"] == 8
    row = json.loads((out / "fidelity.json").read_text())["rows"][0]
    assert (row["method"], row["bits"], row["activation_bits"]) == ("peqa", 4, [8, 8])
    assert "| peqa | 4a8 |" in (out / "fidelity.md").read_text()

    assert main(_args(base, tmp_path, "floor", "--subjects", "0")) == 0
    assert main(_args(base, tmp_path, "floor", "--subjects", "0", "--sample_activation_bits", "8")) == 0
    images = {name: sorted((out / "cells" / name / "s0" / "eval" / "images").glob("*.png"))
              for name in ("floor-w4", "floor-w4-sa8")}
    assert len(images["floor-w4"]) == len(images["floor-w4-sa8"]) > 0
    for a, b in zip(images["floor-w4"], images["floor-w4-sa8"]):
        x, y = (np.asarray(Image.open(p), dtype=np.float64) for p in (a, b))
        psnr = 10 * np.log10(255**2 / np.mean((x - y) ** 2))
        assert 20 < psnr < 60, psnr  # int8 activations move the image a little


@pytest.mark.parametrize("methods,extra,message", [
    ("fp", ["--activation_bits", "8"], "--activation_bits / --sample_activation_bits 8 apply to quantized methods: "
                                       "run fp in a benchmark of their own"),
    ("floor", ["--activation_bits", "8"], "--activation_bits 8: the floor trains nothing; give it "
                                          "--sample_activation_bits 8 instead"),
])
def test_activation_variants_refuse_what_cannot_take_them(base, tmp_path, capsys, methods, extra, message):
    assert main(_args(base, tmp_path, methods) + extra) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"
