"""Rewrite an exported decoder graph into ONNX Runtime's fused CPU operators.

``torch.onnx.export`` decomposes a Hugging Face decoder into ~2,600 small nodes (RMS norms as
``Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul``, rotary embeddings as ``Slice/Neg/Concat``, the
grouped-query attention as transposes, ``Expand`` copies of the whole KV cache, a mask and two
``MatMul``s). At one token per step each node costs a few microseconds of dispatch, which is
more than the int4 matmuls themselves. This module finds those regions by structure and
replaces them:

* RMS norm -> ``SimplifiedLayerNormalization``; a norm of a residual ``Add`` ->
  ``com.microsoft.SkipSimplifiedLayerNormalization``, whose fourth output is the sum the next
  residual reads (ONNX Runtime 1.32 does not make this fusion itself on these graphs; one
  node instead of two per norm, ~2 % of a SmolLM2 decode step);
* rotary embedding + causal attention over the cache -> ``com.microsoft.GroupQueryAttention``
  (``do_rotary=1`` with cos/sin tables of ``max_seq`` positions; past/present cache tensors
  keep their names, and one input is added, ``cache_length``: the valid positions of the
  past, so that the cache can live in fixed-capacity buffers extended in place, see
  :class:`lowbit.backends.onnxruntime.StaticCacheDecoder`);
* q/k/v ``MatMulNBits`` reading one input -> one ``MatMulNBits`` whose packed output feeds the
  attention (packed QKV); other sibling ``MatMulNBits`` (gate/up) -> one node and a ``Split``.

Every fusion checks the structure it replaces and is skipped with a recorded reason when
something differs (rope scaling, partial rotary, a bias, another mask); the caller verifies
the fused graph numerically against the unfused one before using it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.backends._ort_attention import fuse_attention
from lowbit.backends._ort_match import (MSFT, FusionReport, const, initializer, ints, prod,
                                        replace_value, scalar, split_const)

__all__ = ["FusionReport", "fuse_decoder"]


# ----------------------------------------------------------------------------- RMS norm

@dataclass(frozen=True)
class _RmsPlan:
    x: ir.Value
    out: ir.Value              # the value the fused node replaces
    weight: ir.Value | None
    eps: float
    nodes: tuple[ir.Node, ...]


def _match_rms(mul: ir.Node) -> _RmsPlan | None:
    """``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1]) + eps))`` [``* w``]."""
    for i in (0, 1):
        rec = prod(mul.inputs[i], "Reciprocal")
        x = mul.inputs[1 - i]
        if rec is None:
            continue
        sq = prod(rec.inputs[0], "Sqrt")
        add = sq and prod(sq.inputs[0], "Add")
        split = add and split_const(add)
        mean = split and prod(split[0], "ReduceMean")
        if not mean or ints(mean, "keepdims", 1) != 1:
            continue
        axes = const(mean.inputs[1]) if len(mean.inputs) > 1 else np.array(ints(mean, "axes", []))
        pw = prod(mean.inputs[0], "Pow")
        if (axes is None or axes.tolist() not in ([-1], [len(x.shape) - 1] if x.shape else [-1])
                or pw is None or pw.inputs[0] is not x or scalar(pw.inputs[1]) != 2.0):
            continue
        nodes = (pw, mean, add, sq, rec, mul)
        out, weight = mul.outputs[0], None
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Mul" and not out.is_graph_output():
            wmul = uses[0].node
            w = wmul.inputs[1 - uses[0].idx]
            wc = const(w)
            if wc is not None and wc.ndim == 1:
                out, weight, nodes = wmul.outputs[0], w, nodes + (wmul,)
        inner = [n.outputs[0] for n in nodes[:-1]]
        if any(len(list(v.uses())) != 1 or v.is_graph_output() for v in inner):
            continue
        return _RmsPlan(x, out, weight, split[1], nodes)
    return None


def _fuse_rms(graph: ir.Graph, report: FusionReport) -> None:
    plans = [p for n in list(graph) if n.op_type == "Mul" and (p := _match_rms(n))]
    for p in plans:
        width = p.x.shape[-1] if p.x.shape is not None else None
        w = p.weight
        if w is None:
            if not isinstance(width, int):
                report.skipped.append(f"rms norm at {p.out.name}: unknown width")
                continue
            w = initializer(graph, f"{p.out.name}_ones", np.ones(width, np.float32))
        node = ir.node("SimplifiedLayerNormalization", [p.x, w],
                       attributes={"axis": -1, "epsilon": p.eps, "stash_type": 1},
                       name=f"{p.out.name}_rms")
        graph.insert_before(p.nodes[0], node)
        replace_value(graph, p.out, node.outputs[0])
        report.add("rms_norm")


def _fuse_skip_norms(graph: ir.Graph, report: FusionReport) -> None:
    """``SimplifiedLayerNormalization(Add(a, b))`` -> ``SkipSimplifiedLayerNormalization``
    (outputs: the norm, two unused statistics, and ``a + b`` for the other readers of the sum)."""
    for norm in [n for n in graph if n.op_type == "SimplifiedLayerNormalization"
                 and n.domain in ("", "ai.onnx")]:
        add = prod(norm.inputs[0], "Add")
        if add is None or len(add.inputs) != 2:
            continue
        a, b = add.inputs
        shapes = [v.shape for v in (a, b)]
        if any(s is None or len(s) != 3 for s in shapes) or list(shapes[0]) != list(shapes[1]) \
                or ints(norm, "axis", -1) not in (-1, 2) or const(a) is not None \
                or const(b) is not None:
            where = f"residual norm at {norm.outputs[0].name}"
            report.skipped.append(f"{where}: the Add's operands are not two [B, S, H] "
                                  "tensors of one shape")
            continue
        node = ir.node("SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]],
                       attributes={"epsilon": norm.attributes["epsilon"].value},
                       domain=MSFT, num_outputs=4, name=f"{norm.name}_skip")
        graph.insert_after(add, node)
        node.outputs[3].shape, node.outputs[3].type = add.outputs[0].shape, add.outputs[0].type
        replace_value(graph, norm.outputs[0], node.outputs[0])
        replace_value(graph, add.outputs[0], node.outputs[3])
        report.add("skip_rms_norm")


# ----------------------------------------------------------------------------- MatMulNBits

def _nbits(v: ir.Value) -> ir.Node | None:
    n = v.producer()
    return n if n is not None and n.op_type == "MatMulNBits" and n.domain == MSFT else None


def _merge_key(n: ir.Node):
    attrs = tuple((k, ints(n, k)) for k in ("K", "bits", "block_size", "accuracy_level"))
    consts = [const(v) for v in n.inputs[1:]]
    return (n.inputs[0], attrs, len(n.inputs)) if all(c is not None for c in consts) else None


def _merged(graph: ir.Graph, nodes: list[ir.Node], name: str) -> ir.Node:
    """One ``MatMulNBits`` computing the outputs of ``nodes`` side by side (rows concatenated)."""
    parts = [np.concatenate([const(n.inputs[i]) for n in nodes], axis=0)
             for i in range(1, len(nodes[0].inputs))]
    ins = [initializer(graph, f"{name}_{i}", a) for i, a in enumerate(parts)]
    attrs = {k: ints(nodes[0], k) for k in ("K", "bits", "block_size", "accuracy_level")}
    attrs["N"] = sum(ints(n, "N") for n in nodes)
    node = ir.node("MatMulNBits", [nodes[0].inputs[0], *ins], attributes=attrs, domain=MSFT,
                   name=name)
    graph.insert_before(nodes[0], node)
    return node


def _pack_qkv(graph: ir.Graph, report: FusionReport) -> None:
    """q/k/v ``MatMulNBits`` read only by their attention -> one node, packed QKV input."""
    for gqa in [n for n in graph if n.op_type == "GroupQueryAttention"]:
        nodes = [_nbits(x) if x is not None else None for x in gqa.inputs[:3]]
        if any(n is None for n in nodes) or _merge_key(nodes[0]) is None \
                or len({_merge_key(n) for n in nodes}) != 1 \
                or any(len(list(n.outputs[0].uses())) != 1 for n in nodes):
            continue
        merged = _merged(graph, nodes, f"{gqa.name}_qkv")
        gqa.replace_input_with(0, merged.outputs[0])
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        report.add("packed_qkv")


def _fuse_siblings(graph: ir.Graph, report: FusionReport) -> None:
    """``MatMulNBits`` nodes reading the same input with equal attributes -> one + ``Split``."""
    groups: dict = {}
    for n in graph:
        if n.op_type == "MatMulNBits" and n.domain == MSFT and (key := _merge_key(n)):
            groups.setdefault(key, []).append(n)
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        merged = _merged(graph, nodes, f"{nodes[0].name}_merged")
        sizes = initializer(graph, f"{merged.name}_split",
                             np.array([ints(n, "N") for n in nodes], np.int64))
        split = ir.node("Split", [merged.outputs[0], sizes], attributes={"axis": -1},
                        num_outputs=len(nodes), name=f"{merged.name}_split")
        graph.insert_after(merged, split)
        for n, out in zip(nodes, split.outputs):
            replace_value(graph, n.outputs[0], out)
        report.add("merged_matmul_nbits", len(nodes))


def fuse_decoder(model: ir.Model, max_seq: int) -> FusionReport:
    """Apply the fusions above to ``model`` in place; return what was fused and skipped."""
    import onnx_ir.passes.common as common

    report = FusionReport()
    graph = model.graph
    _fuse_rms(graph, report)
    _fuse_skip_norms(graph, report)
    fuse_attention(graph, max_seq, report)
    common.RemoveUnusedNodesPass()(model)
    _pack_qkv(graph, report)
    common.RemoveUnusedNodesPass()(model)
    _fuse_siblings(graph, report)
    common.RemoveUnusedNodesPass()(model)
    if MSFT not in model.opset_imports:
        model.opset_imports[MSFT] = 1
    return report
