"""Every writer removes the temporaries its own dead runs left beside its output (issue 31: hidden
``.NAME.tmp-PID-*`` folders of an interrupted quantize or quantize-activations, gigabytes at FLUX size, were never
removed, though the README said so); a live writer's temporary and other names are left alone."""

import os

import pytest
import torch

import tuneqdm
from tuneqdm.files import write_file_atomically
from tuneqdm.ptq.activation_calibration import save_activations
from tuneqdm.ptq.activations import CHANNEL, ActivationQuantizer, LayerParams
from tuneqdm.ptq.config import ActivationConfig

from tiny_models import tiny_unet

DEAD = 4194999  # above Linux's largest pid: no process has it


def _activations(out):
    p = LayerParams(False, torch.tensor([CHANNEL], dtype=torch.int8), torch.zeros(1, 4, dtype=torch.uint8),
                    torch.zeros(1, 0, dtype=torch.uint8), torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    save_activations(ActivationQuantizer(ActivationConfig(groups=1, exclude=()), [500.0], {"proj": p}), out)


def _quantized(out):
    tuneqdm.save_quantized(tuneqdm.quantize_(tiny_unet(), tuneqdm.QuantConfig(bits=4, init="minmax")), out)


def _file(out):
    write_file_atomically(out, "{}")


@pytest.mark.parametrize("write", (_activations, _quantized, _file))
def test_a_writer_removes_its_dead_runs_temporaries(write, tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{DEAD}-abcd"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "quantized.safetensors").write_bytes(b"\0" * 4096)
    dead_file = tmp_path / f".out.tmp-{DEAD}-efgh"
    dead_file.write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a writer still running
    live.mkdir()
    other = tmp_path / f".other.tmp-{DEAD}-abcd"  # another output's: its own writer cleans it
    other.mkdir()
    write(out)
    assert out.exists() and not dead.exists() and not dead_file.exists()
    assert live.exists() and other.exists()
