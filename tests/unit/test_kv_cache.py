"""Cache-form capture: incremental decoding equals the full-sequence forward (torch only)."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.compiler.kv_cache import KVCacheSpec
from lowbit.testing import (TINY_MODELS, assert_numerically_equal, incremental_logits,
                            random_ids, tiny_llama)

# prefill 8 tokens, then one token (decode), then three (a chunk on top of a cache)
SPLITS = (8, 9, 12)


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "gpt2"])
def test_incremental_decode_equals_the_full_sequence(name):
    model = TINY_MODELS[name]()
    cap = capture(model, kv_cache=True)
    ids = random_ids(2, SPLITS[-1], seed=3)
    full = model(input_ids=ids, use_cache=False).logits
    assert_numerically_equal(incremental_logits(cap.graph.run, cap.cache, ids), full,
                             rtol=1e-5, what=f"{name} incremental logits")


def test_cache_form_keeps_the_plain_logits_and_returns_the_cache():
    model = tiny_llama()
    plain, cached = capture(model), capture(model, kv_cache=True)
    assert plain.cache is None and plain.input_names == cached.input_names == ["input_ids"]
    assert cached.graph_inputs == ["input_ids", "past_key_0", "past_value_0", "past_key_1",
                                   "past_value_1"]
    assert cached.cache.shapes == ((2, 16),) * 4            # 2 kv heads (GQA) of 16
    ids = random_ids(1, 20, seed=5)
    logits, *present = cached.graph.run({"input_ids": ids})  # cache left out: empty
    assert_numerically_equal(logits, plain.graph.run({"input_ids": ids})[0], rtol=1e-6)
    assert [tuple(p.shape) for p in present] == [(1, 2, 20, 16)] * 4


def test_kv_cache_needs_a_causal_lm(mlp, mlp_input):
    with pytest.raises(lowbit.UsageError, match="causal LM"):
        capture(TINY_MODELS["bert"](), kv_cache=True)
    with pytest.raises(lowbit.UsageError, match="causal LM"):
        capture(mlp, example_inputs=(mlp_input,), kv_cache=True)


def test_passes_run_once_and_serve_prefill_and_decode():
    """rotate (online Hadamard nodes) + GPTQ (calibrated with an empty cache) + pack: the
    compiled decode steps use the same transformed graph as the full forward."""
    model = tiny_llama()
    cm = lowbit.compile(model, recipe="w4a16", target="torch", progress=False,
                        calibration=random_ids(4, 32, seed=1))
    assert cm.cache is not None and len(cm.manifest["layers"]) == 14
    ids = random_ids(2, SPLITS[-1], seed=4)
    full = cm(ids)
    assert_numerically_equal(incremental_logits(cm.executable, cm.cache, ids), full,
                             rtol=1e-5, what="w4a16 incremental logits")
    assert float((full - model(input_ids=ids).logits.detach()).abs().max()) > 1e-3  # quantized


def test_kv_cache_false_compiles_the_plain_graph():
    cm = lowbit.compile(tiny_llama(), recipe="fp32", target="torch", progress=False,
                        kv_cache=False)
    assert cm.cache is None and cm.manifest["model"]["graph_inputs"] == ["input_ids"]


def test_spec_round_trips_through_the_manifest_form():
    spec = KVCacheSpec(shapes=((3, 64), (3, 64)) * 2)
    assert KVCacheSpec.from_dict(spec.to_dict()) == spec and spec.num_layers == 2
    assert KVCacheSpec.from_dict(None) is None
    with pytest.raises(ValueError, match="key and a value"):
        KVCacheSpec(shapes=((3, 64),))
