import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneqdm import TuneQDMError
from tuneqdm.quant.packing import pack, packed_numel, qrange, unpack


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip_any_shape(bits, shape, seed):
    lo, hi = qrange(bits)
    q = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack(q, bits)
    assert packed.numel() == math.ceil(q.numel() * bits / 8)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(unpack(packed, bits, q.numel()).view(shape), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_extremes_and_odd_lengths(bits):
    lo, hi = qrange(bits)
    for n in (1, 2, 3, 5, 7, 9, 1001):
        q = torch.tensor([lo, hi] * n, dtype=torch.int8)[:n]
        assert torch.equal(unpack(pack(q, bits), bits, n), q)
        assert packed_numel(n, bits) == math.ceil(n * bits / 8)


def test_bit_layout_is_documented_one():
    # int4: q0 in the low nibble, offset by 8; int2: q0 in bits 1..0, offset by 2
    assert pack(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0 | (15 << 4)]
    assert pack(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2).tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6]


def test_out_of_range_values_are_refused():
    with pytest.raises(TuneQDMError, match=r"values outside the int4 range \[-8, 7\] cannot be packed"):
        pack(torch.tensor([8]), 4)


def test_unsupported_bits():
    with pytest.raises(TuneQDMError, match="unsupported bit width 3: choose one of 2, 4 or 8"):
        pack(torch.tensor([1]), 3)
