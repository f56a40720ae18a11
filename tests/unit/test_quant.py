"""Weight and activation quantization math (lowbit.numerics.quant)."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.numerics.quant import (dequantize_weight, group_layout,
                                   quantize_activation_per_token, quantize_weight, sqnr_db)

# dequantization runs in float32 with float32 scales: |q - z| <= 255 codes of relative
# rounding 6e-8 each add at most ~3e-5 of a half step
_HALF_STEP_SLACK = 1e-4


def _weight(n=16, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _assert_within_half_step(w, qw):
    n, groups, group = qw.codes.shape
    pad = groups * group - w.shape[1]
    err = torch.nn.functional.pad((dequantize_weight(qw) - w).abs(), (0, pad))
    bound = qw.scales[..., None] / 2 * (1 + _HALF_STEP_SLACK)
    excess = err.reshape(n, groups, group) - bound
    assert float(excess.max()) <= 0, f"error exceeds half a step by {float(excess.max()):.3e}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid(bits):
    w = _weight()
    qw = quantize_weight(w, bits, 64, symmetric=True)
    half = 2 ** (bits - 1)
    assert qw.codes.shape == (16, 4, 64) and qw.scales.shape == (16, 4)
    assert (qw.zero_points == half).all()
    centred = qw.codes.to(torch.int32) - half
    assert int(centred.min()) >= -(half - 1) and int(centred.max()) <= half - 1
    absmax = w.reshape(16, 4, 64).abs().amax(-1)
    torch.testing.assert_close(qw.scales, absmax / (half - 1), rtol=1e-6, atol=0)
    _assert_within_half_step(w, qw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid(bits):
    w = _weight() + 0.5  # off-centre, so the zero point matters
    qw = quantize_weight(w, bits, 64, symmetric=False)
    qmax = 2 ** bits - 1
    assert int(qw.codes.max()) <= qmax and int(qw.zero_points.max()) <= qmax
    wg = w.reshape(16, 4, 64)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    torch.testing.assert_close(qw.scales, (hi - lo) / qmax, rtol=1e-6, atol=0)
    # the extremes map to the ends of the grid
    assert (qw.codes.amax(-1) >= qmax - 1).all() and (qw.codes.amin(-1) <= 1).all()
    _assert_within_half_step(w, qw)


@pytest.mark.parametrize("symmetric", [True, False])
def test_partial_last_group_is_padded_with_exact_zeros(symmetric):
    w = _weight(n=8, k=576)
    assert group_layout(576, 128) == (128, 5)
    qw = quantize_weight(w, 4, 128, symmetric=symmetric)
    assert qw.codes.shape == (8, 5, 128) and qw.in_features == 576
    padded = qw.codes[:, -1, 576 - 512:]
    assert (padded == qw.zero_points[:, -1:]).all()
    full = (qw.codes.float() - qw.zero_points[..., None].float()) * qw.scales[..., None]
    assert (full.reshape(8, -1)[:, 576:] == 0).all()
    # the last group's range comes from its 64 real values only
    real = w[:, 512:]
    if symmetric:
        expected = real.abs().amax(-1) / 7
    else:
        expected = (real.amax(-1).clamp(min=0) - real.amin(-1).clamp(max=0)) / 15
    torch.testing.assert_close(qw.scales[:, -1], expected, rtol=1e-6, atol=0)
    assert dequantize_weight(qw).shape == (8, 576)
    _assert_within_half_step(w, qw)


def test_per_channel_when_group_size_is_none():
    w = _weight(n=6, k=200)
    qw = quantize_weight(w, 8, None, symmetric=True)
    assert qw.codes.shape == (6, 1, 200) and qw.group_size == 200
    torch.testing.assert_close(qw.scales[:, 0], w.abs().amax(-1) / 127, rtol=1e-6, atol=0)
    _assert_within_half_step(w, qw)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.zeros(2, 3, 4), 4, 32, True)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.zeros(2, 32), 9, 32, True)
    with pytest.raises(ValueError, match="group_size"):
        group_layout(64, 0)


def test_activation_per_token_matches_hand_computation():
    x = torch.tensor([[127.0, -63.5, 10.0],     # s = 1: -63.5 rounds half to even
                      [254.0, 1.0, -3.0],       # s = 2: 0.5 -> 0, -1.5 -> -2
                      [0.0, 0.0, 0.0]])         # all zero: s is the 1e-8 floor
    xq, s = quantize_activation_per_token(x, 8)
    assert s.shape == (3, 1)
    torch.testing.assert_close(s, torch.tensor([[1.0], [2.0], [1e-8 / 127]]), rtol=1e-7, atol=0)
    assert xq.tolist() == [[127.0, -64.0, 10.0], [127.0, 0.0, -2.0], [0.0, 0.0, 0.0]]


def test_activation_per_token_four_bits_and_batch_dims():
    x = torch.tensor([[[7.0, 3.5, -2.5], [-14.0, 1.0, 5.0]]])
    xq, s = quantize_activation_per_token(x, 4)
    assert s.flatten().tolist() == [1.0, 2.0]
    assert xq.tolist() == [[[7.0, 4.0, -2.0], [-7.0, 0.0, 2.0]]]


def test_sqnr_db():
    x = _weight(4, 32)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0, abs=1e-5)  # 0.9 x rounds in float32
