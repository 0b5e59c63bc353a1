"""Low-bit integers packed into bytes.

Signed integers of ``bits`` bits are offset to unsigned codes (``q + 2**(bits-1)``) and packed little-end first::

    int4, 2 per byte:   byte = | q1+8 (bits 7..4) | q0+8 (bits 3..0) |
    int2, 4 per byte:   byte = | q3+2 | q2+2 | q1+2 | q0+2 |     (2 bits each, q0 in bits 1..0)
    int8:               stored as int8, unchanged.

Values are packed in row-major order of the flattened tensor; the last byte is zero-padded when the element count is
not a multiple of the values per byte, so any shape (odd lengths included) round-trips exactly. The shape itself is
not stored here: the owning layer knows it.
"""

from __future__ import annotations

import math

import torch

from ..errors import TuneQDMError
from .bits import SUPPORTED_BITS, Bits, qrange  # noqa: F401  (re-exported: the CLI's choices name SUPPORTED_BITS here)


def values_per_byte(bits: int) -> int:
    return Bits(bits).values_per_byte


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed to hold ``numel`` values of ``bits`` bits."""
    return math.ceil(numel / values_per_byte(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integers (any integer dtype, values within ``qrange(bits)``) into a flat uint8/int8 tensor."""
    lo, hi = qrange(Bits(bits))
    flat = q.reshape(-1)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise TuneQDMError(f"values outside the int{bits} range [{lo}, {hi}] cannot be packed")
    if bits == 8:
        return flat.to(torch.int8).contiguous()
    per = values_per_byte(bits)
    codes = (flat.to(torch.int16) - lo).to(torch.uint8)
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, per)
    out = torch.zeros(codes.shape[0], dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= codes[:, i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` stored codes, flat: ``q − lo`` as uint8 for int2/int4, ``q`` itself (int8) for int8."""
    if Bits(bits) == 8:
        return packed[:numel]
    per = values_per_byte(bits)
    codes = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
    for i in range(per):  # one strided write per position in the byte: 2x faster than a broadcast shift (4-bit)
        torch.bitwise_right_shift(packed, bits * i, out=codes[:, i])
    codes[:, : per - 1] &= 2**bits - 1  # the top position has nothing above it
    return codes.view(-1)[:numel]


def unpack_codes_into(packed: torch.Tensor, bits: int, out: torch.Tensor, tmp: torch.Tensor | None = None) -> None:
    """Write every stored code (``packed.numel() * values_per_byte`` of them, padding included) into the float
    tensor ``out``, converting while unpacking: one strided copy per position in the byte, no wide temporary.

    ``tmp`` (uint8, ``packed.numel()`` elements) is reused for the shifted bytes. Layers subtract ``z − lo`` per row
    afterwards.
    """
    if Bits(bits) == 8:
        out.copy_(packed)
        return
    per = values_per_byte(bits)
    cols = out.view(-1, per)
    tmp = torch.empty_like(packed) if tmp is None else tmp
    for i in range(per):
        torch.bitwise_right_shift(packed, bits * i, out=tmp)
        if i < per - 1:
            tmp &= 2**bits - 1
        cols[:, i].copy_(tmp)


def code_offset(bits: int) -> int:
    """What :func:`unpack_codes` adds to the signed value (0 for int8)."""
    return 0 if bits == 8 else -qrange(bits)[0]


def unpack(packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` signed values, flat, as ``dtype``."""
    codes = unpack_codes(packed, bits, numel)
    if bits == 8:
        return codes.to(dtype)
    return codes.view(torch.int8).sub_(code_offset(bits)).to(dtype)  # codes < 2^4 fit int8: no wide temporary
