"""`tuneqdm report`: the page embeds exactly the evaluated images and the benchmark's numbers, loads in headless
Chromium without console errors, and bad results folders are one-line errors."""

import base64
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tuneqdm.cli import main

from tiny_pipelines import tiny_sd_pipeline

IMG = re.compile(r"<img alt='([^']*)'(?: title='([^']*)')? src='data:image/png;base64,([^']+)'>")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    base = tiny_sd_pipeline(root / "base")
    prompts = root / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\na red {0} {1}\n")
    assert main(["benchmark", "fidelity", "--pretrained_model_name_or_path", str(base), "--subjects", "0,1",
                 "--methods", "peqa,floor", "--max_train_steps", "2", "--images_per_prompt", "2",
                 "--num_inference_steps", "2", "--prompts", str(prompts), "--out", str(root / "fid")]) == 0
    return root / "fid"


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))


def _strip(paths) -> np.ndarray:
    return np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in paths], axis=1)


def test_benchmark_report_embeds_the_evaluated_images_and_numbers(bench, tmp_path, capsys):
    page = tmp_path / "r.html"
    assert main(["report", str(bench), "--out", str(page), "--image_format", "png"]) == 0
    assert capsys.readouterr().out.startswith(f"report: {page} (")
    text = page.read_text()
    images = IMG.findall(text)
    # per subject: one strip of reference photos + prompts x methods strips
    assert len(images) == 2 * (1 + 2 * 2)
    strips = {alt: (title, uri) for alt, title, uri in images}
    for s in ("s0", "s1"):
        photos = sorted((bench / "subjects" / s).glob("*.png"))
        assert np.array_equal(_decode(strips[f"reference photos of {s}"][1]), _strip(photos))
        for cell in ("peqa-w4", "floor-w4"):
            ev = bench / "cells" / cell / s / "eval"
            m = json.loads((ev / "metrics.json").read_text())
            for p, scores in enumerate(m["per_prompt"]):
                title, uri = strips[f"{cell}: {scores['prompt']}"]
                assert np.array_equal(_decode(uri), _strip([ev / "images" / f"{p:03d}_{i}.png" for i in range(2)]))
                assert title == f"DINO {scores['dino']:.3f} · CLIP-I {scores['clip_i']:.3f} · CLIP-T {scores['clip_t']:.3f}"
    for row in json.loads((bench / "fidelity.json").read_text())["rows"]:
        assert f"{row['dino']:.3f} ± {row['dino_std']:.3f}" in text
        assert f"{row['clip_t']:.3f} ± {row['clip_t_std']:.3f}" in text
    assert not list(tmp_path.glob(".*.tmp*"))  # written atomically


def test_single_evaluation_report(bench, tmp_path):
    ev = bench / "cells" / "peqa-w4" / "s0" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    metrics["instance_data_dir"] = str(bench / "subjects" / "s0")  # as tuneqdm evaluate records it
    single = tmp_path / "ev"
    (single / "images").mkdir(parents=True)
    for f in (ev / "images").iterdir():
        (single / "images" / f.name).write_bytes(f.read_bytes())
    (single / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(single)]) == 0  # an evaluation without its photos/ (written before it kept them)
    text = (single / "report.html").read_text()
    assert len(re.findall(r"<img ", text)) == 2 and "reference photos not found" in text  # never read from elsewhere
    (single / "photos").mkdir()
    for f in sorted((bench / "subjects" / "s0").glob("*.png")):
        (single / "photos" / f.name).write_bytes(f.read_bytes())
    assert main(["report", str(single), "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert len(re.findall(r"<img ", text)) == 1 + 2 and "reference photos of s0" in text
    assert f"<td>{metrics['dino']:.3f}</td>" in text


def test_bad_results_folders_are_one_line(bench, tmp_path, capsys):
    def err(*argv):
        assert main(["report", *argv]) == 2
        return capsys.readouterr().err

    assert err(str(tmp_path / "nope")) == f"tuneqdm: error: {tmp_path / 'nope'} is not a folder: pass an evaluation " \
                                          f"or benchmark output folder\n"
    assert err(str(tmp_path)) == f"tuneqdm: error: {tmp_path} holds no metrics.json: run tuneqdm evaluate (or the " \
                                 f"benchmark) first\n"
    old = tmp_path / "old"
    old.mkdir()
    (old / "fidelity.json").write_text(json.dumps({"table_version": 1, "rows": []}))
    assert err(str(old)) == f"tuneqdm: error: {old} was made by an older tuneqdm: run the benchmark again into a " \
                            f"new --out\n"
    img = bench / "cells" / "floor-w4" / "s1" / "eval" / "images" / "001_1.png"
    saved = img.read_bytes()
    img.unlink()
    try:
        assert err(str(bench), "--out", str(tmp_path / "x.html")) == (
            f"tuneqdm: error: {img} is missing or unreadable: evaluate that cell again\n")
        assert not (tmp_path / "x.html").exists()
    finally:
        img.write_bytes(saved)
    assert err(str(bench), "--screenshot", str(tmp_path / "s.jpg")) == (
        f"tuneqdm: error: --screenshot {tmp_path / 's.jpg'}: give a .png file name\n")


def _mark(field: str) -> str:
    """Markup that would run if it reached the page unescaped (no "/": some fields become folder names)."""
    return f"<img src=x onerror=alert('{field}') class=\"{field}\">"


SCORED = ("dino", "clip_i", "clip_t")  # a metrics.json's scores: numbers, checked before the page is made


def _plant(value, field: str, keep=()):
    """``value`` with every leaf (numbers, strings, booleans) replaced by markup naming its field (``keep``: keys
    left as they are)."""
    if isinstance(value, dict):
        return {k: v if k in keep else _plant(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_plant(v, f"{field}.{i}") for i, v in enumerate(value)]
    return _mark(field)


def _crafted_benchmark(root, rows_fields, metric_fields):
    """A fidelity folder written by hand: one subject, one cell, every field of both JSON files planted."""
    subject = root / "subjects" / _mark("subject")
    subject.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(subject / "0.png")
    row = _plant(rows_fields, "row")
    (root / "fidelity.json").write_text(json.dumps({"table_version": 2, "rows": [row]}))
    eval_dir = root / "cells" / f"{row['method']}-w{row['bits']}" / subject.name / "eval"
    (eval_dir / "images").mkdir(parents=True)
    metrics = _plant(metric_fields, "metrics", SCORED)
    metrics.update(format_version=1, per_prompt=[{**_plant(metric_fields["per_prompt"][0], "p", SCORED),
                                                  "seeds": [0]}])
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    Image.new("RGB", (8, 8), "blue").save(eval_dir / "images" / "000_0.png")
    return [_mark(f) for f in (*rows_fields, "subject")] + [
        _mark(f) for f in (*metric_fields, *metric_fields["per_prompt"][0]) if f not in SCORED]


def test_markup_planted_in_every_results_field_reaches_the_page_only_escaped(bench, tmp_path):
    import html

    fields = json.loads((bench / "fidelity.json").read_text())["rows"][0]
    metrics = json.loads((bench / "cells" / "peqa-w4" / "s0" / "eval" / "metrics.json").read_text())
    marks = _crafted_benchmark(tmp_path / "fid", fields, metrics)
    assert main(["report", str(tmp_path / "fid"), "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert "<img src=x" not in text and "onerror=alert('" not in text
    shown = [m for m in marks if html.escape(m) in text]
    for field in ("method", "bits", "learning_rate", "subjects", "dino", "dino_std", "clip_t_std",
                  "trainable_params", "trainable_fraction", "adapter_bytes", "train_s", "train_peak_mib", "prompt",
                  "subject", "subject_encoder", "clip_encoder", "seed", "guidance_scale", "images_per_prompt"):
        assert _mark(field) in shown, field

    single = tmp_path / "single"
    (single / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(single / "images" / "000_0.png")
    planted = {**_plant({**metrics, "adapter": 0, "instance_data_dir": 0}, "metrics", SCORED), "format_version": 1,
               "per_prompt": [{**_plant(metrics["per_prompt"][0], "p", SCORED), "seeds": [0]}]}
    (single / "metrics.json").write_text(json.dumps(planted))
    assert main(["report", str(single)]) == 0
    text = (single / "report.html").read_text()
    assert "<img src=x" not in text
    assert all(html.escape(_mark(f)) in text for f in ("adapter", "instance_data_dir", "prompt", "seed"))


def _browser_available() -> bool:
    from tuneqdm.eval.browser import chromium_executable

    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return chromium_executable() is not None


browser = pytest.mark.skipif(not _browser_available() and not os.environ.get("TUNEQDM_REQUIRE_BROWSER"),
                             reason="needs playwright and Debian's chromium (.ci/run installs both)")


@browser
def test_report_loads_in_chromium_and_the_screenshot_shows_the_grid(bench, tmp_path):
    from tuneqdm.eval.browser import open_in_chromium

    page = tmp_path / "r.html"
    assert main(["report", str(bench), "--out", str(page), "--image_format", "png"]) == 0
    shot = tmp_path / "shot.png"
    assert open_in_chromium(page, shot, width=1000, height=900) == []
    screen = np.asarray(Image.open(shot).convert("RGB"))
    assert screen.shape == (900, 1000, 3)
    # the first grid strip (peqa, first prompt of s0) appears pixel for pixel: images are shown at their own size
    ev = bench / "cells" / "peqa-w4" / "s0" / "eval"
    strip = _strip([ev / "images" / f"000_{i}.png" for i in range(2)])
    h, w, _ = strip.shape
    ys, xs = np.nonzero((screen[: 900 - h, : 1000 - w] == strip[0, 0]).all(-1))
    assert any(np.array_equal(screen[y:y + h, x:x + w], strip) for y, x in zip(ys, xs))


@browser
def test_the_browser_check_reports_console_errors_and_broken_images(tmp_path):
    from tuneqdm.eval.browser import open_in_chromium

    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><head><link rel='icon' href='data:,'></head><body>"
                    "<script>console.error('boom')</script><img src='data:image/png;base64,AAAA'></body></html>")
    problems = open_in_chromium(page)
    assert "console error: boom" in problems and "1 image(s) failed to load" in problems


def test_photos_outside_the_results_folder_never_reach_the_page(bench, tmp_path):
    """Issue 31: a results folder from someone else named any absolute instance_data_dir, and the report embedded
    every image of it (the user's own pictures) into a page meant for sharing."""
    private = tmp_path / "my-pictures"
    private.mkdir()
    Image.new("RGB", (8, 8), (250, 1, 2)).save(private / "me.png")
    ev = bench / "cells" / "peqa-w4" / "s0" / "eval"
    crafted = tmp_path / "from-someone"
    shutil.copytree(ev, crafted)
    metrics = json.loads((crafted / "metrics.json").read_text())
    metrics["instance_data_dir"] = str(private)
    (crafted / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(crafted / "photos")
    (crafted / "photos").symlink_to(private)  # nor through a link
    assert main(["report", str(crafted)]) == 0
    text = (crafted / "report.html").read_text()
    assert "reference photos not found (only photos inside the results folder are shown)" in text
    assert len(re.findall(r"<img ", text)) == len(metrics["per_prompt"])


@pytest.mark.parametrize("edit, error", [
    (lambda m: m.pop("per_prompt"), "lacks the key 'per_prompt'"),
    (lambda m: m.update(per_prompt=[]), "'per_prompt' is empty"),
    (lambda m: m.update(per_prompt={"a": 1}), "'per_prompt' must be a list"),
    (lambda m: m["per_prompt"].__setitem__(0, "p"), r"\(per_prompt\[0\]\) is not a JSON object"),
    (lambda m: m["per_prompt"][0].pop("seeds"), "lacks the key 'seeds'"),
    (lambda m: m["per_prompt"][0].update(seeds=["0"]), "'seeds' must be 1 to 64 integers"),
    (lambda m: m["per_prompt"][0].update(seeds=list(range(10**5))), "'seeds' must be 1 to 64 integers"),
    (lambda m: m["per_prompt"][0].update(prompt=5), "'prompt' must be a string"),
    (lambda m: m.update(dino="high"), "'dino' must be a number or null"),
    (lambda m: m.update(metric="fid"), "is a --metric fid evaluation"),
    (lambda m: m.update(format_version="1"), "was written by another tuneqdm version"),
])
def test_a_damaged_metrics_json_is_one_line(edit, error, bench, tmp_path, capsys):
    crafted = tmp_path / "ev"
    shutil.copytree(bench / "cells" / "peqa-w4" / "s0" / "eval", crafted)
    metrics = json.loads((crafted / "metrics.json").read_text())
    edit(metrics)
    (crafted / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(crafted)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(error, err), err
    assert not (crafted / "report.html").exists()


@pytest.mark.parametrize("key, value, shown", [
    ("guidance_scale", None, "guidance ?,"),  # deleted: was a KeyError (found by benchmarks/fuzz_files.py)
    ("clip_t_keeps_token", None, "rare token ?)"),
    ("clip_t_keeps_token", {"a": 1}, "rare token ?)"),  # another type: was "unhashable type: 'dict'"
])
def test_a_missing_or_odd_setting_of_the_record_shows_as_a_question_mark(key, value, shown, bench, tmp_path):
    crafted = tmp_path / "ev"
    shutil.copytree(bench / "cells" / "peqa-w4" / "s0" / "eval", crafted)
    metrics = json.loads((crafted / "metrics.json").read_text())
    if value is None:
        del metrics[key]
    else:
        metrics[key] = value
    (crafted / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(crafted)]) == 0
    assert shown in (crafted / "report.html").read_text()
