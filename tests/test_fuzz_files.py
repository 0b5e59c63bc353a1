"""The file fuzzer (benchmarks/fuzz_files.py) with a small count: every mutated adapter, quantized base and
checkpoint loads the identical model or ends in one TuneQDMError line."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_files  # noqa: E402


@pytest.mark.parametrize("kind", [k for k in fuzz_files.KINDS if k not in fuzz_files.CHANGEABLE])
def test_every_mutation_loads_the_same_model_or_is_refused_in_one_line(kind, tmp_path):
    cases = len(fuzz_files.MUTATIONS) * (1 if kind == "adapter" else 2)  # an adapter case loads base + adapter
    result = fuzz_files.fuzz(kind, cases=cases, seed=0, workdir=tmp_path)
    assert not result["failures"], result["failures"]
    assert result["totals"].get("refused", 0) >= cases // 2  # the mutations do damage the files


def test_the_comparison_sees_one_bit_and_nothing_else():
    a = {"x": torch.tensor([1.0, float("nan")]), "y": [1, 2.5, "s"], "z": torch.tensor(3)}
    b = {"x": a["x"].clone(), "y": (1, 2.5, "s"), "z": torch.tensor(3)}
    assert fuzz_files.same(a, b)
    b["x"].view(torch.int32)[0] ^= 1
    assert not fuzz_files.same(a, b)
    assert not fuzz_files.same({"z": torch.tensor(3)}, {"z": torch.tensor(3.0)})


@pytest.mark.parametrize("kind, cases", [("pipeline", 5), ("report", 15)])
def test_every_config_mutation_of_a_pipeline_or_report_loads_consistently_or_is_refused_in_one_line(kind, cases,
                                                                                                   tmp_path):
    """Pipeline folders and evaluation records carry no digests: a mutated config may describe another valid one
    ("changed"), but never a crash, a multi-line error or a pipeline loaded with weights its config does not use."""
    result = fuzz_files.fuzz(kind, cases=cases, seed=0, workdir=tmp_path)
    assert not result["failures"], result["failures"]
    assert result["totals"].get("refused", 0) >= 1 and sum(result["totals"].values()) == cases
