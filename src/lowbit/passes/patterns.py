"""Structural matchers shared by passes: targets are found from dataflow, never from names."""
from __future__ import annotations

import re
from typing import Iterable

from lowbit.compiler.graph import Graph, LinearSite

__all__ = ["VIEW_LIKE", "feeds_output_directly", "select_linears"]

#: Ops that move or relabel values without computing new ones.
VIEW_LIKE = frozenset({"alias", "view", "reshape", "to", "contiguous", "clone", "_to_copy",
                       "squeeze", "unsqueeze", "flatten", "detach", "expand", "slice",
                       "_assert_tensor_metadata", "dropout"})


def feeds_output_directly(graph: Graph, node: str) -> bool:
    """True if ``node``'s value reaches a graph output through view-like ops only.

    This is how the output head (``lm_head``) is recognised on any architecture.
    """
    frontier, seen = [node], set()
    reached = False
    while frontier:
        cur = frontier.pop()
        for c in graph.consumers(cur):
            if c in seen:
                continue
            seen.add(c)
            op = graph.op(c)
            if op == "output":
                reached = True
            elif op in VIEW_LIKE:
                frontier.append(c)
            else:
                return False
    return reached


def select_linears(graph: Graph, include_head: bool = False,
                   exclude: Iterable[str] = ()) -> tuple[list[LinearSite], list[tuple[str, str]]]:
    """Linear sites to quantize, plus ``(layer, reason)`` for each one left out."""
    patterns = [re.compile(p) for p in exclude]
    chosen, skipped = [], []
    for site in graph.linears():
        if not include_head and feeds_output_directly(graph, site.node):
            skipped.append((site.name, "output head kept in float "
                                       "(set include_head=True to quantize it)"))
        elif any(p.search(site.name) for p in patterns):
            skipped.append((site.name, "excluded by the recipe's 'exclude' option"))
        else:
            chosen.append(site)
    return chosen, skipped
