"""How activations are quantized (``ActivationConfig``) and the checks of its settings: one module below both
``activations`` (the grouped quantizers) and ``attention`` (the quantized attention probabilities), which share them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TuneQDMError, either
from ..quant.kernels import DYNAMIC_BITS  # noqa: F401  (re-exported: the CLI's checks name it from here)
from ..quant.paths import DEFAULT_EXCLUDE

ACTIVATION_BITS = (6, 8)
GROUP_CHOICES = (1, 2, 8, 16)
ATTENTION_MODES = ("log", "log2", "uniform", "none")


def check_activation_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in ACTIVATION_BITS:
        raise TuneQDMError(f"activation bits {bits!r} are not supported: choose {either(ACTIVATION_BITS)}")
    return int(bits)


def check_groups(groups) -> int:
    if isinstance(groups, bool) or groups not in GROUP_CHOICES:
        raise TuneQDMError(f"--groups {groups!r} is not supported: choose {either(GROUP_CHOICES)}")
    return int(groups)


@dataclass
class ActivationConfig:
    """How activations are quantized. ``groups=1, attention="uniform"`` is the layer-wise min-max baseline."""

    bits: int = 8
    groups: int = 16
    # attention probabilities: "log" (DGQ, 16 octaves), "log2" (DGQ as published, one level per octave),
    # "uniform" (baseline) or "none" (full precision); see tuneqdm.ptq.attention
    attention: str = "log"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # fnmatch patterns of layers kept in full precision

    def __post_init__(self):
        self.bits = check_activation_bits(self.bits)
        self.groups = check_groups(self.groups)
        if self.attention not in ATTENTION_MODES:
            raise TuneQDMError(f"attention quantization {self.attention!r} is unknown: "
                               f"choose {either(ATTENTION_MODES)}")
        self.exclude = tuple(self.exclude)
