"""Compiling from a ``.onnx`` file: tiny transformers exported with torch.onnx.export give the
same results through the ONNX path as through the FX path; bad files fail clearly and
nothing is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lowbit  # noqa: E402
from lowbit.compiler.capture import capture  # noqa: E402
from lowbit.errors import CaptureError, LoweringError, PassError  # noqa: E402
from lowbit.testing import export_onnx, random_ids, tiny_bert, tiny_llama  # noqa: E402

CAL = random_ids(4, 32, seed=3)
IDS = random_ids(1, 16, seed=4)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    return export_onnx(tiny_llama(), tmp_path_factory.mktemp("llama") / "model.onnx")


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    return export_onnx(tiny_bert(), tmp_path_factory.mktemp("bert") / "model.onnx")


def test_exported_llama_structure(llama_onnx):
    cap = capture(llama_onnx)
    g = cap.graph
    assert (cap.kind, cap.input_names) == ("causal_lm", ["input_ids"])
    sites = g.linears()
    assert len(sites) == 2 * 7 + 1
    assert sites[0].name == "model.layers.0.self_attn.q_proj"   # names from the export
    assert sites[-1].name == "lm_head" and (sites[-1].in_features,
                                            sites[-1].out_features) == (64, 128)
    q, k, v = sites[:3]
    assert q.input == k.input == v.input and g.op(q.input) == "mul"   # the RMS norm's output
    ref = tiny_llama()(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(g.run({"input_ids": IDS})[0], ref, rtol=1e-4, atol=1e-5)


def test_exported_bert_is_an_encoder(bert_onnx):
    cap = capture(bert_onnx)
    assert (cap.kind, cap.input_names) == ("encoder", ["input_ids", "attention_mask"])
    assert len(cap.graph.linears()) == 2 * 6
    assert all(s.bias is not None for s in cap.graph.linears())


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_onnx_path_matches_fx_path(llama_onnx, recipe):
    """Same passes, same numbers: the ONNX path's model agrees with the FX path's (whose
    torch reference kernels are what its onnxruntime lowering is checked against)."""
    cm = lowbit.compile(str(llama_onnx), recipe=recipe, calibration=CAL, progress=False)
    fx = lowbit.compile(tiny_llama(), recipe=recipe, target="torch", calibration=CAL,
                        progress=False)
    assert cm.manifest["layers"].keys() == fx.manifest["layers"].keys()
    got, ref = cm(IDS), fx(IDS)
    assert float((got - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    ops = {n.op_type for n in onnx.load(str(cm.executable.path)).graph.node}
    assert ("MatMulInteger" if recipe == "w8a8" else "MatMulNBits") in ops
    rot = cm.manifest["passes"][0]
    assert rot["name"] == "rotate" and rot["verification"]["max_rel_error"] < 1e-4
    assert len(rot["metrics"]["online_hadamard"]) == 4


def test_encoder_rotation_is_skipped_with_the_reason(bert_onnx):
    cm = lowbit.compile(str(bert_onnx), recipe="w8a8", calibration=CAL, progress=False)
    (rot,) = [p for p in cm.manifest["passes"] if p["name"] == "rotate"]
    assert "post-norm" in rot["skipped"][0]["reason"]
    with torch.no_grad():
        hidden = tiny_bert()(input_ids=IDS,
                             attention_mask=torch.ones_like(IDS)).last_hidden_state
    got = cm(IDS)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), hidden.flatten(), dim=0)
    assert float(cos) > 0.99


def test_smooth_and_ocs_run_on_onnx(llama_onnx):
    recipe = {"passes": ["smooth", "ocs", {"rtn": {"bits": 8, "group_size": None,
                                                    "symmetric": True}},
                         {"act_quant": {"bits": 8}}, "pack"]}
    cm = lowbit.compile(str(llama_onnx), recipe=recipe, calibration=CAL, progress=False)
    passes = {p["name"]: p for p in cm.manifest["passes"]}
    assert passes["smooth"]["verification"]["max_rel_error"] < 1e-4
    assert passes["ocs"]["verification"]["max_rel_error"] < 1e-4
    assert passes["ocs"]["metrics"]["total_channels_added"] > 0


def test_asymmetric_activations_on_the_onnx_path_match_the_fx_path(llama_onnx):
    """The ONNX-graph builder's per-token [min, max] fake quantization is the FX path's."""
    recipe = {"passes": [{"rtn": {"bits": 4, "group_size": 32}},
                         {"act_quant": {"bits": 4, "integer_only": False, "clip_ratio": 0.9,
                                        "symmetric": False}}, "pack"]}
    onnx_cm = lowbit.compile(str(llama_onnx), recipe=recipe, progress=False)
    fx_cm = lowbit.compile(tiny_llama(), recipe=recipe, target="torch", kv_cache=False,
                           progress=False)
    got, ref = onnx_cm(IDS), fx_cm(IDS)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= 2e-3, err              # a last-ulp scale may flip a rounding, no more
    fp = lowbit.compile(tiny_llama(), recipe="fp32", target="torch", kv_cache=False,
                        progress=False)(IDS)
    assert float((fp - ref).abs().max() / ref.abs().max()) > 10 * err     # it quantizes


def test_saved_artifact_reloads(llama_onnx, tmp_path):
    cm = lowbit.compile(str(llama_onnx), recipe="w4a16-rtn", progress=False)
    out = cm.save(tmp_path / "art")
    again = lowbit.load(out)
    torch.testing.assert_close(again(IDS), cm(IDS))


def test_torch_target_and_mixed_refuse_onnx_graphs(llama_onnx):
    with pytest.raises(LoweringError, match="target='onnxruntime'"):
        lowbit.compile(str(llama_onnx), recipe="w4a16-rtn", target="torch", progress=False)
    with pytest.raises(PassError, match="not yet on onnx graphs"):
        lowbit.compile(str(llama_onnx), recipe="mixed", calibration=CAL, progress=False)


# -- bad files ------------------------------------------------------------------------------
def _model(tmp_path, nodes, opset=18, domains=(), name="bad.onnx"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, 1) for d in domains])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _compile_writes_nothing(path, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(CaptureError, match=match):
        lowbit.compile(str(path), recipe="w8a16", progress=False).save(out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".data"))


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\x01not a model" * 50)
    _compile_writes_nothing(path, tmp_path, "not a readable ONNX model")


def test_unsupported_op_names_node_op_and_opset(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("FancyAct", ["h"], ["y"], name="my_act", domain="acme")]
    path = _model(tmp_path, nodes, domains=("acme",))
    _compile_writes_nothing(path, tmp_path, r"node 'my_act' \(op 'acme::FancyAct'\).*opset 1")


def test_op_newer_than_the_model_opset(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Gelu", ["h"], ["y"], name="gelu")]       # Gelu: opset 20
    path = _model(tmp_path, nodes, opset=17)
    _compile_writes_nothing(path, tmp_path, r"node 'gelu' \(op 'Gelu'\) exists only from "
                                            r"opset 20 \(model opset 17")


def test_opset_too_old(tmp_path):
    path = _model(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                  opset=11)
    _compile_writes_nothing(path, tmp_path, "opset 11 is older than.*version_converter")


def test_broken_node_is_named(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Reshape", ["h"], ["y"], name="bad_reshape")]   # no shape input
    _compile_writes_nothing(_model(tmp_path, nodes), tmp_path, "bad_reshape")


def test_missing_external_data(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    path = _model(tmp_path, nodes)
    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, location="bad.onnx.data",
              size_threshold=0)
    (tmp_path / "bad.onnx.data").unlink()
    _compile_writes_nothing(path, tmp_path, "bad.onnx.data.*not there")


def test_large_models_use_external_data(llama_onnx, tmp_path, monkeypatch):
    """Above the threshold (2 GB in real use) sessions and artifacts keep weights outside."""
    import lowbit.compiler._onnx_run as run
    small = lowbit.compile(str(llama_onnx), recipe="w4a16-rtn", progress=False)
    monkeypatch.setattr(run, "EXTERNAL_BYTES", 1)
    cm = lowbit.compile(str(llama_onnx), recipe="w4a16-rtn", progress=False)
    out = cm.save(tmp_path / "art")
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    torch.testing.assert_close(lowbit.load(out)(IDS), small(IDS))
