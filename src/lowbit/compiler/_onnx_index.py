"""Indexing an onnx-ir graph into the nodes of the Graph protocol (see :mod:`.onnx_graph`).

Which ONNX nodes make one protocol node (a linear with its folded weight ``Transpose`` and
bias ``Add``; a group lowbit inserted), and the canonical op names passes match.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["Linear", "Entry", "node_entries", "canonical", "match_linear", "const_array",
           "attr", "CANONICAL", "FLOATS"]

#: ONNX op -> the canonical op name passes match (the FX spelling of the same operation).
CANONICAL = {"Identity": "alias", "Cast": "_to_copy", "LayerNormalization": "layer_norm",
             "RMSNormalization": "rms_norm", "SimplifiedLayerNormalization": "rms_norm",
             "ReduceMean": "mean", "Softmax": "softmax", "Dropout": "dropout"}
FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class Linear:
    main: ir.Node                 # MatMul or Gemm
    x: ir.Value
    weight: ir.Value              # initializer
    layout: str                   # "kn": stored [in, out]; "nk": stored [out, in]
    transpose: ir.Node | None = None
    add: ir.Node | None = None    # bias Add folded into the linear
    bias: ir.Value | None = None


@dataclass
class Entry:
    name: str
    kind: str                     # input | constant | node | getitem | output
    value: ir.Value | None = None
    parts: tuple[ir.Node, ...] = ()
    op: str = ""
    linear: Linear | None = None
    parent: str | None = None     # getitem: the multi-output node


def const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None or not v.is_initializer() or v.const_value is None:
        return None
    return v.const_value.numpy()


def attr(node: ir.Node, key: str, default=None):
    a = node.attributes.get(key)
    return default if a is None else a.value


def node_entries(order: list[ir.Node], pos: dict) -> list[Entry]:
    """Protocol nodes over the ONNX nodes ``order``: lowbit groups, linears, the rest."""
    out, taken, groups = [], set(), {}
    for n in order:
        group = n.metadata_props.get("lowbit.group")
        if group:
            groups.setdefault(group, []).append(n)
    for group, nodes in groups.items():
        last = next(n for n in nodes if n.name == group)
        nodes.sort(key=pos.__getitem__)
        out.append(Entry(group, "node", last.outputs[0], tuple(nodes),
                          last.metadata_props.get("lowbit.op", "lowbit")))
        taken.update(nodes)
    for n in order:
        if n in taken:
            continue
        lin = match_linear(n, taken)
        if lin is not None:
            parts = tuple(p for p in (lin.transpose, n, lin.add) if p is not None)
            taken.update(parts)
            out.append(Entry(n.name, "node", parts[-1].outputs[0], parts, "linear", lin))
    for n in order:
        if n not in taken:
            out.append(Entry(n.name, "node", n.outputs[0] if n.outputs else None, (n,),
                              canonical(n)))
    return out

def canonical(n: ir.Node) -> str:
    """The op name passes match for ``n``."""
    t = n.op_type
    if t == "Reciprocal" and n.inputs[0] is not None and n.inputs[0].producer() is not None \
            and n.inputs[0].producer().op_type == "Sqrt":
        return "rsqrt"
    if t == "Gather" and attr(n, "axis", 0) == 0:
        table = const_array(n.inputs[0])
        if table is not None and table.ndim == 2 and n.inputs[0].dtype in FLOATS:
            return "embedding"
    return CANONICAL.get(t, t.lower())

def match_linear(n: ir.Node, taken: set) -> Linear | None:
    """``n`` as a constant-weight linear (module doc of onnx_graph), or None."""
    if n.domain not in ("", "ai.onnx") or n.op_type not in ("MatMul", "Gemm"):
        return None
    if len(n.inputs) < 2 or n.inputs[0] is None or const_array(n.inputs[0]) is not None:
        return None
    x, w = n.inputs[0], n.inputs[1]
    transpose, layout = None, "kn"
    if n.op_type == "Gemm":
        if attr(n, "transA", 0) or attr(n, "alpha", 1.0) != 1.0 \
                or attr(n, "beta", 1.0) != 1.0:
            return None
        layout = "nk" if attr(n, "transB", 0) else "kn"
    elif const_array(w) is None:
        t = w.producer() if w is not None else None
        if t is None or t.op_type != "Transpose" or t in taken or len(w.uses()) != 1 \
                or tuple(attr(t, "perm", (1, 0))) != (1, 0) or w.is_graph_output():
            return None
        transpose, w, layout = t, t.inputs[0], "nk"
    wt = const_array(w)
    if wt is None or wt.ndim != 2 or w.dtype not in FLOATS:
        return None
    n_out = wt.shape[1] if layout == "kn" else wt.shape[0]
    if n.op_type == "Gemm":
        c = n.inputs[2] if len(n.inputs) > 2 else None
        ct = const_array(c)
        if c is not None and (ct is None or ct.ndim != 1 or ct.shape[0] != n_out):
            return None
        return Linear(n, x, w, layout, bias=c)
    add, bias = _bias_add(n.outputs[0], n_out, taken)
    return Linear(n, x, w, layout, transpose, add, bias)

def _bias_add(y: ir.Value, n_out: int, taken: set):
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None, None
    add, idx = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add in taken:
        return None, None
    b = add.inputs[1 - idx]
    bt = const_array(b)
    if bt is None or bt.ndim != 1 or bt.shape[0] != n_out:
        return None, None
    return add, b
