"""GPTQ, clipping search and AWQ scales as tensor functions, against exact references."""
from __future__ import annotations

import pytest
import torch

from lowbit.numerics.gptq import (gptq_quantize, hessian_from_inputs, output_error,
                                  refine_scales, search_clip)
from lowbit.numerics.quant import dequantize_weight, quantize_weight
from lowbit.numerics.scaling import awq_scales, scaled_quant_error, search_awq_alpha


def _layer(n=48, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(512, k, generator=g) @ mix * (torch.rand(k, generator=g) * 4 + 0.1)
    return torch.randn(n, k, generator=g) * 0.05, hessian_from_inputs(x), x


def test_hessian_is_twice_the_input_second_moment():
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    flat = x.reshape(-1, 5)
    torch.testing.assert_close(hessian_from_inputs(x), 2 * flat.T @ flat / 21)
    h32 = hessian_from_inputs(x.float())     # float32 activations: float32 product
    assert h32.dtype == torch.float64
    torch.testing.assert_close(h32, 2 * flat.T @ flat / 21, rtol=1e-5, atol=1e-6)


def test_output_error_is_the_summed_squared_output_difference():
    w, _, x = _layer()
    h = hessian_from_inputs(x.double())
    q = w + 0.01 * torch.randn_like(w)
    direct = ((x.double() @ (w - q).double().T) ** 2).sum() * 2 / x.shape[0]
    assert output_error(w, q, h) == pytest.approx(float(direct), rel=1e-9)


@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (None, True),
                                                  (64, False)])
def test_gptq_beats_rtn_on_a_known_hessian(group_size, act_order):
    w, h, _ = _layer()
    rtn = output_error(w, dequantize_weight(quantize_weight(w, 4, group_size, False)), h)
    qw = gptq_quantize(w, h, 4, group_size, False, act_order=act_order)
    err = output_error(w, dequantize_weight(qw), h)
    assert err < 0.8 * rtn    # measured ~0.3-0.5x on this layer


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no column informs another: GPTQ must round exactly like RTN."""
    w = torch.randn(16, 64)
    qw = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, True, damp=1e-6)
    ref = quantize_weight(w, 4, 32, True)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales, ref.scales)


def test_gptq_partial_last_group_pads_with_zero_points():
    w, h, _ = _layer(k=80)
    qw = gptq_quantize(w, h, 4, 32, False)
    assert qw.codes.shape == (48, 3, 32) and qw.in_features == 80
    assert torch.equal(qw.codes[:, -1, 16:], qw.zero_points[:, -1:].expand(48, 16))
    assert dequantize_weight(qw).shape == (48, 80)


def test_gptq_survives_dead_input_channels():
    w, h, _ = _layer()
    h[5, :] = h[:, 5] = 0
    qw = gptq_quantize(w, h, 4, 32, False)
    assert torch.isfinite(dequantize_weight(qw)).all()
    assert (dequantize_weight(qw)[:, 5] == 0).all()   # an input that is always 0 is dropped


@pytest.mark.parametrize("k,group_size", [(96, 32), (80, 32)])   # 80: partial last group
def test_refined_scales_are_the_least_squares_fit_with_codes_fixed(k, group_size):
    w, h, _ = _layer(k=k, seed=3)
    w = w.double()
    qw = gptq_quantize(w, h, bits=3, group_size=group_size, symmetric=False)
    rq = refine_scales(qw, w, h)
    assert torch.equal(rq.codes, qw.codes) and torch.equal(rq.zero_points, qw.zero_points)
    # reference: per row, the dense least squares min_s (w - A s)^T H (w - A s)
    a = (qw.codes.double() - qw.zero_points.double()[..., None]).reshape(w.shape[0], -1)[:, :k]
    for row in (0, 7, 31):
        cols = torch.zeros(k, qw.scales.shape[1], dtype=torch.float64)
        cols[torch.arange(k), torch.arange(k) // group_size] = a[row]
        m, b = cols.T @ h @ cols, cols.T @ h @ w[row]
        torch.testing.assert_close(rq.scales[row].double(), torch.linalg.solve(m, b),
                                   rtol=1e-5, atol=0)
    before = output_error(w, dequantize_weight(qw), h)
    after = output_error(w, dequantize_weight(rq), h)
    assert after < 0.995 * before, (before, after)    # measured: 0.97-0.99


@pytest.mark.parametrize("act_order", [False, True])
def test_more_refine_rounds_never_lose(act_order):
    w, h, _ = _layer(k=96, seed=5)
    errors = [output_error(w, dequantize_weight(gptq_quantize(
        w, h, bits=3, group_size=32, symmetric=False, act_order=act_order, refine_rounds=r)), h)
        for r in range(4)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[3] < 0.98 * errors[0], errors    # measured: 0.838 (natural), 0.872 (act-order)


def test_refine_keeps_the_scale_of_a_group_with_nothing_to_fit():
    w, h, _ = _layer(k=64, seed=4)
    w = w.double()
    w[5, :32] = 0.0      # codes all equal the zero point: the group's scale is free
    qw = quantize_weight(w, 4, 32, symmetric=False)
    rq = refine_scales(qw, w, h)
    assert rq.scales[5, 0] == qw.scales[5, 0]
    assert torch.isfinite(rq.scales).all() and (rq.scales > 0).all()
    assert output_error(w, dequantize_weight(rq), h) <= output_error(w, dequantize_weight(qw), h)


def test_clip_search_never_loses_to_no_clipping():
    w, h, _ = _layer()
    w[:, 0] *= 8   # an outlier column the full range would waste levels on
    ratio = search_clip(w, h, 3, 32, False)
    assert ratio.shape == (48, 3) and (ratio <= 1).all() and (ratio < 1).any()
    clipped = output_error(w, dequantize_weight(quantize_weight(w, 3, 32, False, ratio)), h)
    full = output_error(w, dequantize_weight(quantize_weight(w, 3, 32, False)), h)
    assert clipped <= full


def test_awq_scales_formula_and_exact_fold():
    m = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    s = awq_scales(m, 0.5)
    torch.testing.assert_close(s, m.sqrt() / (m.sqrt().max() * m.sqrt().min()).sqrt())
    w, x = torch.randn(4, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T)


def test_awq_search_never_loses_to_alpha_zero():
    w, h, _ = _layer()
    m = (torch.diag(h) / 2).sqrt()
    alpha, s, err, base = search_awq_alpha([w], h, m, 4, 32, False, grid=10)
    assert err <= base
    assert err == pytest.approx(scaled_quant_error([w], h, s, 4, 32, False))
    assert base == pytest.approx(scaled_quant_error([w], h, torch.ones(96), 4, 32, False))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rows_are_independent_given_the_hessian(act_order):
    """Layers sharing an input are quantized as one stacked matrix: that must equal one by one."""
    w, h, _ = _layer(n=40)
    parts = (w[:16], w[16:])
    whole = gptq_quantize(w, h, 4, 32, False, act_order=act_order, clip_ratios=(1.0, 0.9, 0.8))
    for rows, part in zip((slice(0, 16), slice(16, 40)), parts):
        alone = gptq_quantize(part, h, 4, 32, False, act_order=act_order,
                              clip_ratios=(1.0, 0.9, 0.8))
        torch.testing.assert_close(dequantize_weight(alone), dequantize_weight(whole)[rows],
                                   rtol=1e-5, atol=1e-6)


def test_stage_hessian_accumulates_batches_like_one_product():
    from lowbit.passes._sequential import stage_hessian
    xs = [torch.randn(2, 30, 12), torch.randn(1, 17, 12)]
    flat = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    torch.testing.assert_close(stage_hessian(xs), 2 * flat.T @ flat / flat.shape[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order,k", [
    (4, 32, False, False, 96), (3, 32, False, False, 80),    # 80: partial last group
    (2, 16, True, False, 64), (8, None, False, False, 48), (4, 32, False, True, 80),
    (4, None, True, True, 96)])
def test_compiled_column_loop_is_the_tensor_loop_bit_for_bit(monkeypatch, bits, group_size,
                                                             symmetric, act_order, k):
    """The numba span and the tensor-op span give the same codes, scales and zero points, and
    the numba one does so with any thread count (rows are split across threads)."""
    import numba

    from lowbit.numerics import _gptq_loop as loop
    from lowbit.numerics import gptq as g
    w, h, _ = _layer(n=37, k=k)
    kw = dict(act_order=act_order, clip_ratios=(1.0, 0.9), refine_rounds=2)
    with monkeypatch.context() as m:
        m.setattr(loop, "span_compiled", lambda threads: loop.span_torch)
        ref = gptq_quantize(w, h, bits, group_size, symmetric, **kw)
    before = torch.get_num_threads()
    for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
        torch.set_num_threads(threads)
        try:
            got = gptq_quantize(w, h, bits, group_size, symmetric, **kw)
        finally:
            torch.set_num_threads(before)
        for f in ("codes", "scales", "zero_points"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), (f, threads)
    # the loop's own state too: the weights it compensated (every block but the last)
    group = group_size or k
    n_groups = -(-k // group)
    states = []
    for span in (loop.span_torch, None):
        wp, hp = g._prepare(w, h, 0.01)
        perm = torch.argsort(torch.diag(hp), descending=True) if act_order else torch.arange(k)
        wp, hp = wp[:, perm].clone(), hp[perm][:, perm]
        args = (wp, g._inverse_cholesky(hp), perm, torch.zeros(37, n_groups),
                torch.zeros(37, n_groups), torch.zeros(n_groups, dtype=torch.bool),
                torch.ones(37, n_groups), bits, group, group, symmetric)
        states.append((loop.columns(*args, span=span), wp))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
