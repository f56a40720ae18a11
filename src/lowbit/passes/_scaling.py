"""Per-channel scale folding, found by graph structure (shared by ``awq`` and smoothing).

A *scale group* is a value ``X [..., K]`` read only by linears (directly or through view-like
ops) and produced by something that can absorb a per-channel division exactly:

* a norm's affine weight (``mul(x_hat, gamma)`` with ``gamma`` a 1-D constant, or
  ``layer_norm(x, shape, gamma, beta)``): ``gamma /= s`` (and ``beta /= s``);
* a linear whose output reaches ``X`` only through ``relu`` (positively homogeneous) or one
  side of an elementwise ``mul`` (the gated MLP's ``act(gate) * up``): its rows ``/= s``.

Then ``X' = X / s`` and every consumer ``W[:, j] *= s``, so the function is unchanged.
Anything else is skipped with the reason (e.g. a value also read by a residual ``add``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.compiler.graph import LinearSite
from lowbit.passes.patterns import VIEW_LIKE, select_linears

__all__ = ["ScaleGroup", "Producer", "find_scale_groups", "apply_scale"]


@dataclass(frozen=True)
class Producer:
    """What absorbs ``1/s``: a norm's ``weight``/``bias`` constants or a linear's rows."""
    kind: str                        # "norm" | "linear"
    node: str                        # the producing node
    weight: str | None = None        # norm: constant target of gamma
    bias: str | None = None          # norm: constant target of beta
    linear: LinearSite | None = None


@dataclass(frozen=True)
class ScaleGroup:
    value: str                       # the node producing X
    producer: Producer
    consumers: tuple[LinearSite, ...]

    @property
    def channels(self) -> int:
        return self.consumers[0].in_features


def _source(graph, node: str) -> str:
    """Walk up view-like single-input ops to the value they relabel."""
    while graph.op(node) in VIEW_LIKE and graph.inputs(node):   # first input: the tensor
        node = graph.inputs(node)[0]
    return node


def _leaf_readers(graph, node: str) -> list[str]:
    """Readers of ``node`` seen through view-like ops."""
    out = []
    for c in graph.consumers(node):
        out.extend(_leaf_readers(graph, c) if graph.op(c) in VIEW_LIKE else [c])
    return out


def _constant_1d(graph, node: str, k: int) -> bool:
    if graph.op(node) != "constant" or len(graph.consumers(node)) != 1:
        return False
    t = graph.attr(graph.node(node).target)
    return isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == k


def _producer(graph, value: str, k: int, linears: dict) -> Producer | str:
    """How ``value`` can absorb a per-channel division, or why it cannot."""
    op, ins = graph.op(value), graph.inputs(value)
    if op in ("layer_norm", "native_layer_norm") or (op == "getitem" and ins
                                                      and graph.op(ins[0]) == "native_layer_norm"):
        ln = ins[0] if op == "getitem" else value
        args = graph.norm_args(ln)
        w, b = args["weight"], args["bias"]
        if w is None or not _constant_1d(graph, w, k):
            return "layer norm without its own affine weight"
        ok_b = b is None or _constant_1d(graph, b, k)
        target = graph.node(b).target if b is not None and ok_b else None
        return Producer("norm", ln, graph.node(w).target, target) \
            if ok_b else "layer norm bias shared or not constant"
    if op == "mul" and len(ins) == 2:
        consts = [i for i in ins if _constant_1d(graph, i, k)]
        if consts:
            return Producer("norm", value, graph.node(consts[0]).target)
        for side in ins:
            site = linears.get(_source(graph, side))
            if site is not None and len(_leaf_readers(graph, site.node)) == 1:
                return Producer("linear", value, linear=site)
        return "elementwise product with no linear or constant factor to absorb the scale"
    if op == "relu" and ins:
        site = linears.get(_source(graph, ins[0]))
        if site is not None and len(_leaf_readers(graph, site.node)) == 1:
            return Producer("linear", value, linear=site)
    if value in linears and len(_leaf_readers(graph, value)) == len(graph.consumers(value)):
        return Producer("linear", value, linear=linears[value])
    return f"produced by '{op}', which cannot absorb a per-channel scale exactly"


def find_scale_groups(graph, sites: list[LinearSite]
                      ) -> tuple[list[ScaleGroup], list[tuple[str, str]]]:
    """Scale groups over ``sites`` plus ``(layer, reason)`` for linears left out."""
    linears = {s.node: s for s in graph.linears()}
    by_value: dict[str, list[LinearSite]] = {}
    for s in sites:
        by_value.setdefault(_source(graph, s.input), []).append(s)
    groups, skipped = [], []
    for value, members in by_value.items():
        names = ", ".join(m.name for m in members)
        readers = _leaf_readers(graph, value)
        others = [r for r in readers if r not in linears or _source(graph, linears[r].input) != value]
        chosen = {m.node for m in members}
        if others or set(readers) != chosen:
            what = sorted({graph.op(r) for r in others} or {"a layer left out"})
            skipped.append((names, f"input also read by {what}: a per-channel scale would "
                                   "change that reader"))
            continue
        prod = _producer(graph, value, members[0].in_features, linears)
        if isinstance(prod, str):
            skipped.append((names, prod))
        else:
            groups.append(ScaleGroup(value, prod, tuple(members)))
    return groups, skipped


def scale_groups_in_order(graph, options, calibration):
    """What ``smooth`` and ``awq`` both start from: the selected linears' scale groups in
    graph order, the skipped and unscalable sites, and a staged calibration run over the first
    ``options.max_batches`` batches to advance from group to group.

    Returns ``(groups, skipped, unscalable, run)``."""
    sites, skipped = select_linears(graph, options.include_head, options.exclude)
    groups, unscalable = find_scale_groups(graph, sites)
    order = {n: i for i, n in enumerate(graph.nodes())}
    groups.sort(key=lambda g: order[g.value])
    return groups, skipped, unscalable, graph.staged(calibration[: options.max_batches])


def _scaled(t: torch.Tensor, s: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[dim] = -1
    f = s.to(torch.float64).reshape(shape)
    out = t.to(torch.float64) / f if inverse else t.to(torch.float64) * f
    return out.to(t.dtype)


def apply_scale(graph, group: ScaleGroup, s: torch.Tensor) -> None:
    """``X /= s`` at the producer and ``W[:, j] *= s`` in every consumer (float64 math)."""
    p = group.producer
    if p.kind == "norm":
        for target in filter(None, (p.weight, p.bias)):
            graph.set_attr(target, _scaled(graph.attr(target), s, 0, inverse=True))
    else:
        site = p.linear
        graph.set_linear_weight(site, _scaled(graph.linear_weight(site), s, 0, inverse=True))
        if site.bias is not None:
            graph.set_attr(site.bias, _scaled(graph.attr(site.bias), s, 0, inverse=True))
    for c in group.consumers:
        graph.set_linear_weight(c, _scaled(graph.linear_weight(c), s, 1, inverse=False))
    graph._dirty = True
