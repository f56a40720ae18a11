"""Helpers for tests and plugin authors: tiny models and numeric assertions."""
from __future__ import annotations

import torch

__all__ = ["incremental_logits", "tiny_llama", "tiny_qwen2", "tiny_opt", "tiny_gpt2",
           "tiny_bert", "TINY_MODELS", "assert_numerically_equal", "random_ids", "export_onnx"]


def _seeded(fn):
    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return fn(**overrides).eval()
    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


@_seeded
def tiny_llama(**kw):
    """A 2-layer random Llama (GQA, tied embeddings), vocab 128, hidden 64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
               max_position_embeddings=512)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))


@_seeded
def tiny_qwen2(**kw):
    """A 2-layer random Qwen2 (q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(Qwen2Config(**{**cfg, **kw}))


@_seeded
def tiny_opt(**kw):
    """A 2-layer random OPT (LayerNorm, ReLU MLP, biases)."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512)
    return OPTForCausalLM(OPTConfig(**{**cfg, **kw}))


@_seeded
def tiny_gpt2(**kw):
    """A 2-layer random GPT-2 (Conv1D layers: transposed weights, addmm)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw}))


@_seeded
def tiny_bert(**kw):
    """A 2-layer random BERT encoder."""
    from transformers import BertConfig, BertModel
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512)
    return BertModel(BertConfig(**{**cfg, **kw}), add_pooling_layer=False)


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt, "gpt2": tiny_gpt2,
               "bert": tiny_bert}


def random_ids(batch: int = 1, seq: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_numerically_equal(actual: torch.Tensor, expected: torch.Tensor,
                             rtol: float = 1e-5, what: str = "outputs") -> float:
    """Assert ``max|a - e| / max|e| <= rtol``; returns the measured relative error."""
    exp = expected.detach().to(torch.float64)
    err = float((actual.detach().to(torch.float64) - exp).abs().max()
                / exp.abs().max().clamp(min=1e-30))
    assert err <= rtol, f"{what} differ: max relative error {err:.3e} > {rtol:.1e}"
    return err


def export_onnx(model, path, max_seq: int = 512):
    """Export a Hugging Face model to ``path`` with ``torch.onnx.export`` (dynamo), as a user
    would: ``input_ids -> logits`` for causal LMs, ``(input_ids, attention_mask) ->
    last_hidden_state`` for encoders, dynamic batch and sequence. Returns ``path``.

    Example::

        >>> export_onnx(tiny_llama(), tmp / "llama.onnx")   # doctest: +SKIP
    """
    import contextlib
    import io
    import warnings

    from lowbit.compiler.capture import _CausalLM, _Encoder, _is_causal_lm
    causal = _is_causal_lm(model)
    ids = random_ids(2, 16, int(model.config.vocab_size))
    wrapper, args = (_CausalLM(model), (ids,)) if causal else \
        (_Encoder(model), (ids, torch.ones_like(ids)))
    names = ["input_ids"] if causal else ["input_ids", "attention_mask"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(wrapper.eval(), args, input_names=names,
                                 output_names=["logits" if causal else "last_hidden_state"],
                                 dynamo=True, dynamic_shapes=tuple({0: batch, 1: seq}
                                                                   for _ in args),
                                 optimize=True, verbose=False)
    prog.save(str(path))
    return path


def incremental_logits(run, cache, ids: torch.Tensor, splits=(8, 9, 12)) -> torch.Tensor:
    """Logits of ``ids`` fed to ``run`` (an executable taking an input dict) in chunks ending at
    ``splits``, each step given the cache the step before returned (``cache``: a
    ``KVCacheSpec``). The default: prefill 8, decode 1, then a chunk of 3 on top of a cache."""
    from lowbit.compiler.kv_cache import run_in_chunks
    return torch.cat(run_in_chunks(run, cache, ids, splits)[0], dim=1)
