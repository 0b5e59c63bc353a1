import json

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
