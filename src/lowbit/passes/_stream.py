"""The residual stream of a pre-norm transformer, found by dataflow (used by ``rotate``).

Starting at the embedding lookups, the stream is followed through view-like ops and residual
``add`` nodes. Every reader of the stream must be a norm whose output feeds only linears
(*readers*):

* an RMS norm ``x * rsqrt(mean(x^2) + eps)``, optionally times a 1-D constant ``gamma``
  (Llama, Qwen2, SmolLM2 as torch.export decomposes them; or ``aten.rms_norm``);
* a LayerNorm ``gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta`` (``aten.layer_norm`` or
  ``native_layer_norm``; OPT, GPT-2). All norms of one stream must be of one kind.

Every value added into the stream must come from a linear (*writer*) or another embedding
lookup (learned positions). Anything else (a post-norm block, whose norm output is itself the
stream) makes the model not rotatable as is, and the plan says where and why.

Example:
    >>> from lowbit.compiler.capture import capture
    >>> from lowbit.testing import tiny_opt
    >>> plan = find_stream(capture(tiny_opt()).graph)
    >>> plan.problem, plan.width, plan.kind, len(plan.norms), len(plan.writers)
    (None, 64, 'layer', 5, 4)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from lowbit.compiler.graph import LinearSite
from lowbit.passes.patterns import VIEW_LIKE

__all__ = ["Norm", "StreamPlan", "find_stream", "NORM_OPS"]

_IGNORED = {"_assert_tensor_metadata"}     # dtype/shape checks with no users
#: Undecomposed norm ops and their kind.
NORM_OPS = {"layer_norm": "layer", "native_layer_norm": "layer", "rms_norm": "rms"}


@dataclass(frozen=True)
class Norm:
    """A norm reading the stream value ``input``; its readers consume ``output``.

    ``kind`` is ``"rms"`` (``output`` is the mul by ``gamma``, or by the rsqrt without one,
    or an ``rms_norm`` node) or ``"layer"`` (``output`` is the LayerNorm node, or
    ``getitem(.., 0)`` of a native one).
    """
    input: str
    output: str
    gamma: str | None                # constant target of the affine weight, if any
    readers: tuple[LinearSite, ...]
    kind: str = "rms"
    beta: str | None = None          # constant target of a LayerNorm's bias, if any
    eps: float | None = None         # an undecomposed norm's epsilon (None: the op default)


@dataclass
class StreamPlan:
    embeddings: list[str] = field(default_factory=list)      # embedding nodes
    norms: list[Norm] = field(default_factory=list)
    writers: list[LinearSite] = field(default_factory=list)
    width: int = 0
    problem: str | None = None       # why the stream cannot be rotated (None: it can)

    @property
    def kind(self) -> str | None:
        """``"rms"`` or ``"layer"``: the kind of every norm on the stream."""
        kinds = {n.kind for n in self.norms}
        return kinds.pop() if len(kinds) == 1 else None


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


def _linear_readers(graph, out: str, linears: dict) -> tuple[LinearSite, ...] | str:
    """The linears reading ``out`` (through views), or why ``out`` is read by others."""
    readers = _readers(graph, out)
    sites = [linears.get(r) for r in readers]
    if readers and all(s is not None and _source(graph, s.input) == out for s in sites):
        return tuple(sites)
    others = sorted({graph.op(r) for r in readers if r not in linears})
    if "add" in others:
        return (f"norm output '{out}' also feeds a residual add: a post-norm block (the "
                "normalised value is the stream itself), which a rotation cannot pass")
    return f"norm output '{out}' is read by {others or 'nothing'}, not only by linears"


def _rms_norm(graph, x: str, linears: dict) -> Norm | str:
    """Match ``mul(x, rsqrt(add(mean(pow(x, 2)), eps)))`` (times gamma) rooted at ``x``."""
    muls = [c for c in graph.consumers(x) if graph.op(c) == "mul"
            and any(graph.op(i) == "rsqrt" for i in graph.inputs(c))]
    pows = [c for c in graph.consumers(x) if graph.op(c) == "pow"]
    either = [c for c in graph.consumers(x) if graph.op(c) in ("pow", "mul")]
    if len(muls) != 1 or len(pows) != 1 or len(either) != 2:
        return "not an RMS norm (no x * rsqrt(mean(x^2) + eps) on it)"
    out, gamma = muls[0], None
    nxt = _readers(graph, out)
    if len(nxt) == 1 and graph.op(nxt[0]) == "mul":
        consts = [i for i in graph.inputs(nxt[0]) if graph.op(i) == "constant"]
        if consts:
            out, gamma = nxt[0], graph.node(consts[0]).target
    sites = _linear_readers(graph, out, linears)
    return sites if isinstance(sites, str) else Norm(x, out, gamma, sites)


def _native_output(graph, node: str) -> str | None:
    """The ``getitem(.., 0)`` of a ``native_layer_norm`` if nothing reads its mean or rstd."""
    items = {graph.node(c).args[1]: c for c in graph.consumers(node)
             if graph.op(c) == "getitem"}
    read = [i for i, c in items.items() if i != 0 and graph.consumers(c)]
    if 0 not in items or read or len(items) != len(graph.consumers(node)):
        return None
    return items[0]


def _norm_op(graph, x: str, node: str, width: int, linears: dict) -> Norm | str:
    """Match an undecomposed ``layer_norm``/``native_layer_norm``/``rms_norm`` of ``x`` over
    its last ``width`` channels, with constant (or no) affine weight and bias."""
    kind = NORM_OPS[graph.op(node)]
    args = graph.norm_args(node)
    weight, bias = args["weight"], args["bias"]
    if args["width"] != width or any(
            a is not None and graph.op(a) != "constant" for a in (weight, bias)):
        return f"norm '{node}' is not over the last {width} channels with constant affine"
    out = _native_output(graph, node) if graph.op(node) == "native_layer_norm" else node
    if out is None:
        return f"LayerNorm '{node}': its mean or rstd output is read"
    sites = _linear_readers(graph, out, linears)
    if isinstance(sites, str):
        return sites
    target = lambda a: graph.node(a).target if a is not None else None  # noqa: E731
    return Norm(x, out, target(weight), sites, kind, target(bias), args["eps"])


def _embedding(graph, node: str) -> bool:
    return graph.op(node) == "embedding" and graph.op(graph.inputs(node)[0]) == "constant"


def _add(graph, plan: StreamPlan, node: str, seen: set, linears: dict) -> str | None:
    """Record what the residual ``add`` ``node`` adds to the stream; returns a problem or None.

    Called in topological order, so every stream value feeding ``node`` is already ``seen``.
    """
    terms = [_source(graph, i) for i in graph.inputs(node)]
    if len(terms) != 2:
        return f"residual add '{node}' adds a non-tensor constant (it does not commute with Q)"
    for src in terms:
        if src in linears and _readers(graph, src) != [node]:
            return f"writer '{src}' is read by more than the residual add '{node}'"
        if src in linears:
            plan.writers.append(linears[src])
        elif src not in seen:
            return f"residual add '{node}' adds '{graph.op(src)}' ({src}), not a linear"
    return None


def _norm(graph, v: str, node: str, width: int, linears: dict) -> Norm | str:
    if graph.op(node) in NORM_OPS:
        return _norm_op(graph, v, node, width, linears)
    return _rms_norm(graph, v, linears)


def _reader(graph, plan: StreamPlan, v: str, c: str, norms: dict, linears: dict) -> bool:
    """Classify ``c`` reading stream value ``v``: True if ``c`` carries the stream on."""
    op = graph.op(c)
    if op in VIEW_LIKE or op == "add":
        return True
    if v in norms and op in ("pow", "mul") and graph.op(norms[v].output) not in NORM_OPS:
        return False                 # part of the decomposed RMS norm already matched on v
    if v in norms or (op not in NORM_OPS and op not in ("pow", "mul")):
        plan.problem = f"stream value '{v}' is read by '{op}' ({c}), not by one norm"
        return False
    found = _norm(graph, v, c, plan.width, linears)
    if isinstance(found, str):
        plan.problem = f"stream value '{v}': {found}"
    else:
        norms[v] = found
    return False


def _walk(graph, plan: StreamPlan, linears: dict) -> dict[str, Norm]:
    """Follow the stream from the embeddings in node order, filling ``plan``.

    Returns the norms by the stream value they read.
    """
    order = {n: i for i, n in enumerate(graph.nodes())}
    heap = [(order[e], e) for e in plan.embeddings]
    seen, norms = set(plan.embeddings), {}
    while heap and plan.problem is None:
        v = heapq.heappop(heap)[1]
        if graph.op(v) == "add":
            plan.problem = _add(graph, plan, v, seen, linears)
        for c in graph.consumers(v):
            if plan.problem is None and _reader(graph, plan, v, c, norms, linears) \
                    and c not in seen:
                seen.add(c)
                heapq.heappush(heap, (order[c], c))
    return norms


def find_stream(graph) -> StreamPlan:
    """Follow the residual stream from the embeddings (see module doc)."""
    plan = StreamPlan()
    plan.embeddings = [n for n in graph.nodes() if _embedding(graph, n)]
    if not plan.embeddings:
        plan.problem = "no embedding lookup with a constant table starts a residual stream"
        return plan
    widths = {int(graph.attr(graph.node(graph.inputs(e)[0]).target).shape[1])
              for e in plan.embeddings}
    if len(widths) != 1:
        plan.problem = f"embedding tables of different widths {sorted(widths)}"
        return plan
    plan.width = widths.pop()
    norms = _walk(graph, plan, {s.node: s for s in graph.linears()})
    plan.norms = list(norms.values())
    if plan.problem is None and not plan.norms:
        plan.problem = "no norm reads the stream"
    elif plan.problem is None and plan.kind is None:
        plan.problem = "the stream is read by both RMS norms and LayerNorms"
    return plan
