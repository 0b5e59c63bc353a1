"""Every command that samples or renders for a long time checks first that its output can be written: a read-only
folder, an --out that is a file, or a parent that is a file is one line before any model is loaded (the model
named here does not exist, so reaching the loading step would give another error)."""

import os
import subprocess

import pytest

from tuneqdm.cli import main

MISSING_MODEL = ["--pretrained_model_name_or_path", "/nonexistent/model"]


@pytest.fixture
def read_only(tmp_path):
    """An empty folder nobody can write into: mode 0555, or for root (who ignores modes) the immutable attribute."""
    folder = tmp_path / "ro"
    folder.mkdir()
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
            pytest.skip("running as root without chattr +i: no way to make a read-only folder")
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def _commands(out):
    return {
        "generate": ["generate", "--prompt", "x", *MISSING_MODEL, "--out", str(out)],
        "evaluate": ["evaluate", "--instance_data_dir", "/nonexistent/photos", *MISSING_MODEL, "--out", str(out)],
        "fid": ["evaluate", "--metric", "fid", *MISSING_MODEL, "--out", str(out)],
        "benchmark": ["benchmark", "fidelity", "--subjects", "0", "--methods", "floor", *MISSING_MODEL,
                      "--out", str(out)],
        "quantize": ["quantize", "--calibrate", "minmax", "--calib_prompts", "/nonexistent/p.txt", *MISSING_MODEL,
                     "--out", str(out)],
    }


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["generate", "evaluate", "fid", "benchmark", "quantize"])
def test_unwritable_output_is_one_line_before_loading(command, read_only, tmp_path, capsys):
    new = read_only / "out"
    assert _error(capsys, _commands(new)[command]).startswith(
        f"tuneqdm: error: cannot write {new}: {read_only} is not writable (")
    assert _error(capsys, _commands(read_only)[command]).startswith(
        f"tuneqdm: error: cannot write {read_only}: {read_only} is not writable (")
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "evaluate", "fid", "benchmark", "quantize"])
def test_an_out_that_is_a_file_or_below_a_file_is_one_line(command, tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("mine")
    force = [] if command == "benchmark" else ["--force"]
    assert _error(capsys, _commands(file)[command] + force) == f"tuneqdm: error: --out {file} is a file: give a " \
                                                               f"folder name\n"
    below = file / "sub" / "out"
    assert _error(capsys, _commands(below)[command]) == f"tuneqdm: error: cannot write {below}: {file} is a file: " \
                                                        f"choose another --out\n"
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]


def test_report_checks_its_file_before_rendering(read_only, tmp_path, capsys):
    missing = tmp_path / "no-results"  # rendering would fail on it: the output check must come first
    page = read_only / "r.html"
    assert _error(capsys, ["report", str(missing), "--out", str(page)]).startswith(
        f"tuneqdm: error: cannot write {page}: {read_only} is not writable (")
    assert _error(capsys, ["report", str(missing), "--out", str(tmp_path)]) == \
        f"tuneqdm: error: --out {tmp_path} is a folder: give a file name\n"
    shot = read_only / "top.png"
    assert _error(capsys, ["report", str(missing), "--out", str(tmp_path / "r.html"), "--screenshot", str(shot)]) \
        .startswith(f"tuneqdm: error: cannot write {shot}: {read_only} is not writable (")
