import math

import pytest
import torch

from core.ops.quantization import dequantize, quantize, sqnr_db

# Uniform quantization of Gaussian weights gains ~6 dB per bit; floors leave margin for the
# clipping-free max range used here.
FLOORS = {2: 0.5, 3: 7.0, 4: 14.0, 6: 26.0, 8: 38.0, 12: 62.0, 16: 86.0}


@pytest.mark.parametrize("bits", sorted(FLOORS))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_sqnr_floor_and_zeros_preserved(bits, symmetric, per_channel):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(128, 96, generator=g)
    mask = w.abs() > 0.6
    qt = quantize(w, bits, symmetric=symmetric, per_channel=per_channel, mask=mask)
    deq = dequantize(qt)
    assert torch.all(deq[~mask] == 0.0)
    assert int(qt.codes.min()) >= qt.qmin and int(qt.codes.max()) <= qt.qmax
    assert sqnr_db(w * mask, deq) >= FLOORS[bits]


def test_exact_zero_representable_asymmetric_positive_only():
    w = torch.rand(10, 10) + 1.0
    qt = quantize(w, 4, symmetric=False)
    assert int(qt.zero_point) == 0
    assert sqnr_db(w, dequantize(qt)) > 15


def test_sqnr_identical_is_inf():
    w = torch.randn(4)
    assert sqnr_db(w, w) == math.inf
