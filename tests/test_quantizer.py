import pytest
import torch

from tuneqdm import TuneQDMError
from tuneqdm.quant.packing import qrange
from tuneqdm.quant.quantizer import quantize_weight, sqnr_db

# Lower bounds for Gaussian weights (64 x 576, like a 3x3 conv); ~6 dB per bit, MSE clipping helps most at low bits.
SQNR_FLOOR_DB = {8: 40.0, 4: 19.0, 2: 7.5}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sqnr_per_bit_width(bits, record_property, capsys):
    w = torch.randn(64, 64, 3, 3) * 0.05
    mm = sqnr_db(w, quantize_weight(w, bits, "minmax").dequantize())
    mse = sqnr_db(w, quantize_weight(w, bits, "mse").dequantize())
    record_property(f"sqnr_w{bits}", {"minmax": mm, "mse": mse})
    with capsys.disabled():
        print(f"\nSQNR W{bits}: minmax {mm:.2f} dB, mse {mse:.2f} dB")
    assert mse >= mm - 1e-6
    assert mse >= SQNR_FLOOR_DB[bits]
    if bits <= 4:
        assert mse > mm + 0.5  # the clipping search matters at low bit widths


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_per_channel_asymmetric_properties(bits, init):
    w = torch.randn(16, 40)
    w[3] += 5  # an all-positive channel
    w[5] = 0  # a dead channel
    qw = quantize_weight(w, bits, init)
    lo, hi = qrange(bits)
    assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    assert qw.zero_point.shape == (16,) and qw.scale.shape == (16,)
    # zero is exactly representable, so the dead channel comes back as exact zeros
    assert torch.equal(qw.dequantize()[5], torch.zeros(40))
    if init == "minmax":  # the channel's extremes are within half a step
        err = (w - qw.dequantize()).abs().amax(dim=1)
        assert torch.all(err <= qw.scale / 2 + 1e-6)


def test_unknown_init():
    with pytest.raises(TuneQDMError, match="unknown quantizer init 'absmax': choose 'minmax' or 'mse'"):
        quantize_weight(torch.randn(2, 2), 4, "absmax")


def _reference_mse(weight: torch.Tensor, bits: int):
    """The mse init written out of place, as the quantizer first computed it: the in-place search must match it bit
    for bit (the integers are what adapters' fingerprints are made of)."""
    from tuneqdm.quant.quantizer import MSE_GRID, _params_for_range

    qmin, qmax = qrange(bits)
    w2d = weight.reshape(weight.shape[0], -1).float()
    lo, hi = w2d.amin(dim=1).clamp(max=0), w2d.amax(dim=1).clamp(min=0)

    def error(s, z):
        q = torch.clamp(torch.round(w2d / s[:, None]) + z[:, None], qmin, qmax)
        return (w2d - (q - z[:, None]) * s[:, None]).pow_(2).sum(dim=1)

    scale, zero = _params_for_range(lo, hi, bits)
    best = error(scale, zero)
    for ratio in MSE_GRID[1:]:
        s, z = _params_for_range(lo * ratio, hi * ratio, bits)
        err = error(s, z)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    q = torch.clamp(torch.round(w2d / scale[:, None]) + zero[:, None], qmin, qmax)
    return q.to(torch.int8).view(weight.shape), zero.to(torch.int8), scale


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(64, 320), (32, 16, 3, 3), (5, 7)])
def test_the_in_place_mse_search_gives_the_out_of_place_integers(bits, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * 0.05
    got, (q, zero, scale) = quantize_weight(w, bits, "mse"), _reference_mse(w, bits)
    assert torch.equal(got.q, q) and torch.equal(got.zero_point, zero) and torch.equal(got.scale, scale)
