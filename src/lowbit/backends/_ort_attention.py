"""Rotary embedding + causal attention over the KV cache -> ``com.microsoft.GroupQueryAttention``.

Part of the fused ONNX Runtime lowering (:mod:`lowbit.backends._ort_fuse`): the exported
attention (rotary ``Slice/Neg/Concat``, ``Expand`` copies of the grouped KV cache, mask,
softmax, two ``MatMul``s) is found by structure from each ``Softmax`` and replaced by one
``GroupQueryAttention`` with ``do_rotary`` (cos/sin tables of ``max_seq`` positions built from
the graph's ``inv_freq``). Past/present cache tensors keep their names; the number of valid
cache positions becomes an input, ``cache_length``, so that a caller can keep the cache in one
fixed-capacity buffer per tensor that the attention extends in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.backends._ort_match import (MSFT, FusionReport, const, heads_view, initializer,
                                        ints, prod, replace_value, split_const)
from lowbit.backends.onnxruntime import CACHE_LENGTH

__all__ = ["fuse_attention"]


@dataclass(frozen=True)
class _AttnPlan:
    q: ir.Value
    k: ir.Value
    v: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    out: ir.Value              # [B, S, H*D], what the output projection reads
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    inv_freq: np.ndarray


def _rotary(v: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """``t*cos + cat(-t[..., D/2:], t[..., :D/2])*sin`` -> ``(t, cos, sin)`` (cos/sin broadcast)."""
    add = prod(v, "Add")
    if add is None:
        return None
    for a, b in ((0, 1), (1, 0)):
        m1, m2 = prod(add.inputs[a], "Mul"), prod(add.inputs[b], "Mul")
        if not (m1 and m2):
            continue
        for i in (0, 1):
            cat = prod(m2.inputs[i], "Concat")
            if cat is None or len(cat.inputs) != 2:
                continue
            neg, s_lo = prod(cat.inputs[0], "Neg"), prod(cat.inputs[1], "Slice")
            s_hi = neg and prod(neg.inputs[0], "Slice")
            if not (s_hi and s_lo) or s_hi.inputs[0] is not s_lo.inputs[0]:
                continue
            t = s_hi.inputs[0]
            d = t.shape[-1] if t.shape is not None else None
            if not isinstance(d, int) or not (_slice_is(s_hi, d // 2, None, d)
                                              and _slice_is(s_lo, 0, d // 2, d)):
                continue
            for j in (0, 1):
                if m1.inputs[j] is t:
                    return t, m1.inputs[1 - j], m2.inputs[1 - i]
    return None


def _slice_is(node: ir.Node, start: int, end: int | None, dim: int) -> bool:
    ins = [const(v) for v in node.inputs[1:]]
    if any(c is None for c in ins[:2]) or len(ins) < 3 or ins[2] is None:
        return False
    s, e, ax = int(ins[0][0]), int(ins[1][0]), int(ins[2][0])
    step = int(ins[3][0]) if len(ins) > 3 and ins[3] is not None else 1
    e_ok = e >= dim if end is None else e == end
    return ax in (-1, 3) and step == 1 and s == start and e_ok


def _inv_freq(cos: ir.Value, sin: ir.Value) -> np.ndarray | None:
    """``Unsqueeze(Cos(Concat(f, f)))`` with ``f = Mul(positions, inv_freq)`` -> inv_freq."""
    found = []
    for v, op in ((cos, "Cos"), (sin, "Sin")):
        u = prod(v, "Unsqueeze")
        c = prod(u.inputs[0] if u else v, op)
        cat = c and prod(c.inputs[0], "Concat")
        if not cat or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            return None
        mul = prod(cat.inputs[0], "Mul")
        consts = [x for x in (const(i) for i in mul.inputs) if x is not None] if mul else []
        if len(consts) != 1 or consts[0].size < 1:
            return None
        found.append(consts[0].reshape(-1))
    same = len(found) == 2 and np.array_equal(found[0], found[1])
    return found[0].astype(np.float32) if same else None


def _cache_concat(v: ir.Value, kind: str):
    """Walk back from the attention's key/value operand to ``Concat(past, new)`` (an output)."""
    scale = 1.0
    for _ in range(12):
        n = v.producer()
        if n is None:
            return None
        if n.op_type == "Concat" and len(n.inputs) == 2 and n.inputs[0].is_graph_input() \
                and n.outputs[0].is_graph_output():
            return n, scale
        if n.op_type == "Mul":
            s = split_const(n)
            if s is None:
                return None
            v, scale = s[0], scale * s[1]
        elif n.op_type in ("Reshape", "Transpose", "Expand", "Unsqueeze"):
            v = n.inputs[0]
        else:
            return None
    return None


def _match_attention(sm: ir.Node, report: FusionReport) -> _AttnPlan | None:
    where = f"attention at {sm.name}"

    def skip(reason):
        report.skipped.append(f"{where}: {reason}")

    add = prod(sm.inputs[0], "Add")
    qk = None
    if add is not None:
        qk = prod(add.inputs[0], "MatMul") or prod(add.inputs[1], "MatMul")
    if qk is None or ints(sm, "axis", -1) not in (-1, 3):
        return skip("no MatMul + mask before the softmax")
    probs = sm.outputs[0]
    uses = list(probs.uses())
    if len(uses) == 2 and {u.node.op_type for u in uses} == {"IsNaN", "Where"}:
        probs = next(u.node for u in uses if u.node.op_type == "Where").outputs[0]
    pv = [u.node for u in probs.uses() if u.node.op_type == "MatMul" and u.idx == 0]
    if len(pv) != 1:
        return skip("softmax output not read by one MatMul")
    pv = pv[0]
    tr = [u.node for u in pv.outputs[0].uses()]
    if len(tr) != 1 or tr[0].op_type != "Transpose" or list(ints(tr[0], "perm", [])) != [0, 2, 1, 3]:
        return skip("attention output not transposed back to [B, S, H, D]")
    rs = [u.node for u in tr[0].outputs[0].uses()]
    if len(rs) != 1 or rs[0].op_type != "Reshape":
        return skip("attention output not reshaped to [B, S, H*D]")
    out = rs[0].outputs[0]
    # query: scale * rotary(view(q))
    qs, q_scale = qk.inputs[0], 1.0
    m = prod(qs, "Mul")
    if m is not None and (s := split_const(m)):
        qs, q_scale = s
    rq = _rotary(qs)
    kc, vc = _cache_concat(qk.inputs[1], "key"), _cache_concat(pv.inputs[1], "value")
    if rq is None or kc is None or vc is None:
        return skip("query rotary or key/value cache pattern not found")
    (kcat, k_scale), (vcat, _) = kc, vc
    rk = _rotary(kcat.inputs[1])
    if rk is None:
        return skip("key rotary pattern not found")
    q, k, v = heads_view(rq[0]), heads_view(rk[0]), heads_view(vcat.inputs[1])
    inv_freq = _inv_freq(rq[1], rq[2])
    if None in (q, k, v) or inv_freq is None or _inv_freq(rk[1], rk[2]) is None:
        return skip("q/k/v head views or cos/sin of positions x inv_freq not found")
    shape = kcat.inputs[0].shape
    kv_heads, head_dim = (shape[1], shape[3]) if shape is not None and len(shape) == 4 else (0, 0)
    width = q.shape[-1] if q.shape is not None else None
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int) and isinstance(width, int)
            and inv_freq.size * 2 == head_dim and width % head_dim == 0):
        return skip("head counts or a full-width rotary not readable from the shapes")
    if head_dim % 8:
        return skip(f"head size {head_dim} is not a multiple of 8 (GroupQueryAttention's CPU "
                    "kernel needs one)")
    return _AttnPlan(q, k, v, kcat.inputs[0], vcat.inputs[0], kcat.outputs[0], vcat.outputs[0],
                     out, width // head_dim, kv_heads, head_dim, q_scale * k_scale, inv_freq)


def fuse_attention(graph: ir.Graph, max_seq: int, report: FusionReport) -> None:
    plans = [p for n in list(graph) if n.op_type == "Softmax"
             and (p := _match_attention(n, report))]
    if not plans:
        return
    first = next(iter(graph))
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    lengths = _total_and_seqlens(graph, first, ids)
    tables = {}
    for p in plans:
        key = p.inv_freq.tobytes()
        if key not in tables:
            pos = np.arange(max_seq, dtype=np.float32)[:, None] * p.inv_freq[None, :]
            tables[key] = (initializer(graph, f"rotary_cos_{len(tables)}", np.cos(pos)),
                           initializer(graph, f"rotary_sin_{len(tables)}", np.sin(pos)))
        cos, sin = tables[key]
        node = ir.node("GroupQueryAttention",
                       [p.q, p.k, p.v, p.past_key, p.past_value, *lengths, cos, sin],
                       attributes={"num_heads": p.num_heads, "kv_num_heads": p.kv_heads,
                                   "scale": p.scale, "do_rotary": 1, "rotary_interleaved": 0},
                       domain=MSFT, num_outputs=3, name=f"{p.present_key.name}_gqa")
        graph.insert_after(p.out.producer(), node)
        replace_value(graph, p.out, node.outputs[0])
        replace_value(graph, p.present_key, node.outputs[1])
        replace_value(graph, p.present_value, node.outputs[2])
        report.add("group_query_attention")


def _total_and_seqlens(graph, first, ids) -> tuple[ir.Value, ir.Value]:
    """``seqlens_k = past + seq - 1`` per batch row and ``total = past + seq`` (int32), where
    ``past`` is the new graph input :data:`CACHE_LENGTH` (int64 ``[1]``): the number of
    valid positions at the start of the cache tensors.

    The length comes from an input rather than the cache's shape so that the cache can be a
    fixed-capacity buffer that ``GroupQueryAttention`` extends in place (present bound to the
    past's memory through I/O binding); with exactly-sized past tensors it equals their length.
    """
    length = ir.Value(name=CACHE_LENGTH, shape=ir.Shape([1]),
                      type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(length)
    nodes = [ir.node("Shape", [ids], attributes={"start": 1, "end": 2}),
             ir.node("Shape", [ids], attributes={"start": 0, "end": 1})]
    total = ir.node("Add", [length, nodes[0].outputs[0]])
    total32 = ir.node("Cast", [total.outputs[0]], attributes={"to": ir.DataType.INT32})
    one = initializer(graph, "gqa_one", np.array([1], np.int32))
    last = ir.node("Sub", [total32.outputs[0], one])
    seqlens = ir.node("Expand", [last.outputs[0], nodes[1].outputs[0]])
    scalar = ir.node("Squeeze", [total32.outputs[0]])
    new = [*nodes, total, total32, last, seqlens, scalar]
    for i, n in enumerate(new):
        n.name = f"gqa_lengths_{i}"
    graph.insert_before(first, new)
    return seqlens.outputs[0], scalar.outputs[0]
