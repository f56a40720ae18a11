"""Quality evaluation exactly per ../shared/PROTOCOL.md.

Perplexity: the first 64 non-overlapping 512-token windows of WikiText-2 test.txt, mean NLL
of every next-token prediction inside each window (511 per window), exp.
Encoder quality: mean cosine similarity of mean-pooled sentence embeddings vs a reference.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from lowbit.data.wikitext import eval_windows, text_lines

__all__ = ["perplexity", "logits_fn", "embedding_similarity", "mean_pool"]


def logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``ids [1, L] -> logits [1, L, V]`` callable for a CompiledModel, HF model or graph."""
    from lowbit.compiler.artifact import CompiledModel
    if isinstance(model, CompiledModel):
        return model
    if hasattr(model, "run") and getattr(model, "form", None) in ("fx", "onnx"):  # a Graph
        return lambda ids: model.run({"input_ids": ids})[0]
    if isinstance(model, torch.nn.Module):
        def call(ids):
            out = model(input_ids=ids, use_cache=False)
            return out.logits if hasattr(out, "logits") else out
        return call
    if callable(model):
        return model
    raise TypeError(f"cannot evaluate a {type(model).__name__}")


def perplexity(model, tokenizer, n_windows: int = 64, seq_len: int = 512, data_dir=None,
               progress: bool = True, windows: torch.Tensor | None = None) -> dict:
    """``{"ppl", "nll", "tokens", "windows", "seconds"}`` of ``model`` on WikiText-2 test."""
    fn = logits_fn(model)
    if windows is None:
        windows = eval_windows(tokenizer, n_windows, seq_len, data_dir)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
            ids = w[None]
            logits = fn(ids).to(torch.float32)
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(nll)
            count += ids.shape[1] - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count,
            "windows": len(windows), "seconds": round(time.perf_counter() - t0, 2)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embedding_similarity(model, reference, tokenizer, n_lines: int = 256, max_len: int = 128,
                         data_dir=None, progress: bool = True) -> dict:
    """Mean cosine similarity of mean-pooled embeddings of ``model`` vs ``reference``.

    Both are callables ``(input_ids, attention_mask) -> last_hidden_state``.
    """
    sims = []
    with torch.no_grad():
        for line in tqdm(text_lines("test", n_lines, data_dir), desc="embeddings",
                         disable=not progress, leave=False):
            enc = tokenizer(line, return_tensors="pt", truncation=True, max_length=max_len)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            a = mean_pool(model(ids, mask), mask)
            b = mean_pool(reference(ids, mask), mask)
            sims.append(float(torch.nn.functional.cosine_similarity(a, b).mean()))
    return {"cosine": sum(sims) / len(sims), "lines": len(sims)}
