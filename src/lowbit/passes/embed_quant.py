"""embed_quant: int8 embedding tables, one scale per row (token).

An LM's input embedding is its largest tensor that no weight quantizer touches: in SmolLM2-135M
the float table is 113 MB of a 4-bit artifact's ~190 MB. Each row ``e`` becomes
``q = round(e / s)``, ``s = max|e| / 127`` (symmetric int8); the lookup reads ``q`` and ``s``
of the requested tokens only. A table still read by a float consumer (an output head tied
to it and left in float) is skipped: quantizing it would store it twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.compiler.passes import PassResult, graph_pass
from lowbit.numerics.quant import sqnr_db

__all__ = ["embed_quant", "EmbedQuantOptions", "quantize_rows"]


@dataclass(frozen=True)
class EmbedQuantOptions:
    bits: int = 8

    def __post_init__(self):
        if self.bits != 8:
            raise ValueError(f"embed_quant supports bits=8 (int8 rows), got {self.bits}")


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [V, H], s float32 [V, 1])`` with ``q = round(e / s)``, ``s = max|e| / 127``
    per row (``s = 1`` for an all-zero row), so that ``q * s`` approximates ``e``.

    >>> q, s = quantize_rows(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
    >>> q.tolist(), s.flatten().tolist()
    ([[64, -127], [0, 0]], [0.007874015718698502, 1.0])
    """
    t = table.detach().to(torch.float64)
    amax = t.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.clamp(torch.round(t / s), -127, 127).to(torch.int8)
    return q, s.to(torch.float32)


def _readers(graph) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n in graph.nodes():
        for i in graph.inputs(n):
            if graph.op(i) == "constant":
                out.setdefault(graph.node(i).target, set()).add(n)
    return out


@graph_pass(name="embed_quant", numerics="approx",
            options=EmbedQuantOptions)
def embed_quant(graph, ctx) -> PassResult:
    """Store every embedding table as int8 rows with a float scale per row."""
    if not hasattr(graph, "replace_embedding_table"):
        return PassResult(changed=False, skipped=(
            ("*", f"the {getattr(graph, 'form', '?')} graph adapter has no embedding "
                  "quantization yet (FX form only)"),))
    readers = _readers(graph)
    done, skipped, sqnr = [], [], {}
    for node in [n for n in graph.nodes() if graph.op(n) == "embedding"]:
        src = graph.inputs(node)[0]
        if graph.op(src) != "constant":
            skipped.append((node, "the table is not a constant"))
            continue
        target = graph.node(src).target
        others = sorted(readers.get(target, set()) - {node})
        if others:
            skipped.append((node, f"table '{target}' is also read by {others} in float "
                                  "(a tied head): quantize that reader first (include_head)"))
            continue
        table = graph.attr(target)
        q, s = quantize_rows(table)
        sqnr[node] = round(sqnr_db(table, q.float() * s), 2)
        graph.replace_embedding_table(node, q, s, created_by="embed_quant")
        done.append(node)
    return PassResult(changed=bool(done), transformed=tuple(done), skipped=tuple(skipped),
                      metrics={"embedding_sqnr_db": sqnr})
