"""How activations are quantized (``ActivationConfig``) and the checks of its settings: one module below both
``activations`` (the grouped quantizers) and ``attention`` (the quantized attention probabilities), which share them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TuneQDMError, either
from ..options import option
from ..quant.kernels import DYNAMIC_BITS, FLOAT_BITS
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


# ---- the activation flags of `tuneqdm generate` and `tuneqdm quantize-activations` (tuneqdm.options) ----------------
def activation_bits_option(calibrate_only: bool):
    if calibrate_only:
        return option(8, f"activation bits: {either(ACTIVATION_BITS)} (default 8)")
    return option(None, f"quantize activations to {either(ACTIVATION_BITS)} bits (DGQ), or {FLOAT_BITS}: full "
                        f"precision (default: {DYNAMIC_BITS}-bit dynamic for an --adapter trained with "
                        f"--activation_bits {DYNAMIC_BITS}, else full precision)")


def attention_quant_option():
    return option("log", "attention probabilities: log (DGQ's dynamic prompt-specific scale, <start> kept, levels over "
                         "16 octaves), log2 (the same with one level per octave, as published), uniform (baseline) or "
                         "none (default log)", choices=ATTENTION_MODES)


def activations_option():
    return option(None, "a folder of `tuneqdm quantize-activations` (default: QUANTIZED_BASE/activations-aB-kK if it "
                        "exists, else calibrated now)")


def groups_option():
    return option(16, f"DGQ groups per layer: {either(GROUP_CHOICES)}; 1 is the layer-wise min-max baseline "
                      "(default 16)")


def calib_prompts_option():
    return option(None, "calibration prompts, one per line (default for the embedded pipeline: toy-world captions, "
                        "seed 40M)")


def calib_samples_option():
    return option(None, "number of calibration prompts (default: the file, or 64)")
