"""The README's snippets run as written.

Every ```python block runs, in order, in one temporary folder, offline, on the embedded model, after the README's
first command has made what they read (``s5``, ``out``). That command runs through the CLI's ``main`` with the
cheapest settings appended (argparse keeps the last value of a flag): CHEAPER below is the whole shrinking mechanism.
Every ``tuneqdm`` command of a ```bash block must parse with the CLI's own parser (every flag exists)."""

import re
import shlex
from pathlib import Path

import pytest

from tuneqdm.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
CHEAPER = {"train": ["--max_train_steps", "2"], "generate": ["--num_images", "1", "--num_inference_steps", "2"]}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def tuneqdm_commands(block: str) -> list[list[str]]:
    """The argv (without ``tuneqdm``) of every ``tuneqdm`` command in a bash block: continuation lines joined,
    comments dropped, ``&&`` chains split."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for w in [*words, "&&"]:
            if w == "&&":
                if current[:1] == ["tuneqdm"]:
                    commands.append(current[1:])
                current = []
            else:
                current.append(w)
    return commands


def first_command() -> list[list[str]]:
    return tuneqdm_commands(blocks("bash")[0].splitlines()[0])


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 4
    assert [argv[:2] for argv in first_command()] == [["toy", "subject"], ["train", "--instance_data_dir"],
                                                      ["generate", "--adapter"]]


@pytest.mark.parametrize("argv", [argv for block in blocks("bash") for argv in tuneqdm_commands(block)],
                         ids=lambda argv: " ".join(argv)[:60])
def test_every_bash_command_parses(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README: `tuneqdm {' '.join(argv)}` does not parse (see stderr)")


def test_first_command_and_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in first_command():
        assert main([*argv, *CHEAPER.get(argv[0], []), "--quiet"]) == 0, argv
    assert len(list(Path("beach").glob("*.png"))) == 1
    namespace: dict = {}
    for i, block in enumerate(blocks("python")):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    image = namespace["image"]
    assert image.size[0] >= 32 and Path("my-subject/adapter.safetensors").is_file()
    assert Path("toy-w4/quantization.json").is_file()
