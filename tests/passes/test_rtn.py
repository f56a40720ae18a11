"""rtn: which linears it quantizes (structure), how well (numerics), what it leaves alone."""
from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from lowbit.compiler.capture import capture
from lowbit.numerics.quant import dequantize_weight
from lowbit.testing import random_ids

HEAD_REASON = "output head kept in float (set include_head=True to quantize it)"
EXCLUDE_REASON = "excluded by the recipe's 'exclude' option"


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama captured once: rtn only analyses, so tests may share the graph."""
    from lowbit.testing import tiny_llama
    return capture(tiny_llama())


def _rtn(run_passes, graph, **options):
    ctx = run_passes(graph, [{"rtn": options}])
    return ctx, ctx.records[0]


# -- structure ----------------------------------------------------------------------------

def test_output_head_is_skipped_with_a_reason(llama, run_passes):
    sites = llama.graph.linears()
    ctx, record = _rtn(run_passes, llama.graph, bits=4, group_size=32)
    assert record.skipped == (("lm_head", HEAD_REASON),)
    assert record.transformed == tuple(s.name for s in sites if s.name != "lm_head")
    assert len(record.transformed) == 14 and record.changed is False
    quantized = ctx.analysis["quantized_weights"]
    assert set(quantized) == {s.node for s in sites if s.name != "lm_head"}
    for s in sites[:-1]:
        qw = quantized[s.node]
        assert qw.codes.shape == (s.out_features, s.in_features // 32, 32)
        assert (qw.bits, qw.group_size, qw.symmetric) == (4, 32, False)


def test_include_head_quantizes_it(llama, run_passes):
    ctx, record = _rtn(run_passes, llama.graph, bits=8, group_size=None, include_head=True)
    assert record.skipped == () and len(record.transformed) == 15
    assert record.transformed[-1] == "lm_head"
    head = next(s for s in llama.graph.linears() if s.name == "lm_head")
    assert ctx.analysis["quantized_weights"][head.node].codes.shape == (128, 1, 64)


def test_exclude_regexes_skip_matching_layers(llama, run_passes):
    _, record = _rtn(run_passes, llama.graph, exclude=[r"mlp\.down_proj$",
                                                       r"layers\.1\.self_attn\.[qk]_proj"])
    excluded = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    assert dict(record.skipped) == {"lm_head": HEAD_REASON,
                                    **{name: EXCLUDE_REASON for name in excluded}}
    assert len(record.transformed) == 10 and not excluded & set(record.transformed)


def test_rtn_leaves_the_graph_unchanged(llama, run_passes):
    ids = random_ids(1, 9, seed=3)
    before = llama.graph.run({"input_ids": ids})[0]
    nodes = llama.graph.nodes()
    _rtn(run_passes, llama.graph, bits=2, group_size=16)
    assert llama.graph.nodes() == nodes and llama.graph.quant_linears() == {}
    assert torch.equal(llama.graph.run({"input_ids": ids})[0], before)


class _ProbabilityHead(nn.Module):
    """The last linear feeds a softmax, so it is not an output head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x):
        return torch.softmax(self.fc2(torch.relu(self.fc1(x))), dim=-1)


class _ReshapedHead(nn.Module):
    """The last linear reaches the output through view-like ops only: still the head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.proj = nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.proj(torch.relu(self.fc1(x))).reshape(-1, 4, 4).contiguous()


@pytest.mark.parametrize("module,skipped", [(_ProbabilityHead, []), (_ReshapedHead, ["proj"])])
def test_head_is_found_from_dataflow_not_names(run_passes, module, skipped):
    cap = capture(module().eval(), example_inputs=(torch.randn(3, 64),))
    _, record = _rtn(run_passes, cap.graph)
    assert [name for name, _ in record.skipped] == skipped


def test_mlp_head_named_out_is_skipped(mlp_captured, run_passes):
    _, record = _rtn(run_passes, mlp_captured.graph, bits=8, group_size=32)
    assert record.transformed == ("fc1", "fc2") and record.skipped == (("out", HEAD_REASON),)


# -- numerics -----------------------------------------------------------------------------

def _mean_sqnr(run_passes, graph, **options):
    return statistics.mean(_rtn(run_passes, graph, **options)[1].metrics["weight_sqnr_db"]
                           .values())


def test_weight_sqnr_grows_about_six_db_per_bit(llama, run_passes):
    # uniform quantizer: error power ~ step^2 / 12 and the step halves per bit (+6.02 dB);
    # the 2**bits - 1 levels make it ~6.2 dB/bit from 4 to 8 bits
    sqnr = {b: _mean_sqnr(run_passes, llama.graph, bits=b, group_size=32) for b in (3, 4, 8)}
    assert 5.6 <= (sqnr[8] - sqnr[4]) / 4 <= 6.8
    assert 5.6 <= sqnr[4] - sqnr[3] <= 7.5
    # Gaussian init weights, 32-wide asymmetric groups: range ~ 4.5 sigma -> ~21 dB at 4 bits
    assert 18 <= sqnr[4] <= 25


def test_finer_grids_quantize_better(llama, run_passes):
    grouped = _mean_sqnr(run_passes, llama.graph, bits=4, group_size=32)
    per_channel = _mean_sqnr(run_passes, llama.graph, bits=4, group_size=None)
    symmetric = _mean_sqnr(run_passes, llama.graph, bits=4, group_size=32, symmetric=True)
    assert grouped > per_channel + 0.5
    assert grouped > symmetric + 0.5  # symmetric grids leave a code unused and centre on 0


def test_quantized_weights_dequantize_within_half_a_step(llama, run_passes):
    ctx, _ = _rtn(run_passes, llama.graph, bits=4, group_size=32)
    for site in llama.graph.linears()[:-1]:
        qw = ctx.analysis["quantized_weights"][site.node]
        err = (dequantize_weight(qw) - llama.graph.linear_weight(site)).abs()
        bound = qw.scales.repeat_interleave(32, dim=1) / 2 * (1 + 1e-4)
        assert (err <= bound).all(), site.name
