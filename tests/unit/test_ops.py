"""torch.ops.lowbit.quant_linear: the reference kernels every backend is compared with."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit.ops  # noqa: F401  (defines torch.ops.lowbit.*)
from lowbit.compiler.instruments import max_relative_error
from lowbit.numerics.quant import dequantize_weight, quantize_weight
from lowbit.passes.pack import pack_weight
from lowbit.testing import assert_numerically_equal

quant_linear = torch.ops.lowbit.quant_linear


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _call(x, p, bias, act_bits):
    return quant_linear(x, p.qweight, p.scales, p.zero_points, bias, p.in_features, p.bits,
                        p.group_size, act_bits)


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (4, 128, False),   # 576 = 4.5 groups: partial last group
    (4, 32, True),     # no zero points stored
    (3, 64, False),
    (2, 64, False),
    (8, None, True),   # per channel
])
def test_float_activations_equal_linear_with_dequantized_weight(bits, group_size, symmetric):
    w, b, x = _randn(24, 576, seed=0), _randn(24, seed=1), _randn(2, 5, 576, seed=2)
    qw = quantize_weight(w, bits, group_size, symmetric)
    p = pack_weight(qw)
    assert (p.zero_points is None) == symmetric
    y = _call(x, p, b, act_bits=0)
    assert y.shape == (2, 5, 24)
    assert_numerically_equal(y, F.linear(x, dequantize_weight(qw), b), rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_activations_equal_exact_integer_reference(symmetric):
    k = 200
    w, b, x = _randn(24, k, seed=3), _randn(24, seed=4), 3 * _randn(3, 7, k, seed=5)
    qw = quantize_weight(w, 8, None, symmetric)
    p = pack_weight(qw, act_bits=8)
    y = _call(x, p, b, act_bits=8)
    # integer reference: xq @ (q - z)^T in int64, then the two scales
    sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x / sx).clamp(-127, 127).to(torch.int64)
    wq = qw.codes.reshape(24, k).to(torch.int64) - qw.zero_points.to(torch.int64)
    acc = xq @ wq.T
    assert int(acc.abs().max()) < 2 ** 24  # exact in float32
    expected = acc.to(torch.float32) * sx * qw.scales[:, 0] + b
    assert_numerically_equal(y, expected, rtol=1e-6)
    # and the activations really were quantized: float activations give another answer
    assert max_relative_error(_call(x, p, b, act_bits=0), y) > 1e-4


def test_int8_activations_with_padded_single_group():
    # group_size 128 > K = 64: one group, padded; the integer path must drop the padding
    w, x = _randn(16, 64, seed=6), _randn(2, 3, 64, seed=7)
    qw = quantize_weight(w, 8, 128, symmetric=True)
    p = pack_weight(qw, act_bits=8)
    y = _call(x, p, None, act_bits=8)
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).to(torch.int64)
    wq = qw.codes.reshape(16, 128)[:, :64].to(torch.int64) - 128
    assert_numerically_equal(y, (xq @ wq.T).to(torch.float32) * sx * qw.scales[:, 0],
                             rtol=1e-6)


def test_int8_activations_with_grouped_weights_fake_quantize_the_input():
    w, x = _randn(16, 128, seed=8), _randn(2, 3, 128, seed=9)
    qw = quantize_weight(w, 8, 32, symmetric=True)
    y = _call(x, pack_weight(qw, act_bits=8), None, act_bits=8)
    sx = x.abs().amax(-1, keepdim=True) / 127
    expected = F.linear(torch.round(x / sx) * sx, dequantize_weight(qw))
    assert_numerically_equal(y, expected, rtol=1e-6)


def test_operator_registration_passes_opcheck():
    qw = quantize_weight(_randn(24, 576, seed=10), 4, 128, symmetric=False)
    p = pack_weight(qw)
    x = _randn(2, 5, 576, seed=11)
    torch.library.opcheck(quant_linear.default,
                          (x, p.qweight, p.scales, p.zero_points, None, 576, 4, 128, 0),
                          test_utils=("test_schema", "test_faketensor"))
