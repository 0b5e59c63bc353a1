"""The runtime state that the code driving a quantized layer installs on it, in one named registry per layer (in the
spirit of diffusers' ``HookRegistry``): the timestep router, a weight cache, the sampling path, an activation
quantizer, the held integer grid and its budget, and the path the last call took.

None of it is a parameter, a buffer or a submodule, so ``state_dict`` and the numbers ``forward`` computes are what
they were; each entry is read in ``forward`` as an attribute of the layer (``layer.router``, declared with
``RuntimeEntry``), written with ``layer.runtime.install(name, value)`` and ``remove(name)``, and ``installed(model)``
lists what is installed on which layer of a model.
"""

from __future__ import annotations

from torch import nn

# the entries, each with what installs it
ROUTER = "router"  # tuning.routing.Router shared by the model's layers (tuning.model.configure_)
WEIGHT_CACHE = "weight_cache"  # quant.weight_cache.WeightCache inside cached_weights()
KERNELS = "kernels"  # the sampling path, "auto" when absent: "int8" or "reference" (quant.paths.set_kernels)
INPUT_QUANTIZER = "input_quantizer"  # params(x), fake_quantize(x): ptq.activations, quant.paths.DynamicActivations
GRID = "grid"  # the signed integers as int8, held inside quant.paths.sampling_kernels() (quant.kernels.signed_grid)
GRID_BUDGET = "grid_budget"  # [bytes left], shared by the layers of one sampling_kernels() session
LAST_PATH = "last_path"  # the path the layer's last call took (read by quant.paths.kernel_report)
ENTRIES = (ROUTER, WEIGHT_CACHE, KERNELS, INPUT_QUANTIZER, GRID, GRID_BUDGET, LAST_PATH)


class LayerRuntime:
    """The named runtime entries of one quantized layer."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: dict[str, object] = {}

    def get(self, name: str, default=None):
        return self._entries.get(name, default)

    def install(self, name: str, value) -> None:
        """Install ``value`` as the entry ``name`` (replacing one installed before); None removes it."""
        if name not in ENTRIES:
            raise KeyError(f"no runtime entry {name!r} on a quantized layer (known: {', '.join(ENTRIES)})")
        if value is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = value

    def remove(self, name: str):
        """Remove the entry ``name``; returns what was installed (None when nothing was)."""
        return self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)


class RuntimeEntry:
    """A layer attribute that reads and writes one registry entry (``default`` where it is not installed)."""

    def __init__(self, name: str, default=None):
        self.name, self.default = name, default

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        return layer.runtime.get(self.name, self.default)

    def __set__(self, layer, value) -> None:
        layer.runtime.install(self.name, value)


def installed_runtime(model: nn.Module) -> dict[str, list[str]]:
    """``{layer name: [installed entries]}`` of every quantized layer of ``model`` that holds any."""
    return {name: m.runtime.names() for name, m in model.named_modules()
            if isinstance(getattr(m, "runtime", None), LayerRuntime) and m.runtime.names()}
