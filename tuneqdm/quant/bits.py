"""A weight bit width as a small value object (in the spirit of optimum-quanto's ``qtype``): ``Bits(4)`` is checked
once where a setting enters (a config, a layer, a flag), and from then on it is an ``int`` that knows its integer
range and packing, so no later code checks it again. The one home of the supported widths and their error lines."""

from __future__ import annotations

from ..errors import TuneQDMError, either

SUPPORTED_BITS = (2, 4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range of ``bits`` bits, e.g. (-8, 7) for int4."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class Bits(int):
    """2, 4 or 8. ``flag`` names the setting in the error line (``Bits(3, "--bits")``: "unsupported --bits 3: ...");
    without it the error speaks of a bit width. A ``Bits`` passes through unchanged, so checking again is free."""

    def __new__(cls, bits, flag: str | None = None):
        if type(bits) is cls:
            return bits
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise TuneQDMError(f"unsupported {flag} {bits!r}: choose {either(SUPPORTED_BITS)}" if flag else
                               f"unsupported bit width {bits!r}: choose one of {either(SUPPORTED_BITS)}")
        return super().__new__(cls, bits)

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self)

    @property
    def values_per_byte(self) -> int:
        return 8 // self
