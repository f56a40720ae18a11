"""The residual stream of a pre-norm transformer, found by dataflow (used by ``rotate``).

Starting at the embedding lookups, the stream is followed through view-like ops and residual
``add`` nodes. Every reader of the stream must be an RMS norm (``x * rsqrt(mean(x^2) + eps)``,
optionally times a 1-D constant ``gamma``) whose output feeds only linears (*readers*); every
value added into the stream must come from a linear (*writer*) or another embedding lookup
(learned positions). Anything else (a LayerNorm's mean subtraction, a post-norm block) makes
the model not rotatable as is, and the plan says where and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.compiler.graph import LinearSite
from lowbit.passes.patterns import VIEW_LIKE

__all__ = ["Norm", "StreamPlan", "find_stream"]

_IGNORED = {"_assert_tensor_metadata"}     # dtype/shape checks with no users


@dataclass(frozen=True)
class Norm:
    input: str                       # the stream value normalised
    output: str                      # node whose value the readers consume
    gamma: str | None                # constant target of the affine weight, if any
    readers: tuple[LinearSite, ...]


@dataclass
class StreamPlan:
    embeddings: list[str] = field(default_factory=list)      # embedding nodes
    norms: list[Norm] = field(default_factory=list)
    writers: list[LinearSite] = field(default_factory=list)
    width: int = 0
    problem: str | None = None       # why the stream cannot be rotated (None: it can)


def _source(graph, node: str) -> str:
    while graph.op(node) in VIEW_LIKE and graph.inputs(node):   # first input: the tensor
        node = graph.inputs(node)[0]
    return node


def _readers(graph, node: str) -> list[str]:
    out = []
    for c in graph.consumers(node):
        if graph.op(c) in _IGNORED:
            continue
        out.extend(_readers(graph, c) if graph.op(c) in VIEW_LIKE else [c])
    return out


def _rms_norm(graph, x: str, linears: dict) -> Norm | str:
    """Match ``mul(x, rsqrt(add(mean(pow(x, 2)), eps)))`` (times gamma) rooted at ``x``."""
    muls = [c for c in graph.consumers(x) if graph.op(c) == "mul"
            and any(graph.op(i) == "rsqrt" for i in graph.inputs(c))]
    pows = [c for c in graph.consumers(x) if graph.op(c) == "pow"]
    if len(muls) != 1 or len(pows) != 1:
        return "not an RMS norm (no x * rsqrt(mean(x^2) + eps) on it)"
    out, gamma = muls[0], None
    nxt = _readers(graph, out)
    if len(nxt) == 1 and graph.op(nxt[0]) == "mul":
        consts = [i for i in graph.inputs(nxt[0]) if graph.op(i) == "constant"]
        if consts:
            out, gamma = nxt[0], graph.node(consts[0]).target
    readers = _readers(graph, out)
    sites = [linears.get(r) for r in readers]
    if not readers or any(s is None or _source(graph, s.input) != out for s in sites):
        ops = sorted({graph.op(r) for r in readers if r not in linears})
        return f"norm output '{out}' is read by {ops or 'nothing'}, not only by linears"
    return Norm(x, out, gamma, tuple(sites))


def _embedding(graph, node: str) -> bool:
    return graph.op(node) == "embedding" and graph.op(graph.inputs(node)[0]) == "constant"


def find_stream(graph) -> StreamPlan:
    """Follow the residual stream from the embeddings (see module doc)."""
    plan = StreamPlan()
    linears = {s.node: s for s in graph.linears()}
    starts = [n for n in graph.nodes() if _embedding(graph, n)]
    if not starts:
        plan.problem = "no embedding lookup with a constant table starts a residual stream"
        return plan
    plan.embeddings = list(starts)
    plan.width = int(graph.attr(graph.node(graph.inputs(starts[0])[0]).target).shape[1])
    frontier, seen, norms = list(starts), set(starts), {}
    while frontier and plan.problem is None:
        v = frontier.pop()
        for c in graph.consumers(v):
            op = graph.op(c)
            if c in seen or op in _IGNORED:
                continue
            if op in VIEW_LIKE:
                seen.add(c)
                frontier.append(c)
            elif op == "add":
                other = [i for i in graph.inputs(c) if i != v]
                src = _source(graph, other[0]) if other else v
                if src in linears:
                    plan.writers.append(linears[src])
                elif src in seen or _embedding(graph, src):
                    if src not in plan.embeddings and _embedding(graph, src):
                        plan.embeddings.append(src)
                else:
                    plan.problem = f"residual add '{c}' adds '{graph.op(src)}' ({src}), not a linear"
                    break
                seen.add(c)
                frontier.append(c)
            elif op in ("pow", "mul") and v not in norms:
                found = _rms_norm(graph, v, linears)
                if isinstance(found, str):
                    plan.problem = f"stream value '{v}': {found}"
                    break
                norms[v] = found
            elif op in ("pow", "mul"):
                continue
            else:
                what = "a LayerNorm (mean subtraction)" if "layer_norm" in op else f"'{op}'"
                plan.problem = f"stream value '{v}' is read by {what} ({c})"
                break
    order = {n: i for i, n in enumerate(graph.nodes())}
    plan.norms = sorted(norms.values(), key=lambda m: order[m.input])
    if plan.problem is None and not plan.norms:
        plan.problem = "no norm reads the stream"
    return plan
