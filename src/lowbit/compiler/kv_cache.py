"""The KV cache of a causal LM as flat graph inputs and outputs.

A causal LM captured in *cache form* takes ``input_ids [batch, seq]`` plus, per layer, the
keys and values of the tokens before them (``past_key_<i>``, ``past_value_<i>``, each
``[batch, heads, past, head_dim]``) and returns ``logits`` plus the cache extended by the new
tokens (``present_key_<i>``, ``present_value_<i>``, ``past + seq`` long). ``past`` may be 0:
one graph serves prefill (empty cache) and decode (one new token).

Example:
    >>> spec = KVCacheSpec(shapes=((2, 16), (2, 16)))
    >>> spec.input_names, spec.output_names
    (('past_key_0', 'past_value_0'), ('present_key_0', 'present_value_0'))
    >>> {k: tuple(v.shape) for k, v in spec.empty(batch=3).items()}
    {'past_key_0': (3, 2, 0, 16), 'past_value_0': (3, 2, 0, 16)}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["KVCacheSpec", "SEQ_AXIS", "run_in_chunks"]

#: The sequence axis of every cache tensor (``[batch, heads, seq, head_dim]``).
SEQ_AXIS = 2


@dataclass(frozen=True)
class KVCacheSpec:
    """Shapes of the cache tensors: ``(heads, head_dim)`` of each, key then value per layer."""
    shapes: tuple[tuple[int, int], ...]
    dtype: str = "float32"

    def __post_init__(self):
        if not self.shapes or len(self.shapes) % 2:
            raise ValueError(f"a KV cache has a key and a value per layer; got "
                             f"{len(self.shapes)} tensors")

    @property
    def num_layers(self) -> int:
        return len(self.shapes) // 2

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(f"past_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value"))

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n.replace("past_", "present_", 1) for n in self.input_names)

    def empty(self, batch: int, length: int = 0) -> dict[str, torch.Tensor]:
        """Cache inputs holding ``length`` zero tokens (``length=0``: the prefill cache)."""
        dtype = getattr(torch, self.dtype)
        return {name: torch.zeros(batch, h, length, d, dtype=dtype)
                for name, (h, d) in zip(self.input_names, self.shapes)}

    def to_dict(self) -> dict:
        return {"shapes": [list(s) for s in self.shapes], "dtype": self.dtype,
                "inputs": list(self.input_names), "outputs": list(self.output_names),
                "seq_axis": SEQ_AXIS}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "KVCacheSpec | None":
        if not d:
            return None
        return cls(shapes=tuple(tuple(int(x) for x in s) for s in d["shapes"]),
                   dtype=d.get("dtype", "float32"))


def run_in_chunks(run, cache: KVCacheSpec, ids: torch.Tensor, splits=(8, 9, 12)):
    """``(logits of each chunk, final cache)`` of ``ids`` fed to ``run`` (an executable taking
    an input dict) in chunks ending at ``splits``, each step given the cache the step before
    returned. The default: prefill 8, decode 1, then a chunk of 3 on top of a cache."""
    past, chunks, start = cache.empty(ids.shape[0]), [], 0
    for stop in splits:
        logits, *present = run({"input_ids": ids[:, start:stop], **past})
        chunks.append(logits)
        past, start = dict(zip(cache.input_names, present)), stop
    return chunks, past
