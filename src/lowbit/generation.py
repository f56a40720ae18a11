"""Text generation over a compiled causal LM: greedy or sampled, one token per step.

With a KV cache (the default for causal LMs) the prompt runs once (prefill, empty cache) and
each later step feeds only the newest token. ONNX Runtime artifacts with a fused attention keep
the cache in fixed-capacity buffers that each step extends in place, so a step costs the same
at any context length up to attention over the cache; other backends pass each step the cache
the previous step returned (a new tensor per step, so a copy that grows with the context).
Artifacts compiled with ``kv_cache=False`` are decoded by re-running the whole sequence each
step.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
    >>> next_tokens(logits, do_sample=False).tolist()
    [1]
    >>> next_tokens(logits, do_sample=True, top_k=1, generator=torch.Generator()).tolist()
    [1]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from lowbit.compiler.kv_cache import KVCacheSpec
from lowbit.errors import UsageError

__all__ = ["Generation", "SamplingOptions", "generate_ids", "next_tokens"]

Step = Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is picked from the last position's logits.

    ``do_sample=False``: greedy (argmax). Otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (0: all) and to the smallest set whose probability reaches ``top_p``.
    """
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature} "
                             "(use do_sample=False for greedy decoding)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UsageError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, "
                             f"top_p={self.top_p}")


@dataclass
class Generation:
    """Generated sequences: ``ids [batch, prompt + new]``; ``text`` of the new tokens."""
    ids: torch.Tensor
    prompt_length: int
    text: list[str] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)   # one entry per later step

    @property
    def new_ids(self) -> torch.Tensor:
        return self.ids[:, self.prompt_length:]


def next_tokens(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row of ``logits [batch, vocab]`` (see :class:`SamplingOptions`)."""
    logits = logits.to(torch.float32)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def generate_ids(step: Step, ids: torch.Tensor, max_new_tokens: int,
                 cache: KVCacheSpec | None, sampling: SamplingOptions = SamplingOptions(),
                 eos: Iterable[int] = (), seed: int | None = None) -> Generation:
    """Extend ``ids [batch, prompt]`` by up to ``max_new_tokens`` tokens.

    ``step(inputs) -> [logits, *present]`` runs the model once. If ``step`` also offers
    ``cached_decoder(batch, capacity)`` (ONNX Runtime artifacts with a fused attention), the
    cache lives in buffers each step extends in place instead. A row that emits a token of
    ``eos`` is finished: it is padded with that token until every row is finished.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos_ids = torch.tensor(sorted(set(eos)), dtype=torch.long)
    seq, prompt = ids, ids.shape[1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    advance = _advancer(step, cache, ids.shape[0], prompt + max_new_tokens)
    out = Generation(ids=seq, prompt_length=prompt)
    new = ids
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = advance(new)
        seconds = time.perf_counter() - t0
        out.prefill_seconds = seconds if i == 0 else out.prefill_seconds
        if i:
            out.decode_seconds.append(seconds)
        token = next_tokens(logits[:, -1], sampling.do_sample, sampling.temperature,
                            sampling.top_k, sampling.top_p, generator)
        token = torch.where(done, seq[:, -1], token)     # finished rows repeat their eos
        seq = torch.cat([seq, token[:, None]], dim=1)
        done |= torch.isin(token, eos_ids)
        if bool(done.all()):
            break
        new = token[:, None]
    out.ids = seq
    return out


def _advancer(step: Step, cache: KVCacheSpec | None, batch: int,
              capacity: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``advance(new_ids) -> logits``: runs the model on the next tokens, keeping the state
    (the cache, or without one the sequence so far) between calls."""
    if cache is None:
        seen: list[torch.Tensor] = []

        def rerun(new):                       # no cache: the whole sequence each step
            seen.append(new)
            return step({"input_ids": torch.cat(seen, dim=1)})[0]
        return rerun
    decoder = getattr(step, "cached_decoder", lambda b, c: None)(batch, capacity)
    if decoder is not None:
        return decoder
    past = cache.empty(batch)

    def cached(new):
        nonlocal past
        logits, *present = step({"input_ids": new, **past})
        past = dict(zip(cache.input_names, present))
        return logits
    return cached
