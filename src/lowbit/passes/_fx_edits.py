"""FX graph edits the ``rotate`` pass needs beyond the Graph protocol (FX form only).

Each edit records the creating pass in ``node.meta["lowbit_created_by"]``, re-indexes the
graph and marks it dirty (the module's code is regenerated before the next run).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lowbit.compiler.graph import LinearSite

__all__ = ["replace_layer_norm", "set_linear_bias"]

_aten = torch.ops.aten


def _done(graph, created: list[fx.Node], created_by: str) -> None:
    for n in created:
        n.meta["lowbit_created_by"] = created_by
    graph._index()
    graph._dirty = True


def _new_buffer(graph, key: str, value: torch.Tensor) -> str:
    """Store ``value`` as a new buffer of the module; returns its ``get_attr`` target."""
    name, i = key, 0
    while hasattr(graph.gm, name):
        i += 1
        name = f"{key}_{i}"
    graph.gm.register_buffer(name, value.detach().contiguous())
    return name


def _drop_constant(graph, node: fx.Node) -> None:
    """Erase an unread ``get_attr`` node, and its tensor once no node names it."""
    if node.users:
        return
    target = node.target
    graph.gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == target for n in graph.gm.graph.nodes):
        path, _, leaf = target.rpartition(".")
        delattr(graph.gm.get_submodule(path) if path else graph.gm, leaf)


def set_linear_bias(graph, site: LinearSite, bias: torch.Tensor, created_by: str) -> None:
    """Give ``site`` the bias ``bias`` (``[out_features]``), adding one if it has none.

    ``aten.linear`` gets a third argument; a bias-free ``mm(x, W^T)`` becomes
    ``addmm(b, x, W^T)`` in place, so the node keeps its name.
    """
    if site.bias is not None:
        graph._set_attr(site.bias, bias.to(graph.attr(site.bias).dtype))
        graph._dirty = True
        return
    n = graph.node(site.node)
    with graph.gm.graph.inserting_before(n):
        b = graph.gm.graph.get_attr(_new_buffer(graph, f"{site.node}_bias", bias))
    if n.target is _aten.linear.default:
        n.args, n.kwargs = (n.args[0], n.args[1], b), {}
    elif n.target is _aten.mm.default:
        n.target, n.args = _aten.addmm.default, (b, *n.args)
    else:
        raise ValueError(f"rotate: linear node '{site.node}' ({n.target}) cannot take a new "
                         "bias; fix: capture the model so its linears are aten.linear/mm")
    _done(graph, [b], created_by)


def _rms(g: fx.Graph, x: fx.Node, eps: float, dtype) -> list[fx.Node]:
    """Nodes computing ``x * rsqrt(mean(x^2, -1) + eps)`` in float32 (as LayerNorm does
    internally: ``x^2`` overflows float16), cast back to ``dtype``; the last one is the output."""
    cast = dtype not in (None, torch.float32, torch.float64)
    xf = g.call_function(_aten._to_copy.default, (x,), {"dtype": torch.float32}) if cast else x
    sq = g.call_function(_aten.pow.Tensor_Scalar, (xf, 2))
    ms = g.call_function(_aten.mean.dim, (sq, [-1], True))
    ad = g.call_function(_aten.add.Tensor, (ms, eps))
    rs = g.call_function(_aten.rsqrt.default, (ad,))
    y = g.call_function(_aten.mul.Tensor, (xf, rs))
    back = [g.call_function(_aten._to_copy.default, (y,), {"dtype": dtype})] if cast else []
    return ([xf] if cast else []) + [sq, ms, ad, rs, y] + back


def replace_layer_norm(graph, output: str, eps: float, created_by: str) -> str:
    """Replace the LayerNorm producing ``output`` by ``x * rsqrt(mean(x^2, -1) + eps)``.

    Exact only where ``x`` has zero mean over the last dimension (then ``var(x) =
    mean(x^2)``) and the norm's affine weight and bias were folded into its readers. The
    replacement is the RMS-norm pattern torch.export produces for Llama, so structural
    matchers find it again. Returns the name of the new output node.
    """
    out = graph.node(output)
    ln = out.args[0] if out.target is operator.getitem else out
    x, g = ln.args[0], graph.gm.graph
    val = out.meta.get("val")
    with g.inserting_before(ln):
        created = _rms(g, x, eps, getattr(val, "dtype", None))
    if val is not None:
        created[-1].meta["val"] = val
    out.replace_all_uses_with(created[-1])
    constants = [a for a in ln.all_input_nodes if a.op == "get_attr"]
    for item in list(ln.users):           # native_layer_norm's (out, mean, rstd) getitems
        g.erase_node(item)
    g.erase_node(ln)
    for c in constants:
        _drop_constant(graph, c)
    _done(graph, created, created_by)
    return created[-1].name
