"""act_clip: per-layer activation clip ratios chosen by measured output error."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.numerics.quant import dequantize_weight, quantize_activation_per_token
from lowbit.passes.act_clip import activation_clip_errors

W4 = {"rtn": {"bits": 4, "group_size": 32}}
A4 = {"act_quant": {"bits": 4, "integer_only": False}}
GRID = (1.0, 0.9, 0.8, 0.7, 0.6)


def _heavy_tailed(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 0] *= 4.0   # one outlier channel: worth clipping at 4 bits
    return x


def test_errors_match_their_definition():
    x, w = _heavy_tailed(32, 16, 0), torch.randn(8, 16)
    w_q = w + 0.01 * torch.randn(8, 16)
    errs = activation_clip_errors(x, w_q, w, 4, GRID)
    for r, e in zip(GRID, errs):
        xq, s = quantize_activation_per_token(x, 4, r)
        expected = ((xq * s) @ w_q.T - x @ w.T).pow(2).sum()
        assert float(e) == pytest.approx(float(expected), rel=1e-5)


def test_picks_the_ratio_of_least_error_per_layer(mlp_captured, run_passes):
    graph = mlp_captured.graph
    batches = [{"x": _heavy_tailed(10, 64, i).reshape(2, 5, 64)} for i in range(3)]
    ctx = run_passes(graph, [W4, A4, {"act_clip": {"grid": GRID}}], calibration=batches)
    chosen = ctx.analysis["activation_clip"]
    sites = {s.node: s for s in graph.linears()}
    assert set(chosen) == set(ctx.analysis["activation_quant"])
    # recompute fc1's choice by brute force over every calibration token (3 batches x 10 tokens
    # <= tokens_per_batch: no sampling)
    fc1 = next(n for n, s in sites.items() if s.name == "fc1")
    w_q = dequantize_weight(ctx.analysis["quantized_weights"][fc1])
    x = torch.cat([b["x"].reshape(-1, 64) for b in batches])
    errs = activation_clip_errors(x, w_q, graph.linear_weight(sites[fc1]), 4, GRID)
    assert chosen[fc1] == GRID[int(errs.argmin())] and chosen[fc1] < 1.0
    record = ctx.records[-1]
    assert record.changed is False and record.metrics["clip_ratio"]["fc1"] == chosen[fc1]


def test_chosen_ratios_reach_the_packed_nodes_and_lower_the_error(mlp, run_passes):
    from lowbit.compiler.capture import capture
    batches = [{"x": _heavy_tailed(10, 64, i).reshape(2, 5, 64)} for i in range(8)]
    held_out = [_heavy_tailed(10, 64, 100 + i).reshape(2, 5, 64) for i in range(20)]
    errors = {}
    for steps in ([W4, A4, "pack"], [W4, A4, {"act_clip": {"grid": GRID}}, "pack"]):
        graph = capture(mlp, example_inputs=(held_out[0],)).graph
        run_passes(graph, steps, calibration=batches)
        clips = {q["name"]: q["act_clip"] for q in graph.quant_linears().values()}
        errors[len(steps)] = sum(float((graph.run({"x": x})[0] - mlp(x).detach()).pow(2).mean())
                                 for x in held_out)
    assert set(clips) == {"fc1", "fc2"} and min(clips.values()) < 1.0
    assert errors[4] < 0.95 * errors[3]


def test_needs_activation_quant_first(mlp_captured, run_passes):
    with pytest.raises(lowbit.ContractError, match="'act_clip'.*requires 'activation_quant'"):
        run_passes(mlp_captured.graph, [W4, "act_clip"], calibration=[{"x": torch.randn(2, 5, 64)}])


def test_rejects_ratios_outside_the_unit_interval():
    from lowbit.passes.act_clip import ActClipOptions
    with pytest.raises(ValueError, match="clip ratios in"):
        ActClipOptions(grid=(1.0, 1.2))
