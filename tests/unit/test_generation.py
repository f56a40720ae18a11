"""CompiledModel.generate on the torch backend, and the token pickers."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.generation import next_tokens
from lowbit.testing import random_ids, tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, lowbit.compile(model, recipe="fp32", target="torch", progress=False)


def test_greedy_matches_transformers_generate(llama):
    model, cm = llama
    ids = random_ids(2, 5, seed=2)
    out = cm.generate(ids, max_new_tokens=7)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(out.ids, expected)
    assert out.new_ids.shape == (2, 7) and out.prompt_length == 5 and out.text is None
    assert len(out.decode_seconds) == 6          # one prefill, then one step per token


def test_without_a_cache_generation_recomputes_and_agrees(llama):
    _, cm = llama
    plain = lowbit.compile(tiny_llama(), recipe="fp32", target="torch", progress=False,
                           kv_cache=False)
    ids = [5, 9, 17, 3]
    assert torch.equal(plain.generate(ids, 6).ids, cm.generate(ids, 6).ids)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama):
    _, cm = llama
    a = cm.generate([1, 2, 3], 8, do_sample=True, seed=7, temperature=1.5, top_p=0.9)
    b = cm.generate([1, 2, 3], 8, do_sample=True, seed=7, temperature=1.5, top_p=0.9)
    assert torch.equal(a.ids, b.ids)
    greedy = cm.generate([1, 2, 3], 8)
    assert torch.equal(cm.generate([1, 2, 3], 8, do_sample=True, top_k=1, seed=0).ids,
                       greedy.ids)


def test_a_row_stops_at_eos_and_is_padded_with_it(llama):
    _, cm = llama
    free = cm.generate([1, 2, 3], 6)
    eos = int(free.new_ids[0, 2])
    first = [int(t) for t in free.new_ids[0]].index(eos)
    out = cm.generate([1, 2, 3], 6, eos_token_id=eos)
    assert out.new_ids.shape[1] == first + 1 and int(out.new_ids[0, -1]) == eos


def test_generate_after_save_and_load(llama, tmp_path):
    _, cm = llama
    loaded = lowbit.load(cm.save(tmp_path / "a"))
    assert loaded.cache == cm.cache
    assert torch.equal(loaded.generate([4, 5, 6], 5).ids, cm.generate([4, 5, 6], 5).ids)


def test_usage_errors(llama):
    _, cm = llama
    enc = lowbit.compile(tiny_bert(), recipe="fp32", target="torch", progress=False)
    with pytest.raises(lowbit.UsageError, match="causal LM"):
        enc.generate([1, 2, 3])
    with pytest.raises(lowbit.UsageError, match="no tokenizer"):
        cm.generate("hello")
    with pytest.raises(lowbit.UsageError, match="exceeds"):
        cm.generate([1, 2, 3], max_new_tokens=600)
    with pytest.raises(lowbit.UsageError, match="temperature"):
        cm.generate([1, 2, 3], do_sample=True, temperature=0)


def test_next_tokens_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, True, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}                  # 0.5 < 0.7: the nucleus needs the second token
    draws = {int(next_tokens(logits, True, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert next_tokens(logits, False).tolist() == [0]
