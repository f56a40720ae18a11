"""act_quant: marks quantized linears for int8 per-token activations (per-channel weights)."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.testing import assert_numerically_equal

W8_PER_CHANNEL = {"rtn": {"bits": 8, "group_size": None, "symmetric": True}}


def _int8_linear(x, weight, bias):
    """Reference: per-token int8 x, per-channel int8 W, integer accumulation in int64."""
    sw = weight.abs().amax(-1) / 127
    wq = torch.round(weight / sw[:, None]).to(torch.int64)
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).to(torch.int64)
    y = (xq @ wq.T).to(torch.float32) * sx * sw
    return y if bias is None else y + bias


def test_marks_every_quantized_linear(mlp_captured, run_passes):
    graph = mlp_captured.graph
    ctx = run_passes(graph, [W8_PER_CHANNEL, "act_quant"])
    record = ctx.records[-1]
    assert record.transformed == ("fc1", "fc2") and record.changed is False
    nodes = {s.name: s.node for s in graph.linears()}
    assert ctx.analysis["activation_quant"] == {nodes["fc1"]: 8, nodes["fc2"]: 8}
    assert graph.quant_linears() == {}  # it only decides; pack applies
    run_passes(graph, ["pack"], ctx=ctx)
    assert sorted((q["name"], q["act_bits"]) for q in graph.quant_linears().values()) == [
        ("fc1", 8), ("fc2", 8)]


def test_packed_graph_computes_integer_activations(mlp, mlp_input, mlp_captured, run_passes):
    graph = mlp_captured.graph
    run_passes(graph, [W8_PER_CHANNEL, "act_quant", "pack"])
    h = torch.relu(_int8_linear(mlp_input, mlp.fc1.weight.detach(), None))
    h = torch.relu(_int8_linear(h, mlp.fc2.weight.detach(), mlp.fc2.bias.detach()))
    expected = mlp.out(h).detach()  # the head stays float
    assert_numerically_equal(graph.run({"x": mlp_input})[0], expected, rtol=1e-5)


def test_grouped_weights_are_refused_naming_the_layer(mlp_captured, run_passes):
    with pytest.raises(lowbit.PassError) as info:
        run_passes(mlp_captured.graph, [{"rtn": {"bits": 8, "group_size": 32}}, "act_quant"])
    err = info.value
    fc1 = mlp_captured.graph.linears()[0]
    assert err.pass_name == "act_quant" and err.node == fc1.node and err.history == ("rtn",)
    assert "'fc1' has group_size=32" in str(err) and "group_size: null" in str(err)


def test_grouped_weights_fake_quantize_their_input_when_allowed(mlp, mlp_input, mlp_captured,
                                                               run_passes):
    from lowbit.numerics.quant import (dequantize_weight, quantize_activation_per_token,
                                       quantize_weight)
    graph = mlp_captured.graph
    run_passes(graph, [{"rtn": {"bits": 4, "group_size": 32}},
                       {"act_quant": {"bits": 4, "integer_only": False}}, "pack"])
    assert {q["act_bits"] for q in graph.quant_linears().values()} == {4}

    def layer(x, lin):
        xq, s = quantize_activation_per_token(x, 4)
        w = dequantize_weight(quantize_weight(lin.weight.detach(), 4, 32, False))
        return torch.nn.functional.linear(xq * s, w, lin.bias)
    h = torch.relu(layer(torch.relu(layer(mlp_input, mlp.fc1)), mlp.fc2))
    assert_numerically_equal(graph.run({"x": mlp_input})[0], mlp.out(h).detach(), rtol=1e-5)


def test_clip_ratio_saturates_the_largest_values():
    from lowbit.numerics.quant import quantize_activation_per_token
    x = torch.tensor([[0.1, -0.6, 2.0, 0.3]])
    xq, s = quantize_activation_per_token(x, 4, clip=0.5)
    assert float(s) == pytest.approx(1.0 / 7)
    assert xq.tolist() == [[1.0, -4.0, 7.0, 2.0]]          # 2.0 saturates at 7 * s = 1.0
    full, s1 = quantize_activation_per_token(x, 4)
    assert float(s1) == pytest.approx(2.0 / 7)


def test_asymmetric_grid_uses_every_level_and_a_finer_step():
    from lowbit.numerics.quant import quantize_activation_per_token
    x = torch.tensor([[0.0, 0.2, 0.9, 3.0], [-1.0, -0.5, 0.25, 0.5]])
    xq, s = quantize_activation_per_token(x, 4, symmetric=False)
    assert s[:, 0].tolist() == pytest.approx([3.0 / 15, 1.5 / 15])      # (max - min) / 15
    z = torch.round(x.amin(-1, keepdim=True).clamp(max=0).neg() / s)
    codes = xq + z
    assert float(codes.min()) >= 0 and float(codes.max()) <= 15 and torch.equal(codes,
                                                                             codes.round())
    assert float((xq * s - x).abs().max()) <= float(s.max()) / 2 + 1e-6   # within half a step
    _, s_sym = quantize_activation_per_token(x, 4)
    assert bool((s < s_sym).all())      # one sign (row 0) or lopsided (row 1): a finer step
    xc, sc = quantize_activation_per_token(x, 4, clip=0.5, symmetric=False)
    assert float((xc * sc).max()) == pytest.approx(1.5, abs=1e-6)       # hi clipped to 1.5


def test_asymmetric_activations_fake_quantize_and_are_recorded(mlp, mlp_input, mlp_captured,
                                                               run_passes):
    from lowbit.numerics.quant import (dequantize_weight, quantize_activation_per_token,
                                       quantize_weight)
    graph = mlp_captured.graph
    run_passes(graph, [{"rtn": {"bits": 4, "group_size": 32}},
                       {"act_quant": {"bits": 4, "integer_only": False, "symmetric": False}},
                       "pack"])
    assert {q["act_symmetric"] for q in graph.quant_linears().values()} == {False}

    def layer(x, lin):
        xq, s = quantize_activation_per_token(x, 4, symmetric=False)
        w = dequantize_weight(quantize_weight(lin.weight.detach(), 4, 32, False))
        return torch.nn.functional.linear(xq * s, w, lin.bias)
    h = torch.relu(layer(torch.relu(layer(mlp_input, mlp.fc1)), mlp.fc2))
    assert_numerically_equal(graph.run({"x": mlp_input})[0], mlp.out(h).detach(), rtol=1e-5)


def test_asymmetric_activations_refuse_the_integer_path(mlp_captured, run_passes):
    with pytest.raises(lowbit.PassError, match=r"'fc1' has per-channel weights.*Fix"):
        run_passes(mlp_captured.graph, [W8_PER_CHANNEL, {"act_quant": {"symmetric": False}}])
