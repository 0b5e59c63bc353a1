"""Prompts that are not UTF-8 text end in one line before any work (issue 31): a non-UTF-8 byte in --prompt or
--instance_prompt was a TypeError on every pipeline, --validation_prompt crashed at the first validation after
training ran (no checkpoint), and a prompt file was a UnicodeDecodeError (quantize-activations read the same file
with errors="replace": now every command reads prompt files with one reader)."""

import json
import os

import pytest

from tuneqdm.cli import main

BAD = os.fsdecode(b"a sks \xff dog")  # what Python makes of a non-UTF-8 byte in argv: a lone surrogate


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tuneqdm: error: "), err
    return err[len("tuneqdm: error: "):-1]


@pytest.mark.parametrize("flag", ("--instance_prompt", "--class_prompt", "--validation_prompt"))
def test_train_refuses_a_non_utf8_prompt_before_loading(flag, photos, tmp_path, capsys):
    argv = ["train", "--instance_data_dir", str(photos), "--output_dir", str(tmp_path / "out"), flag, BAD]
    if flag != "--instance_prompt":
        argv += ["--instance_prompt", "a sks dog"]
    if flag == "--class_prompt":
        argv += ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class")]
    assert main(argv) == 2
    assert _error(capsys) == f"{flag} holds a byte that is not UTF-8 text (at character 6): pass the prompt as UTF-8"
    assert not (tmp_path / "out").exists()


def test_a_subjects_file_with_a_non_utf8_prompt_is_one_line(photos, tmp_path, capsys):
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps([{"instance_data_dir": str(photos), "instance_prompt": BAD}]))
    assert main(["train", "--subjects", str(subjects), "--output_dir", str(tmp_path / "out")]) == 2
    assert _error(capsys) == (f"--subjects {subjects}: entry 0's 'instance_prompt' holds a byte that is not UTF-8 "
                              "text (at character 6): pass the prompt as UTF-8")


@pytest.mark.parametrize("flag", ("--prompt", "--negative_prompt"))
def test_generate_refuses_a_non_utf8_prompt(flag, tmp_path, capsys):
    argv = ["generate", "--out", str(tmp_path / "out"), flag, BAD] + (["--prompt", "a"] if flag != "--prompt" else [])
    assert main(argv) == 2
    assert _error(capsys) == f"{flag} holds a byte that is not UTF-8 text (at character 6): pass the prompt as UTF-8"


@pytest.mark.parametrize("argv", (
    ["evaluate", "--instance_data_dir", "PHOTOS", "--class_word", "dog", "--prompts", "FILE"],
    ["quantize", "--calibrate", "minmax", "--calib_prompts", "FILE"],
    ["quantize-activations", "--calib_prompts", "FILE"],
))
def test_every_prompt_file_is_read_as_utf8_by_one_reader(argv, photos, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red box\na \xff blue ball\n")
    argv = [str(bad) if a == "FILE" else str(photos) if a == "PHOTOS" else a for a in argv]
    flag = argv[argv.index(str(bad)) - 1]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == f"{flag} {bad} is not UTF-8 text (byte 12): save it as UTF-8"
    assert not (tmp_path / "out").exists()
