"""The runtime registry of the quantized layers (tuneqdm.quant.runtime): one named place for what the code driving a
layer installs on it, listed per model, never part of the state dict."""

import copy

import pytest
import torch
from torch import nn

import tuneqdm
from tuneqdm.quant import runtime
from tuneqdm.quant.paths import DynamicActivations, sampling_kernels, set_kernels
from tuneqdm.quant.weight_cache import cached_weights


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=4, method="peqa", experts=1))
    return model


def test_is_quantized_says_whether_quantize_made_the_model():
    model = nn.Sequential(nn.Linear(8, 4))
    assert not tuneqdm.is_quantized(model)
    tuneqdm.quantize_(model, tuneqdm.QuantConfig(bits=4, method="peqa", experts=1))
    assert tuneqdm.is_quantized(model)
    tuneqdm.dequantize_(model)
    assert not tuneqdm.is_quantized(model)


def test_what_is_installed_is_listed_per_layer_and_removed_on_exit():
    model = _model()
    assert tuneqdm.installed_runtime(model) == {"0": ["router"], "2": ["router"]}
    set_kernels(model, "reference")
    acts = DynamicActivations(exclude=()).install(model)
    with cached_weights(model):
        assert tuneqdm.installed_runtime(model)["0"] == ["router", "kernels", "input_quantizer", "weight_cache"]
    acts.remove()
    assert tuneqdm.installed_runtime(model)["2"] == ["router", "kernels"]
    set_kernels(model, "auto")
    with torch.no_grad(), sampling_kernels(model, grid_bytes=1 << 20):
        model(torch.randn(2, 8))
        assert set(tuneqdm.installed_runtime(model)["0"]) == {"router", "kernels", "grid_budget", "grid", "last_path"}
    assert "grid" not in tuneqdm.installed_runtime(model)["0"]


def test_entries_are_read_as_attributes_and_never_reach_the_state_dict():
    model = _model()
    layer = model[0]
    keys = list(model.state_dict())
    assert layer.kernels == "auto" and layer.runtime.get(runtime.KERNELS) is None  # the default, not installed
    layer.runtime.install(runtime.KERNELS, "reference")
    assert layer.kernels == "reference" and list(model.state_dict()) == keys
    assert layer.runtime.remove(runtime.KERNELS) == "reference" and layer.kernels == "auto"
    with pytest.raises(KeyError):
        layer.runtime.install("kernel", "int8")  # a misspelt entry is refused, not silently ignored


def test_a_copied_model_routes_by_its_own_router():
    model = _model()
    twin = copy.deepcopy(model)
    router = twin[0].router
    assert router is not model[0].router and router is twin[2].router
