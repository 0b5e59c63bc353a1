"""Data parallel on CPU: 2 processes (gloo, launched by torchrun as `accelerate launch` would) with batch 1 each give
the adapter of 1 process with batch 2.

Both runs see the same samples, timesteps and noise (every draw is made for the global batch), and DDP averages the
per-process mean losses' gradients, which equals the 2-sample mean. The only difference is the order of float
additions in the all-reduce, so the losses agree to 6 digits and the scales to a relative 1e-4 after 3 Adam steps
(the steps themselves are 2e-3 relative: Adam amplifies rounding where a gradient is near zero). About 20 s, mostly
two more imports of torch and diffusers.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tuneqdm.train import TrainConfig, train

from tiny_pipelines import tiny_sd_pipeline


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path):
    base = tiny_sd_pipeline(tmp_path / "sd")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 200 - 50 * i, 90)).save(photos / f"{i}.png")
    common = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
              "--instance_prompt", "a sks box", "--resolution", "32", "--max_train_steps", "3", "--quiet",
              "--quant_init", "minmax"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "tuneqdm.cli", "train", *common, "--output_dir",
         str(tmp_path / "two"), "--train_batch_size", "1"],
        env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "gloo" in run.stderr.lower() and "unavailable" in run.stderr.lower():
        pytest.skip("torch.distributed without gloo on this platform")
    assert run.returncode == 0, run.stderr[-2000:]

    train(TrainConfig(pretrained_model_name_or_path=str(base), instance_data_dir=str(photos),
                      instance_prompt="a sks box", resolution=32, max_train_steps=3, quiet=True, quant_init="minmax",
                      output_dir=str(tmp_path / "one"), train_batch_size=2))

    two = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]  # written once, by the main process
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-6)
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=0)
    equal = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert equal > 0.9  # most scales are bit-identical
