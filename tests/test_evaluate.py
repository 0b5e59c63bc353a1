"""`tuneqdm evaluate`: the DreamBooth protocol's files and numbers, and its one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from tuneqdm.cli import main
from tuneqdm.eval import clip_i_score, clip_t_score, dino_score
from tuneqdm.eval.prompts import DREAMBOOTH_LIVE, DREAMBOOTH_OBJECT, evaluation_prompts
from tuneqdm.toy.evaluators import load_toy_clip, load_toy_dino

from tiny_pipelines import tiny_sd_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base = tiny_sd_pipeline(root / "base")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    (photos / "notes.txt").write_text("not a photo")
    prompts = root / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\n\na red {0} {1}\n")
    return root, base, photos, prompts


def _args(setup, out, *extra):
    root, base, photos, prompts = setup
    return ["evaluate", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--prompts", str(prompts), "--class_word", "dog", "--evaluator", "toy", "--images_per_prompt", "2",
            "--num_inference_steps", "2", "--out", str(out), *extra]


def test_metrics_are_those_of_the_saved_images(setup, tmp_path):
    out = tmp_path / "ev"
    assert main(_args(setup, out)) == 0
    m = json.loads((out / "metrics.json").read_text())
    real = [Image.open(setup[2] / f"{i}.png") for i in range(3)]
    clip, dino = load_toy_clip(), load_toy_dino()
    assert [r["prompt"] for r in m["per_prompt"]] == ["a sks dog on the beach", "a red sks dog"]
    assert [r["clip_t_text"] for r in m["per_prompt"]] == ["a dog on the beach", "a red dog"]
    assert [r["seeds"] for r in m["per_prompt"]] == [[0, 1], [1000, 1001]]
    for p, row in enumerate(m["per_prompt"]):
        images = [Image.open(out / "images" / f"{p:03d}_{i}.png") for i in range(2)]
        assert row["dino"] == pytest.approx(dino_score(dino, real, images), abs=1e-6)
        assert row["clip_i"] == pytest.approx(clip_i_score(clip, real, images), abs=1e-6)
        assert row["clip_t"] == pytest.approx(clip_t_score(clip, images, [row["clip_t_text"]] * 2), abs=1e-6)
    for k in ("dino", "clip_i", "clip_t"):
        assert m[k] == pytest.approx(np.mean([r[k] for r in m["per_prompt"]]), abs=1e-9)
    assert (m["real_images"], m["token"], m["clip_t_keeps_token"]) == (3, "sks", False)
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "metrics.json", "photos"]
    kept = [np.asarray(Image.open(p)) for p in sorted((out / "photos").iterdir())]  # the photos scored against
    assert len(kept) == 3 and all(np.array_equal(a, np.asarray(b)) for a, b in zip(kept, real))
    # --force that fails before writing (here: no such model) keeps the earlier evaluation
    assert main(_args(setup, out, "--force", "--pretrained_model_name_or_path", str(tmp_path / "no-model"))) == 2
    assert json.loads((out / "metrics.json").read_text()) == m and len(list((out / "images").iterdir())) == 4
    (out / "images" / "099_0.png").write_bytes(b"stale")
    assert main(_args(setup, out, "--force")) == 0  # an earlier evaluation is replaced whole
    assert json.loads((out / "metrics.json").read_text())["dino"] == m["dino"]
    assert not (out / "images" / "099_0.png").exists()

    again = tmp_path / "again"
    assert main(_args(setup, again, "--keep_token_in_clip_t")) == 0
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["dino"] == m["dino"] and m2["clip_t_keeps_token"] is True  # same seeds, same images
    assert [r["clip_t_text"] for r in m2["per_prompt"]] == ["a sks dog on the beach", "a red sks dog"]


def test_dreambooth_prompt_lists():
    assert len(DREAMBOOTH_OBJECT) == len(DREAMBOOTH_LIVE) == 25
    assert evaluation_prompts("dreambooth-live", "sks", "dog")[13] == "a sks dog wearing a black top hat and a monocle"
    assert evaluation_prompts("dreambooth-object", "sks", "can")[-1] == "a cube shaped sks can"


def test_prompt_files_substitute_only_the_two_placeholders(tmp_path):
    """A prompt file is text: only {0} and {1} are replaced; format fields, stray braces and {2} stay literal."""
    lines = ["a {0} {1} {0.__class__.__mro__}", "a { {0}", "{2} and {} and {{0}} {1}", "{1}{0}"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    assert evaluation_prompts(str(path), "s{1}ks", "dog") == [
        "a s{1}ks dog {0.__class__.__mro__}", "a { s{1}ks", "{2} and {} and {s{1}ks} dog", "dogs{1}ks"]


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, base, photos, prompts = setup

    def err(args):
        assert main(args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    out = tmp_path / "ev"
    args = _args(setup, out)
    i = args.index("--instance_data_dir") + 1
    assert err(args[:i] + [str(tmp_path / "none")] + args[i + 1:]) == \
        f"tuneqdm: error: --instance_data_dir {tmp_path / 'none'} is not a folder: pass the folder of the subject's " \
        "photos"
    j = args.index("--prompts") + 1
    assert err(args[:j] + [str(tmp_path / "p.txt")] + args[j + 1:]) == (
        f"tuneqdm: error: --prompts {tmp_path / 'p.txt'}: no such file; use a text file or one of "
        "dreambooth-object, dreambooth-live, toy")
    k = args.index("--class_word")
    assert err(args[:k] + args[k + 2:]) == "tuneqdm: error: no class word: pass --class_word (e.g. dog)"
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert err(_args(setup, used)) == \
        f"tuneqdm: error: output folder {used} is not empty: choose another --out or pass --force"
    assert err(_args(setup, used, "--force")) == \
        f"tuneqdm: error: output folder {used} holds files that are not an evaluation (keep.txt): --force only " \
        "replaces an evaluation, choose another --out"
    assert (used / "keep.txt").read_text() == "mine"
    assert not out.exists()  # nothing half-written
    missing = ["--pretrained_model_name_or_path", str(tmp_path / "no-model")]  # checked before any loading
    assert err(_args(setup, out, *missing, "--images_per_prompt", "0")) == \
        "tuneqdm: error: --images_per_prompt must be at least 1"
    assert err(_args(setup, out, *missing, "--metric", "fid", "--fid_images", "1")) == \
        "tuneqdm: error: --fid_images must be at least 2 (a covariance needs two images), got 1"
