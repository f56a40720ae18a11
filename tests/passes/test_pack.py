"""pack: each quantized linear becomes one quant_linear node computing the same function."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.compiler.capture import capture
from lowbit.compiler.context import PassContext
from lowbit.compiler.fx_graph import _LINEAR_TARGETS
from lowbit.compiler.manager import PassManager
from lowbit.compiler.recipe import Recipe, schedule
from lowbit.numerics.quant import dequantize_weight, sqnr_db
from lowbit.plugins.manager import get_registry
from lowbit.testing import assert_numerically_equal, random_ids, tiny_llama

RTN = {"bits": 4, "group_size": 32, "symmetric": False}


def _fake_quantize(graph, ctx):
    """Put each quantized weight back in dequantized (float) form: the fake-quant model."""
    quantized = ctx.analysis["quantized_weights"]
    for site in graph.linears():
        if site.node in quantized:
            graph.set_linear_weight(site, dequantize_weight(quantized[site.node]))


@pytest.fixture(scope="module")
def packed_llama():
    """Tiny Llama: rtn -> (fake-quant reference outputs) -> pack -> outputs."""
    reg = get_registry()

    def run(graph, steps, ctx):
        PassManager(schedule(Recipe.from_dict({"passes": steps}), reg)).run(graph, ctx)

    cap = capture(tiny_llama())
    graph, ctx = cap.graph, PassContext(progress=False)
    inputs = {"input_ids": random_ids(2, 23, seed=4)}
    float_out = graph.run(inputs)[0]
    run(graph, [{"rtn": RTN}], ctx)
    quantized = ctx.analysis["quantized_weights"]
    expected_layers = {s.name: quantized[s.node] for s in graph.linears() if s.node in quantized}
    _fake_quantize(graph, ctx)
    fake_quant_out = graph.run(inputs)[0]
    run(graph, ["pack"], ctx)
    return dict(graph=graph, ctx=ctx, inputs=inputs, float_out=float_out,
                fake_quant_out=fake_quant_out, packed_out=graph.run(inputs)[0],
                expected_layers=expected_layers)


# -- structure ----------------------------------------------------------------------------

def test_every_quantized_linear_is_one_quant_linear_node(packed_llama):
    graph, expected = packed_llama["graph"], packed_llama["expected_layers"]
    quant = graph.quant_linears()
    assert len(quant) == 14
    assert sorted(q["name"] for q in quant.values()) == sorted(expected)
    for node, q in quant.items():
        assert graph.op(node) == "lowbit.quant_linear"
        assert q["created_by"] == "pack"
        assert (q["bits"], q["group_size"], q["act_bits"], q["symmetric"]) == (4, 32, 0, False)
        assert q["in_features"] == expected[q["name"]].in_features
    assert [s.name for s in graph.linears()] == ["lm_head"]


def test_no_float_linear_or_float_weight_is_left_for_quantized_layers(packed_llama):
    graph, expected = packed_llama["graph"], packed_llama["expected_layers"]
    for n in graph.gm.graph.nodes:
        if n.op == "call_function" and n.target in _LINEAR_TARGETS:
            weights = [a.target for a in n.all_input_nodes if a.op == "get_attr"]
            assert not {graph.layer_name(w) for w in weights} & set(expected), n.name
    # the float weights are dropped from the module, not just unused
    kept = {graph.layer_name(k) for k in graph.gm.state_dict()}
    assert not kept & set(expected)


def test_packed_bytes_metric_counts_codes_scales_and_zero_points(packed_llama):
    expected = 0
    for qw in packed_llama["expected_layers"].values():
        n, k = qw.out_features, qw.in_features
        groups = math.ceil(k / 32)
        expected += n * groups * 32 * 4 // 8          # 4-bit codes
        expected += n * groups * 4                    # float32 scales
        expected += n * math.ceil(groups * 4 / 8)     # 4-bit zero points
    record = packed_llama["ctx"].records[-1]
    assert record.name == "pack" and record.metrics["packed_bytes"] == expected
    assert len(record.transformed) == 14


# -- numerics -----------------------------------------------------------------------------

def test_packed_graph_equals_fake_quantized_graph(packed_llama):
    assert_numerically_equal(packed_llama["packed_out"], packed_llama["fake_quant_out"],
                             rtol=1e-5, what="packed vs fake-quant logits")


def test_packed_graph_is_close_to_float_but_not_equal(packed_llama):
    sqnr = sqnr_db(packed_llama["float_out"], packed_llama["packed_out"])
    # 4-bit g32 weights have ~22 dB weight SQNR; the logits' error tracks it (measured 23 dB)
    assert 18 < sqnr < 28


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_pack_numerics_on_transposed_and_biased_linears(name, capture_tiny, run_passes):
    # gpt2: Conv1D lowered to addmm with [in, out] weights; bert: biases and an attention mask
    cap = capture_tiny(name)
    ids = random_ids(2, 19, seed=6)
    inputs = {k: (ids if k == "input_ids" else torch.ones_like(ids)) for k in cap.input_names}
    ctx = run_passes(cap.graph, [{"rtn": {"bits": 8, "group_size": None, "symmetric": True}}])
    _fake_quantize(cap.graph, ctx)
    expected = cap.graph.run(inputs)[0]
    n_quantized = len(ctx.analysis["quantized_weights"])
    run_passes(cap.graph, ["pack"], ctx=ctx)
    assert len(cap.graph.quant_linears()) == n_quantized == (8 if name == "gpt2" else 12)
    assert all(q["symmetric"] for q in cap.graph.quant_linears().values())
    assert_numerically_equal(cap.graph.run(inputs)[0], expected, rtol=1e-5)
