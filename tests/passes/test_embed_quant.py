"""embed_quant: int8 embedding rows with a float scale per row."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.passes.embed_quant import quantize_rows
from lowbit.testing import random_ids, tiny_llama

HEAD4 = {"rtn": {"bits": 4, "group_size": 32, "include_head": True}}


def test_quantize_rows_error_is_at_most_half_a_step():
    table = torch.randn(50, 24, generator=torch.Generator().manual_seed(0)) * 3
    table[7] = 0.0
    q, s = quantize_rows(table)
    assert q.dtype == torch.int8 and s.shape == (50, 1) and q.abs().max() <= 127
    assert ((q.float() * s - table).abs() <= s / 2 + 1e-6).all()
    assert torch.equal(q[7], torch.zeros(24, dtype=torch.int8)) and s[7].item() == 1.0
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(50) != 7], torch.full((49,), 127,
                                                                               dtype=torch.int8))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()                 # tied embeddings


def test_lookup_reads_int8_codes_and_row_scales():
    model = tiny_llama(tie_word_embeddings=False)
    cm = lowbit.compile(model, recipe={"passes": ["embed_quant"]}, target="torch",
                        progress=False)
    record = cm.manifest["passes"][-1]
    assert record["transformed"] == 1 and record["skipped"] == []
    assert record["metrics"]["embedding_sqnr_db"]["embedding"] > 40
    tables = [v for v in cm.executable.module.state_dict().values()
              if v.dim() == 2 and v.shape[0] == model.config.vocab_size]
    q, s = quantize_rows(model.model.embed_tokens.weight)
    codes = [v for v in tables if v.dtype == torch.int8]
    assert len(codes) == 1 and torch.equal(codes[0], q)
    # the outputs are those of the model whose table is q * s
    ids = random_ids(2, 10, seed=1)
    expected = model(input_ids=ids).logits.detach()
    model.model.embed_tokens.weight.data = q.float() * s
    assert not torch.equal(cm(ids), expected)
    torch.testing.assert_close(cm(ids), model(input_ids=ids).logits.detach(), rtol=1e-6,
                               atol=1e-6)


def test_table_tied_to_a_float_head_is_skipped(model):
    cm = lowbit.compile(model, recipe={"passes": ["embed_quant"]}, target="torch",
                        progress=False)
    record = cm.manifest["passes"][-1]
    assert record["transformed"] == 0
    assert "tied head" in record["skipped"][0]["reason"]
    ids = random_ids(1, 8)
    torch.testing.assert_close(cm(ids), model(input_ids=ids).logits, rtol=0, atol=0)


def test_onnxruntime_lowering_is_exact_and_smaller(model):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    big = lowbit.compile(model, recipe={"passes": [HEAD4, "pack"]}, target="onnxruntime",
                         progress=False)
    small = lowbit.compile(model, recipe={"passes": [HEAD4, "pack", "embed_quant"]},
                           target="onnxruntime", progress=False)
    assert small.figures["backend_max_rel_error_vs_torch"] < 1e-5
    table = model.config.vocab_size * model.config.hidden_size
    saved = 3 * table - 4 * model.config.vocab_size       # 4 -> 1 byte per entry, + scales
    assert 0.9 * saved <= big.nbytes - small.nbytes <= saved  # (new nodes cost a few names)
    graph = onnx.load(str(small.executable.path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert any(n.op_type == "Gather" and n.input[0] in int8 for n in graph.node)


def test_tvm_llvm_lowering_agrees_with_torch(model):
    pytest.importorskip("tvm")
    cm = lowbit.compile(model, recipe={"passes": [HEAD4, "pack", "embed_quant"]},
                        target="llvm", progress=False)
    assert cm.figures["backend_max_rel_error_vs_torch"] < 1e-5


def test_w4a16_edge_preset_is_w4a16_with_the_head_and_int8_embeddings():
    """The deployment preset: rotation + GPTQ (as w4a16, refitting included) on every linear,
    the head too, then int8 embedding rows."""
    from lowbit.plugins.manager import get_registry
    presets = get_registry().presets
    edge, base = presets["w4a16-edge"], presets["w4a16"]
    assert [p.name for p in edge.passes] == [p.name for p in base.passes] + ["embed_quant"]
    gptq = dict(next(p for p in edge.passes if p.name == "gptq").options)
    assert gptq.pop("include_head") is True
    assert gptq == dict(next(p for p in base.passes if p.name == "gptq").options)
    model = tiny_llama()              # tied embeddings: the rotation unties them
    calib = [{"input_ids": random_ids(2, 32, seed=s)} for s in range(2)]
    cm = lowbit.compile(model, recipe="w4a16-edge", target="torch", calibration=calib,
                        progress=False)
    layers = cm.manifest["layers"]
    assert any("lm_head" in name for name in layers) and len(layers) == 7 * 2 + 1
    int8 = [v for v in cm.executable.module.state_dict().values() if v.dtype == torch.int8]
    assert [tuple(v.shape) for v in int8] == [(model.config.vocab_size,
                                               model.config.hidden_size)]
