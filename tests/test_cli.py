import json

import pytest

from tuneqdm.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "sample.png").stat().st_size > 0
    assert (out / "quantized-base" / "quantized.safetensors").exists()
    assert summary["adapter_bytes"] < summary["trainable_scales"] * 4 + 64 * 1024
    assert summary["weight_bytes_per_param"] < 0.6


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"tuneqdm: error: output folder {tmp_path} is not empty: choose another --out or pass --force\n"
    assert (tmp_path / "x").read_text() == "keep me"


def _subparsers(parser, prefix=()):
    """(command words, parser) of every subcommand, nested ones (benchmark fidelity, toy subject) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_every_option_of_every_help_shows_its_default(capsys):
    from tuneqdm.cli import build_parser

    commands = dict(_subparsers(build_parser()))
    assert {"train", "generate", "evaluate", "quantize", "quantize-activations", "report", "demo"} <= \
        {c[0] for c in commands}
    for words, sub in commands.items():
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also after hyphens)
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # flags, positionals, required options
            help_text = action.help % vars(action) if action.help else ""
            assert "".join(help_text.split()) in text and "default" in help_text.lower(), (words, action.option_strings)
            if action.default is not None and "%(default)" not in (action.help or ""):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                assert shown in help_text, (words, action.option_strings, action.default)


def test_one_line_warnings_last_only_for_the_call(tmp_path, monkeypatch, capsys):
    import warnings

    import tuneqdm.cli
    from tuneqdm.errors import TuneQDMWarning

    def warns(args):
        warnings.warn("the photos are small", TuneQDMWarning)

    monkeypatch.setattr(tuneqdm.cli, "_toy_subject", warns)
    before = warnings.showwarning
    assert main(["toy", "subject", "--seed", "1", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().err == "tuneqdm: warning: the photos are small\n"
    assert warnings.showwarning is before  # the caller's own hook is given back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("after the call", TuneQDMWarning)
    assert [str(w.message) for w in caught] == ["after the call"]
