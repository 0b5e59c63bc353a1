"""Every long command shows what it is doing on stderr (tqdm bars and stage lines), and ``--quiet`` silences them.

Each command runs twice on tiny models (or the embedded one where the command only takes it): once with its bars'
names expected on stderr, once with ``--quiet`` and an empty stderr."""

import pytest

from tuneqdm.cli import main
from tuneqdm.progress import is_quiet, progress, quiet_while, set_quiet, stage



@pytest.fixture(scope="module")
def adapter(base, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "out"
    assert main(["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
                 "--instance_prompt", "a sks box", "--max_train_steps", "1", "--quant_init", "minmax",
                 "--output_dir", str(out), "--quiet"]) == 0
    return out


def _commands(base, photos, adapter, tmp, prompts):
    b = ["--pretrained_model_name_or_path", str(base)]
    return {
        "demo": (["demo", "--steps", "2", "--out", str(tmp / "demo")], ["demo: train the scales", "demo: sample"]),
        "train": (["train", *b, "--instance_data_dir", str(photos), "--instance_prompt", "a sks box",
                   "--max_train_steps", "2", "--quant_init", "minmax", "--with_prior_preservation",
                   "--class_prompt", "a box", "--num_class_images", "2", "--prior_inference_steps", "2",
                   "--validation_prompt", "a sks box", "--validation_steps", "2", "--num_validation_images", "1",
                   "--validation_inference_steps", "2", "--output_dir", str(tmp / "train")],
                  [f"loading {base}", "class images of 'a box'", "encoding 5 images and 2 prompts",
                   "UNet quantized to 4 bits (minmax) from the cache", "train: 100%", "validation at step 2"]),
        "generate": (["generate", "--adapter", str(adapter), "--prompt", "a sks box", "--num_images", "5",
                      "--num_inference_steps", "2", "--out", str(tmp / "gen")],
                     [f"loading {base}", "UNet quantized to 4 bits (minmax) from the cache", "images:", "denoising"]),
        "evaluate": (["evaluate", "--adapter", str(adapter), "--instance_data_dir", str(photos), "--class_word", "box",
                      "--prompts", str(prompts), "--images_per_prompt", "1", "--num_inference_steps", "2",
                      "--evaluator", "toy", "--out", str(tmp / "eval")],
                     [f"loading {base}", "evaluate: prompts", "denoising"]),
        "fid": (["evaluate", "--metric", "fid", "--fid_images", "2", "--num_inference_steps", "1",
                 "--out", str(tmp / "fid")],
                ["loading the embedded toy pipeline", "sampling captions", "encoding 2 images"]),
        "quantize": (["quantize", *b, "--calibrate", "adaround", "--calib_prompts", str(prompts), "--calib_samples",
                      "1", "--calib_steps", "1", "--num_inference_steps", "2", "--iters", "1",
                      "--out", str(tmp / "w4")],
                     [f"loading {base}", "calibration inputs", "quantizing the UNet to 4 bits (mse)", "adaround: blocks"]),
        "quantize-activations": (["quantize-activations", *b, "--calib_prompts", str(prompts), "--calib_samples", "1",
                                  "--num_inference_steps", "2", "--groups", "2", "--out", str(tmp / "a8")],
                                 [f"loading {base}", "observing activations", "fitting A8 K=2"]),
        "benchmark": (["benchmark", "fidelity", *b, "--subjects", "0", "--methods", "peqa", "--max_train_steps", "1",
                       "--images_per_prompt", "1", "--num_inference_steps", "1", "--prompts", str(prompts),
                       "--out", str(tmp / "bench")],
                      ["benchmark fidelity: cells", "train: 100%", "evaluate: prompts"]),
    }


COMMANDS = ["demo", "train", "generate", "evaluate", "fid", "quantize", "quantize-activations", "benchmark"]


def test_streaming_quantize_shows_its_tensors_and_bytes(base, tmp_path, capsys):
    """The streamed path (minmax/mse without a calibration pass) reads the model tensor by tensor: its one bar
    counts both (issue 31 asked for tensors and bytes; the bar counted bytes only)."""
    assert main(["quantize", "--pretrained_model_name_or_path", str(base), "--calibrate", "minmax",
                 "--no-split_shortcuts", "--out", str(tmp_path / "w4")]) == 0
    from safetensors import safe_open

    err = capsys.readouterr().err
    with safe_open(next((base / "unet").glob("*.safetensors")), "pt") as f:
        tensors = len(f.keys())
    assert "quantizing the UNet to 4 bits (minmax): 100%" in err and f"{tensors}/{tensors} tensors" in err, err


@pytest.mark.parametrize("name", COMMANDS)
def test_long_commands_show_progress_and_quiet_silences_it(name, base, photos, adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1}\n")
    argv, expected = _commands(base, photos, adapter, tmp_path / "loud", prompts)[name]
    assert main(argv) == 0
    err = capsys.readouterr().err
    missing = [e for e in expected if e not in err]
    assert not missing, f"{name}: no {missing} on stderr:\n{err[-2000:]}"
    argv, _ = _commands(base, photos, adapter, tmp_path / "quiet", prompts)[name]
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert not is_quiet()  # --quiet lasts for its command only


def test_every_command_takes_quiet():
    from tuneqdm.cli import build_parser

    parser = build_parser()
    leaves = [["demo"], ["train"], ["quantize", "--out", "x"], ["generate", "--prompt", "x"],
              ["quantize-activations"], ["evaluate"], ["benchmark", "fidelity"], ["report", "r"],
              ["toy", "subject", "--seed", "0", "--out", "x"], ["toy", "scenes", "--out", "x.png"]]
    for argv in leaves:
        assert parser.parse_args([*argv, "--quiet"]).quiet is True, argv


def test_stage_and_bars_honour_the_quiet_switch(capsys):
    with stage("loading something"):
        pass
    list(progress(range(3), desc="counting"))
    err = capsys.readouterr().err
    assert "loading something ..." in err and "counting: 100%" in err and "3/3" in err
    with quiet_while(True):
        assert is_quiet()
        with stage("hidden stage"):
            list(progress(range(3), desc="hidden bar"))
    assert not is_quiet() and capsys.readouterr().err == ""
    set_quiet(True)
    try:
        with quiet_while(False):  # a quiet caller stays quiet
            assert is_quiet()
    finally:
        set_quiet(False)
