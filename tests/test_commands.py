"""Every command is a config dataclass and a run function (``tuneqdm.commands``, exported from ``tuneqdm``): the CLI's
flags are the configs' fields, so their defaults cannot drift, and each command runs from Python as it runs from the
command line. ``Bits`` is the one check of a weight bit width."""

import json
from dataclasses import MISSING, fields

import pytest
from test_cli import _subparsers

import tuneqdm
from tuneqdm.cli import build_parser, main
from tuneqdm.errors import TuneQDMError
from tuneqdm.options import field_default, settings
from tuneqdm.quant.bits import SUPPORTED_BITS, Bits

# the config of every subcommand, with the values its required flags are given here
CONFIGS = {
    ("demo",): (tuneqdm.DemoConfig, {}),
    ("train",): (tuneqdm.TrainConfig, {"instance_data_dir": "photos"}),  # the one setting train cannot default
    ("quantize",): (tuneqdm.QuantizeConfig, {"out": "q"}),
    ("export",): (tuneqdm.ExportConfig, {"adapter": "a", "to": "lora", "out": "o"}),
    ("generate",): (tuneqdm.GenerateConfig, {"prompt": "a box"}),
    ("quantize-activations",): (tuneqdm.QuantizeActivationsConfig, {}),
    ("evaluate",): (tuneqdm.EvaluateConfig, {}),
    ("benchmark", "fidelity"): (tuneqdm.BenchmarkFidelityConfig, {}),
    ("report",): (tuneqdm.ReportConfig, {"results": "r"}),
    ("toy", "subject"): (tuneqdm.ToySubjectConfig, {"seed": 3, "out": "s"}),
    ("toy", "scenes"): (tuneqdm.ToyScenesConfig, {"out": "x.png"}),
}


def _argv(words, required: dict) -> list[str]:
    argv = list(words)
    for name, value in required.items():
        argv += [str(value)] if name == "results" else [f"--{name}", str(value)]
    return argv


def test_every_subcommand_has_a_config():
    leaves = {words for words, parser in _subparsers(build_parser()) if parser.get_default("func") is not None}
    assert leaves == set(CONFIGS)


@pytest.mark.parametrize("words", list(CONFIGS), ids=" ".join)
def test_every_flag_default_is_its_config_fields_default(words):
    config, required = CONFIGS[words]
    parsed = settings(build_parser().parse_args(_argv(words, required)))
    defaults = {f.name: field_default(f) for f in fields(config) if f.default is not MISSING or
                f.default_factory is not MISSING}
    assert parsed == {**defaults, **required}
    assert config(**parsed) == config(**required)  # the Python API's defaults are the command line's


def test_the_commands_are_exported_lazily():
    import subprocess
    import sys

    code = "import sys, tuneqdm; print('tuneqdm.commands' in sys.modules, callable(tuneqdm.run_generate))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "True"]
    assert set(tuneqdm.COMMANDS) <= set(tuneqdm.__all__)


def test_bits_is_checked_once_with_the_settings_words():
    assert Bits(4) == 4 and isinstance(Bits(4), int) and Bits(Bits(2)) == 2
    assert (Bits(4).qrange, Bits(2).values_per_byte, json.dumps({"bits": Bits(8)})) == ((-8, 7), 4, '{"bits": 8}')
    for bad in (3, 16, True, "4", None):
        with pytest.raises(TuneQDMError, match=rf"^unsupported bit width {bad!r}: choose one of 2, 4 or 8$"):
            Bits(bad)
    with pytest.raises(TuneQDMError, match=r"^unsupported --bits 3: choose 2, 4 or 8$"):
        tuneqdm.QuantizeConfig(out="q", bits=3)
    with pytest.raises(TuneQDMError, match=r"^unsupported bit width 6: choose one of 2, 4 or 8$"):
        tuneqdm.BenchmarkFidelityConfig(bits=[4, 6])
    assert tuneqdm.DemoConfig(bits=2).bits == 2 and SUPPORTED_BITS == (2, 4, 8)


def test_toy_commands_run_from_python(tmp_path, capsys):
    meta = tuneqdm.run_toy_subject(tuneqdm.ToySubjectConfig(seed=5, out=str(tmp_path / "s5")))
    assert json.loads((tmp_path / "s5" / "subject.json").read_text()) == meta
    captions = tuneqdm.run_toy_scenes(tuneqdm.ToyScenesConfig(out=str(tmp_path / "g.png"), num=2, scale=1))
    assert len(captions) == 2 and (tmp_path / "g.png").is_file()
    assert capsys.readouterr().out.splitlines()[1:] == captions
    with pytest.raises(TuneQDMError, match=r"^--num must be at least 1, got 0$"):
        tuneqdm.run_toy_scenes(tuneqdm.ToyScenesConfig(out=str(tmp_path / "h.png"), num=0))


def test_train_generate_evaluate_export_and_report_run_from_python(base, photos, tmp_path, capsys):
    """The chain of the README's commands, each from its config; generate's images equal the CLI's."""
    run = tuneqdm.run_train(tuneqdm.TrainConfig(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(photos), instance_prompt="a sks box",
        output_dir=str(tmp_path / "run"), resolution=32, max_train_steps=2, quant_init="minmax", quiet=True))
    assert (run / "adapter.safetensors").is_file()
    sampling = dict(prompt="a sks box", num_images=1, num_inference_steps=2, quiet=True)
    images = tuneqdm.run_generate(tuneqdm.GenerateConfig(adapter=str(run), out=str(tmp_path / "g"), **sampling))
    assert main(["generate", "--adapter", str(run), "--prompt", "a sks box", "--num_images", "1",
                 "--num_inference_steps", "2", "--out", str(tmp_path / "g2"), "--quiet"]) == 0
    assert (tmp_path / "g" / "000.png").read_bytes() == (tmp_path / "g2" / "000.png").read_bytes()
    assert len(images) == 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\n")
    metrics = tuneqdm.run_evaluate(tuneqdm.EvaluateConfig(
        adapter=str(run), instance_data_dir=str(photos), prompts=str(prompts), class_word="box", evaluator="toy",
        images_per_prompt=1, num_inference_steps=2, out=str(tmp_path / "e"), quiet=True))
    assert set(metrics) >= {"dino", "clip_i", "clip_t"}
    page = tuneqdm.run_report(tuneqdm.ReportConfig(results=str(tmp_path / "e"), image_format="png"))
    assert page == tmp_path / "e" / "report.html" and page.is_file()
    record = tuneqdm.run_export(tuneqdm.ExportConfig(adapter=str(run), to="lora", out=str(tmp_path / "x"),
                                                     quiet=True))
    assert (tmp_path / "x" / "pytorch_lora_weights.safetensors").is_file() and record
    capsys.readouterr()


def test_quantize_and_quantize_activations_run_from_python(base, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\n")
    record = tuneqdm.run_quantize(tuneqdm.QuantizeConfig(
        out=str(tmp_path / "q"), pretrained_model_name_or_path=str(base), calibrate="minmax",
        calib_prompts=str(prompts), calib_samples=1, num_inference_steps=2, quiet=True))
    assert record["grid_init"] == "minmax" and (tmp_path / "q" / "quantization.json").is_file()
    quantizer = tuneqdm.run_quantize_activations(tuneqdm.QuantizeActivationsConfig(
        pretrained_model_name_or_path=str(base), quantized_base=str(tmp_path / "q"), calib_prompts=str(prompts),
        calib_samples=1, num_inference_steps=2, quiet=True))
    assert quantizer.layers and (tmp_path / "q" / "activations-a8-k16").is_dir()
    capsys.readouterr()


def test_benchmark_and_demo_refuse_bad_settings_from_python(tmp_path):
    with pytest.raises(TuneQDMError, match=r"^--shard '2/2': write i/n with 0 <= i < n, e.g. 0/2$"):
        tuneqdm.run_benchmark_fidelity(tuneqdm.BenchmarkFidelityConfig(shard="2/2", out=str(tmp_path / "f")))
    with pytest.raises(TuneQDMError, match="holds no finished cells"):
        tuneqdm.run_benchmark_fidelity(tuneqdm.BenchmarkFidelityConfig(table_only=True, out=str(tmp_path / "f")))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    with pytest.raises(TuneQDMError):
        tuneqdm.run_demo(tuneqdm.DemoConfig(out=str(tmp_path / "d")))
