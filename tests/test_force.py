"""One rule for every command's --force (issue 31): it replaces only a folder of what that command writes. A folder
holding anything else, or the folder the command runs in, is refused in one line before any work, and nothing in it
is touched (before, generate, quantize and quantize-activations wiped every file of --out)."""

import pytest

from tuneqdm.cli import main


def _commands(out, tmp_path):
    return {
        "generate": ["generate", "--prompt", "a box", "--out", str(out), "--force"],
        "quantize": ["quantize", "--out", str(out), "--force"],
        "quantize-activations": ["quantize-activations", "--out", str(out), "--force"],
        "demo": ["demo", "--out", str(out), "--force"],
        "export": ["export", "--adapter", str(tmp_path / "no-adapter"), "--to", "lora", "--out", str(out), "--force"],
        "evaluate": ["evaluate", "--out", str(out), "--force"],
        "toy subject": ["toy", "subject", "--seed", "1", "--out", str(out), "--force"],
    }


KINDS = {"generate": "generated images", "quantize": "a quantized base", "quantize-activations":
         "activation parameters", "demo": "a demo", "export": "an export", "evaluate": "an evaluation",
         "toy subject": "a toy subject"}


@pytest.mark.parametrize("command", tuple(KINDS))
def test_force_refuses_a_folder_holding_files_tuneqdm_did_not_write(command, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "THESIS.tex").write_text("years of work")
    (out / "generate.json").write_text("{}")  # a name tuneqdm writes does not make the folder tuneqdm's
    assert main(_commands(out, tmp_path)[command]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: output folder {out} holds files that are not "
                                       f"{KINDS[command]} (THESIS.tex): --force only replaces {KINDS[command]}, "
                                       "choose another --out\n")
    assert (out / "THESIS.tex").read_text() == "years of work"


@pytest.mark.parametrize("command", tuple(KINDS))
@pytest.mark.parametrize("where", (".", ".."))
def test_the_folder_a_command_runs_in_is_never_its_output(command, where, tmp_path, monkeypatch, capsys):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here)
    assert main(_commands(where, tmp_path)[command]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: --out {where} is the folder this command runs in (or holds "
                                       "it), which it cannot replace: give a new subfolder\n")
    assert (here / "notes.txt").read_text() == "keep"


def test_force_replaces_a_folder_of_the_commands_own_files(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["toy", "subject", "--seed", "1", "--out", str(out)]) == 0
    (out / "00.png").unlink()  # what the command writes, in part: still its own
    assert main(["toy", "subject", "--seed", "2", "--out", str(out), "--force"]) == 0
    assert '"seed": 2' in (out / "subject.json").read_text()
