"""calibrate: per-channel statistics of every linear's input."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.compiler.capture import capture


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [{"x": torch.randn(2, 5, 64, generator=g) * (i + 1)} for i in range(n)]


def _linear_inputs(mlp, x):
    """What fc1, fc2 and out read, computed eagerly."""
    with torch.no_grad():
        h1 = torch.relu(mlp.fc1(x))
        return {"fc1": x, "fc2": h1, "out": torch.relu(mlp.fc2(h1))}


def test_stats_match_a_hand_computation_on_one_batch(mlp, mlp_captured, run_passes):
    batch = _batches(1)
    ctx = run_passes(mlp_captured.graph, ["calibrate"], calibration=batch)
    stats = ctx.analysis["activation_stats"]
    sites = {s.name: s for s in mlp_captured.graph.linears()}
    assert set(stats) == {s.node for s in sites.values()}
    for name, x in _linear_inputs(mlp, batch[0]["x"]).items():
        st = stats[sites[name].node]
        flat = x.reshape(-1, x.shape[-1])
        assert st.absmax.shape == (sites[name].in_features,) and st.tokens == 10
        torch.testing.assert_close(st.absmax, flat.abs().amax(0), rtol=1e-5, atol=1e-6)
        assert st.sq_sum.dtype == torch.float64
        torch.testing.assert_close(st.sq_sum, flat.double().pow(2).sum(0), rtol=1e-5, atol=1e-6)
    ratios = ctx.records[0].metrics["outlier_ratio"]
    absmax = stats[sites["fc1"].node].absmax
    assert ratios["fc1"] == float(absmax.max() / absmax.median())


def test_stats_accumulate_over_batches_up_to_max_batches(mlp, mlp_captured, run_passes):
    batches = _batches(3)
    ctx = run_passes(mlp_captured.graph, ["calibrate"], calibration=batches)
    fc1 = mlp_captured.graph.linears()[0]
    st = ctx.analysis["activation_stats"][fc1.node]
    every = torch.cat([b["x"].reshape(-1, 64) for b in batches])
    assert st.tokens == 30 and ctx.records[0].metrics["batches"] == 3
    torch.testing.assert_close(st.absmax, every.abs().amax(0), rtol=0, atol=0)

    ctx = run_passes(mlp_captured.graph, [{"calibrate": {"max_batches": 2}}],
                     calibration=batches)
    st = ctx.analysis["activation_stats"][fc1.node]
    assert st.tokens == 20 and ctx.records[0].metrics["batches"] == 2
    torch.testing.assert_close(st.absmax, every[:20].abs().amax(0), rtol=0, atol=0)


class _FanOut(nn.Module):
    """Two linears read one input (like q/k/v projections)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x):
        return self.a(x) * self.b(x)


def test_linears_sharing_an_input_share_one_observation():
    from lowbit.compiler.context import PassContext
    from lowbit.passes.calibrate import CalibrateOptions, calibrate
    x = torch.randn(2, 5, 64)
    cap = capture(_FanOut().eval(), example_inputs=(x,))
    before = cap.graph.run({"x": x})[0]
    ctx = PassContext(calibration=[{"x": x}], progress=False)
    ctx.options = CalibrateOptions()
    calibrate(cap.graph, ctx)
    a, b = cap.graph.linears()
    stats = ctx.analysis["activation_stats"]
    assert stats[a.node] is stats[b.node] and stats[a.node].tokens == 10  # counted once
    assert torch.equal(cap.graph.run({"x": x})[0], before)  # an analysis: graph unchanged
