"""The ONNX Runtime lowering's fusions of a decoder in cache form (``backends/_ort_fuse.py``):
RMS norms, rotary + grouped-query attention over the cache, packed QKV and merged sibling
``MatMulNBits``; skipped with reasons where the structure differs; checked numerically
against the unfused export at compile time (and undone when they disagree)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.testing import (assert_numerically_equal, incremental_logits, random_ids,
                            tiny_llama, tiny_opt, tiny_qwen2)

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

W4 = {"passes": [{"rtn": {"bits": 4, "group_size": 32}}, "pack"]}


def _ops(cm) -> Counter:
    model = onnx.load(str(cm.executable.path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def w4_pair(llama):
    """The same 4-bit recipe lowered with and without the fusions (accuracy_level 0)."""
    return [lowbit.compile(llama, recipe=W4, target="onnxruntime", progress=False,
                           backend_options={"fuse": fuse}) for fuse in (True, False)]


def test_llama_decoder_fuses_into_gqa_norms_and_packed_qkv(w4_pair, llama):
    fused, plain = w4_pair
    layers = llama.config.num_hidden_layers
    low = fused.manifest["lowering"]
    assert low["fused"] == {"rms_norm": 2 * layers + 1, "group_query_attention": layers,
                            "packed_qkv": layers, "merged_matmul_nbits": 2 * layers,
                            "skip_rms_norm": 2 * layers}    # every norm but the first
    assert low["skipped"] == [] and low["max_rel_error_vs_unfused"] < 1e-5
    ops, before = _ops(fused), _ops(plain)
    assert ops["GroupQueryAttention"] == layers and "Softmax" not in ops
    assert ops["MatMulNBits"] == 4 * layers and ops["Split"] == layers  # qkv, o, gate+up, down
    # the residual adds live inside the skip norms; the one Add left sums the cache lengths
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["Add"] == 1
    assert sum(ops.values()) < sum(before.values()) / 2


def test_fused_graph_computes_what_the_export_does(w4_pair):
    fused, plain = w4_pair
    ids = random_ids(1, 12, seed=3)
    assert_numerically_equal(fused(ids), plain(ids), rtol=1e-5, what="fused vs unfused")
    inc = incremental_logits(fused.executable, fused.cache, ids)    # prefill, 1, chunk of 3
    assert_numerically_equal(inc, plain(ids), rtol=1e-5, what="fused incremental")
    batch = random_ids(3, 7, seed=4)                                # several rows: prefill
    assert_numerically_equal(fused(batch), plain(batch), rtol=1e-5, what="batched prefill")


def test_batched_chunk_on_a_cache_gets_a_clear_error(w4_pair):
    fused = w4_pair[0]
    ids = random_ids(2, 8, seed=5)
    _, *present = fused.executable({"input_ids": ids[:, :4], **fused.cache.empty(2)})
    past = dict(zip(fused.cache.input_names, present))
    with pytest.raises(UsageError, match="GroupQueryAttention.*fuse"):
        fused.executable({"input_ids": ids[:, 4:], **past})
    one = fused.executable({"input_ids": ids[:, 4:5], **past})[0]    # one token: fine
    assert one.shape[:2] == (2, 1)


def test_qwen2_with_qkv_bias_fuses_attention_but_keeps_separate_projections():
    cm = lowbit.compile(tiny_qwen2(), recipe=W4, target="onnxruntime", progress=False)
    low = cm.manifest["lowering"]
    assert low["fused"]["group_query_attention"] == 2 and "packed_qkv" not in low["fused"]
    assert low["max_rel_error_vs_unfused"] < 1e-5


def test_opt_attention_is_skipped_with_a_reason():
    cm = lowbit.compile(tiny_opt(), recipe="fp32", target="onnxruntime", progress=False)
    low = cm.manifest["lowering"]
    assert "group_query_attention" not in low["fused"]
    assert len(low["skipped"]) == 2 and all("rotary" in r for r in low["skipped"])
    ids = random_ids(2, 12, seed=9)
    assert_numerically_equal(incremental_logits(cm.executable, cm.cache, ids), cm(ids),
                             rtol=1e-5)


def test_a_fusion_that_changes_the_outputs_is_undone(monkeypatch, llama):
    import onnx_ir as ir

    from lowbit.backends import _ort_fuse
    real = _ort_fuse.fuse_decoder

    def broken(model, max_seq):
        report = real(model, max_seq)
        for node in model.graph:
            if node.op_type == "GroupQueryAttention":
                node.attributes["scale"] = ir.AttrFloat32("scale", 0.5)
        return report
    monkeypatch.setattr(_ort_fuse, "fuse_decoder", broken)
    cm = lowbit.compile(llama, recipe="fp32", target="onnxruntime", progress=False)
    low = cm.manifest["lowering"]
    assert low["fused"] == {} and "undone" in low["skipped"][0]
    assert "GroupQueryAttention" not in _ops(cm)
    ids = random_ids(1, 10, seed=6)
    assert_numerically_equal(cm(ids), llama(input_ids=ids).logits.detach(), rtol=1e-5)


def test_head_size_gqa_cannot_run_is_skipped_and_the_model_still_runs():
    # head size 12: GroupQueryAttention's CPU kernel needs a multiple of 8
    model = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    cm = lowbit.compile(model, recipe="fp32", target="onnxruntime", progress=False)
    low = cm.manifest["lowering"]
    assert "group_query_attention" not in low["fused"] and low["fused"]["rms_norm"] == 5
    assert all("multiple of 8" in r for r in low["skipped"])
    ids = random_ids(1, 10, seed=2)
    assert_numerically_equal(cm(ids), model(input_ids=ids).logits.detach(), rtol=1e-5)
