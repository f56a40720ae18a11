"""The ONNX graph adapter: linear forms, constants, evaluation, quantized linears (structure
and numerics), on graphs built in code with onnx.helper."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lowbit.compiler.capture import capture  # noqa: E402
from lowbit.compiler.graph import Graph  # noqa: E402
from lowbit.numerics.quant import dequantize_weight, quantize_weight  # noqa: E402
from lowbit.passes.pack import pack_weight  # noqa: E402

K, N = 32, 24
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, N)).astype(np.float32)      # stored [in, out] (MatMul form)
B = RNG.standard_normal(N).astype(np.float32)
X = RNG.standard_normal((2, 5, K)).astype(np.float32)


def _save(tmp_path, nodes, inits, out_dim=N, opset=18, name="m.onnx", inputs=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs or [x], [y],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _linear_model(tmp_path, form: str):
    """``y = relu(x @ W + B)`` with the linear written as ``form``."""
    if form == "matmul_add":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc"),
                 helper.make_node("Add", ["mm", "B"], ["lin"], name="fc_bias")]
        inits = {"W": W, "B": B}
    elif form == "gemm_transB":
        nodes = [helper.make_node("Reshape", ["x", "shape2d"], ["x2"], name="flat"),
                 helper.make_node("Gemm", ["x2", "Wt", "B"], ["lin2"], name="fc", transB=1),
                 helper.make_node("Reshape", ["lin2", "shape3d"], ["lin"], name="unflat")]
        inits = {"Wt": W.T.copy(), "B": B, "shape2d": np.array([-1, K]),
                 "shape3d": np.array([-1, 5, N])}
    elif form == "gemm":
        nodes = [helper.make_node("Reshape", ["x", "shape2d"], ["x2"], name="flat"),
                 helper.make_node("Gemm", ["x2", "W", "B"], ["lin2"], name="fc"),
                 helper.make_node("Reshape", ["lin2", "shape3d"], ["lin"], name="unflat")]
        inits = {"W": W, "B": B, "shape2d": np.array([-1, K]), "shape3d": np.array([-1, 5, N])}
    elif form == "transposed":
        nodes = [helper.make_node("Transpose", ["Wt"], ["wT"], name="wt", perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "wT"], ["mm"], name="fc"),
                 helper.make_node("Add", ["B", "mm"], ["lin"], name="fc_bias")]
        inits = {"Wt": W.T.copy(), "B": B}
    nodes.append(helper.make_node("Relu", ["lin"], ["y"], name="act"))
    return _save(tmp_path, nodes, inits)


def _reference(w=W, b=B):
    return np.maximum(X @ w + b, 0)


FORMS = ["matmul_add", "gemm_transB", "gemm", "transposed"]


@pytest.mark.parametrize("form", FORMS)
def test_linear_forms_are_one_linear_node(tmp_path, form):
    g = capture(_linear_model(tmp_path, form)).graph
    assert isinstance(g, Graph) and g.form == "onnx"
    (site,) = g.linears()
    assert (site.in_features, site.out_features) == (K, N)
    assert site.bias is not None and g.op(site.node) == "linear"
    torch.testing.assert_close(g.linear_weight(site), torch.from_numpy(W.T))
    torch.testing.assert_close(g.attr(site.bias), torch.from_numpy(B))
    act = g.consumers(site.node)
    assert [g.op(c) for c in act] == ["reshape" if form.startswith("gemm") else "relu"]
    assert g.op(g.inputs(site.node)[0]) in ("input", "reshape")
    # the bias Add / weight Transpose are inside the linear, not nodes of their own
    assert "fc_bias" not in g.nodes() and "wt" not in g.nodes()
    out = g.run({"x": torch.from_numpy(X)})[0]
    np.testing.assert_allclose(out.numpy(), _reference(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_set_linear_weight_in_every_form(tmp_path, form):
    g = capture(_linear_model(tmp_path, form)).graph
    (site,) = g.linears()
    w2 = torch.from_numpy(2 * W.T)                      # [out, in]
    g.set_linear_weight(site, w2)
    torch.testing.assert_close(g.linear_weight(site), w2)
    out = g.run({"x": torch.from_numpy(X)})[0]
    np.testing.assert_allclose(out.numpy(), _reference(2 * W), rtol=1e-5, atol=1e-4)


def test_non_constant_weight_is_not_a_linear(tmp_path):
    nodes = [helper.make_node("Relu", ["W"], ["w"], name="wr"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    g = capture(_save(tmp_path, nodes, {"W": W})).graph
    assert g.linears() == [] and g.op("mm") == "matmul"


def test_shared_weight_is_untied_when_one_reader_changes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="fc1"),
             helper.make_node("MatMul", ["x", "W"], ["b"], name="fc2"),
             helper.make_node("Sub", ["a", "b"], ["y"], name="diff")]
    g = capture(_save(tmp_path, nodes, {"W": W})).graph
    s1, s2 = g.linears()
    g.set_linear_weight(s1, torch.from_numpy(3 * W.T))
    torch.testing.assert_close(g.linear_weight(g.linears()[1]), torch.from_numpy(W.T))
    out = g.run({"x": torch.from_numpy(X)})[0]
    np.testing.assert_allclose(out.numpy(), X @ (2 * W), rtol=1e-5, atol=1e-4)


def test_shared_small_constants_are_untied_at_capture(tmp_path):
    """Exporters deduplicate equal norm weights / zero biases: each reader gets its own."""
    nodes = [helper.make_node("Mul", ["x", "g"], ["a"], name="n1"),
             helper.make_node("Mul", ["a", "g"], ["y"], name="n2")]
    g = capture(_save(tmp_path, nodes, {"g": np.ones(K, np.float32)})).graph
    consts = [i for n in ("n1", "n2") for i in g.inputs(n) if g.op(i) == "constant"]
    assert len(set(consts)) == 2


def test_inputs_consumers_and_output(tmp_path):
    g = capture(_linear_model(tmp_path, "matmul_add")).graph
    (site,) = g.linears()
    assert g.consumers("x") == [site.node] and site.input == "x"
    assert g.inputs(site.node) == ["x", "W", "B"]
    assert g.op(g.nodes()[-1]) == "output" and g.inputs(g.nodes()[-1]) == ["act"]
    assert g.consumers("act") == [g.nodes()[-1]]
    assert "fc = linear(x, W, B)" in g.dump()


def test_observe_and_staged_values(tmp_path):
    g = capture(_linear_model(tmp_path, "transposed")).graph
    (site,) = g.linears()
    seen = {}
    g.run({"x": torch.from_numpy(X)}, observe={site.node: lambda v: seen.setdefault("y", v),
                                               "x": lambda v: seen.setdefault("x", v)})
    np.testing.assert_allclose(seen["y"].numpy(), X @ W + B, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["x"], torch.from_numpy(X))
    run = g.staged([{"x": torch.from_numpy(X)}, {"x": torch.from_numpy(X[:1])}])
    lin = run.advance(site.node)
    assert [tuple(v.shape) for v in lin] == [(2, 5, N), (1, 5, N)]
    g.set_linear_weight(site, torch.zeros(N, K))      # later stages see new weights
    out = run.advance("act")
    np.testing.assert_allclose(out[0].numpy(), np.maximum(X @ W + B, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already passed"):
        run.advance(site.node)


@pytest.mark.parametrize("bits,group,act_bits", [(4, 16, 0), (8, None, 8), (4, 16, 8),
                                                 (2, 16, 0)])
def test_quant_linear_matches_dequantized_reference(tmp_path, bits, group, act_bits):
    g = capture(_linear_model(tmp_path, "matmul_add")).graph
    (site,) = g.linears()
    qw = quantize_weight(g.linear_weight(site), bits, group, symmetric=act_bits == 8)
    name = g.replace_with_quant_linear(site, pack_weight(qw, act_bits), created_by="pack")
    assert g.op(name) == "lowbit.quant_linear" and g.linears() == []
    assert g.inputs(name)[0] == "x" and g.consumers(name) == ["act"]
    info = g.quant_linears()[name]
    assert (info["bits"], info["act_bits"], info["in_features"], info["out_features"]) == \
        (bits, act_bits, K, N)
    assert "W" not in g.nodes()                           # the float weight is gone
    w = dequantize_weight(qw).numpy().T
    x = X
    if act_bits:
        s = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127
        x = np.clip(np.round(x / s), -127, 127) * s
    out = g.run({"x": torch.from_numpy(X)})[0].numpy()
    ref = np.maximum(x @ w + B, 0)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_quantizing_an_output_layer_keeps_the_output_name(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="head")]
    path = _save(tmp_path, nodes, {"W": W})
    cap = capture(path)
    g = cap.graph
    (site,) = g.linears()
    g.replace_with_quant_linear(site, pack_weight(quantize_weight(g.linear_weight(site), 4, 16,
                                                                  False)), "pack")
    assert [v.name for v in g.graph.outputs] == ["y"]
    assert g.run({"x": torch.from_numpy(X)})[0].shape == (2, 5, N)
