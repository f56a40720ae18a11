"""Rewrite an exported decoder graph into ONNX Runtime's fused CPU operators.

``torch.onnx.export`` decomposes a Hugging Face decoder into ~2,600 small nodes (RMS norms as
``Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul``, rotary embeddings as ``Slice/Neg/Concat``, the
grouped-query attention as transposes, ``Expand`` copies of the whole KV cache, a mask and two
``MatMul``s). At one token per step each node costs a few microseconds of dispatch, which is
more than the int4 matmuls themselves. This module finds those regions by structure and
replaces them:

* RMS norm -> ``SimplifiedLayerNormalization`` (ONNX Runtime then fuses the residual ``Add``
  into ``SkipSimplifiedLayerNormalization`` on its own);
* rotary embedding + causal attention over the cache -> ``com.microsoft.GroupQueryAttention``
  (``do_rotary=1`` with cos/sin tables of ``max_seq`` positions, past/present cache tensors
  unchanged: the artifact's inputs and outputs keep their names, shapes and meaning);
* q/k/v ``MatMulNBits`` reading one input -> one ``MatMulNBits`` whose packed output feeds the
  attention (packed QKV); other sibling ``MatMulNBits`` (gate/up) -> one node and a ``Split``.

Every fusion checks the structure it replaces and is skipped with a recorded reason when
something differs (rope scaling, partial rotary, a bias, another mask); the caller verifies
the fused graph numerically against the unfused one before using it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = ["FusionReport", "fuse_decoder"]

_MSFT = "com.microsoft"


@dataclass
class FusionReport:
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


# ----------------------------------------------------------------------------- helpers

def _prod(v: ir.Value | None, op: str | tuple[str, ...]) -> ir.Node | None:
    """The producer of ``v`` if it is an ``op`` node in the default domain."""
    if v is None:
        return None
    n = v.producer()
    ops = (op,) if isinstance(op, str) else op
    return n if n is not None and n.op_type in ops and n.domain in ("", "ai.onnx") else None


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _scalar(v: ir.Value | None) -> float | None:
    c = _const(v)
    return float(c.reshape(())) if c is not None and c.size == 1 else None


def _ints(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _split_const(node: ir.Node) -> tuple[ir.Value, float] | None:
    """``Mul(x, c)`` with a scalar constant ``c`` (either order) -> ``(x, c)``."""
    for i in (0, 1):
        c = _scalar(node.inputs[1 - i])
        if c is not None:
            return node.inputs[i], c
    return None


def _heads_view(v: ir.Value) -> ir.Value | None:
    """``Transpose[0,2,1,3](Reshape(x))`` -> ``x`` (``[B,S,H*D]`` viewed as ``[B,H,S,D]``)."""
    t = _prod(v, "Transpose")
    if t is None or list(_ints(t, "perm", [])) != [0, 2, 1, 3]:
        return None
    r = _prod(t.inputs[0], "Reshape")
    return None if r is None else r.inputs[0]


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
        rec = _prod(mul.inputs[i], "Reciprocal")
        x = mul.inputs[1 - i]
        if rec is None:
            continue
        sq = _prod(rec.inputs[0], "Sqrt")
        add = sq and _prod(sq.inputs[0], "Add")
        split = add and _split_const(add)
        mean = split and _prod(split[0], "ReduceMean")
        if not mean or _ints(mean, "keepdims", 1) != 1:
            continue
        axes = _const(mean.inputs[1]) if len(mean.inputs) > 1 else np.array(_ints(mean, "axes", []))
        pw = _prod(mean.inputs[0], "Pow")
        if (axes is None or axes.tolist() not in ([-1], [len(x.shape) - 1] if x.shape else [-1])
                or pw is None or pw.inputs[0] is not x or _scalar(pw.inputs[1]) != 2.0):
            continue
        nodes = (pw, mean, add, sq, rec, mul)
        out, weight = mul.outputs[0], None
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Mul" and not out.is_graph_output():
            wmul = uses[0].node
            w = wmul.inputs[1 - uses[0].idx]
            wc = _const(w)
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
            w = _initializer(graph, f"{p.out.name}_ones", np.ones(width, np.float32))
        node = ir.node("SimplifiedLayerNormalization", [p.x, w],
                       attributes={"axis": -1, "epsilon": p.eps, "stash_type": 1},
                       name=f"{p.out.name}_rms")
        graph.insert_before(p.nodes[0], node)
        _replace(graph, p.out, node.outputs[0])
        report.add("rms_norm")


# ----------------------------------------------------------------------------- attention

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
    add = _prod(v, "Add")
    if add is None:
        return None
    for a, b in ((0, 1), (1, 0)):
        m1, m2 = _prod(add.inputs[a], "Mul"), _prod(add.inputs[b], "Mul")
        if not (m1 and m2):
            continue
        for i in (0, 1):
            cat = _prod(m2.inputs[i], "Concat")
            if cat is None or len(cat.inputs) != 2:
                continue
            neg, s_lo = _prod(cat.inputs[0], "Neg"), _prod(cat.inputs[1], "Slice")
            s_hi = neg and _prod(neg.inputs[0], "Slice")
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
    ins = [_const(v) for v in node.inputs[1:]]
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
        u = _prod(v, "Unsqueeze")
        c = _prod(u.inputs[0] if u else v, op)
        cat = c and _prod(c.inputs[0], "Concat")
        if not cat or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            return None
        mul = _prod(cat.inputs[0], "Mul")
        consts = [x for x in (_const(i) for i in mul.inputs) if x is not None] if mul else []
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
            s = _split_const(n)
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

    add = _prod(sm.inputs[0], "Add")
    qk = None
    if add is not None:
        qk = _prod(add.inputs[0], "MatMul") or _prod(add.inputs[1], "MatMul")
    if qk is None or _ints(sm, "axis", -1) not in (-1, 3):
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
    if len(tr) != 1 or tr[0].op_type != "Transpose" or list(_ints(tr[0], "perm", [])) != [0, 2, 1, 3]:
        return skip("attention output not transposed back to [B, S, H, D]")
    rs = [u.node for u in tr[0].outputs[0].uses()]
    if len(rs) != 1 or rs[0].op_type != "Reshape":
        return skip("attention output not reshaped to [B, S, H*D]")
    out = rs[0].outputs[0]
    # query: scale * rotary(view(q))
    qs, q_scale = qk.inputs[0], 1.0
    m = _prod(qs, "Mul")
    if m is not None and (s := _split_const(m)):
        qs, q_scale = s
    rq = _rotary(qs)
    kc, vc = _cache_concat(qk.inputs[1], "key"), _cache_concat(pv.inputs[1], "value")
    if rq is None or kc is None or vc is None:
        return skip("query rotary or key/value cache pattern not found")
    (kcat, k_scale), (vcat, _) = kc, vc
    rk = _rotary(kcat.inputs[1])
    if rk is None:
        return skip("key rotary pattern not found")
    q, k, v = _heads_view(rq[0]), _heads_view(rk[0]), _heads_view(vcat.inputs[1])
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


def _fuse_attention(graph: ir.Graph, max_seq: int, report: FusionReport) -> None:
    plans = [p for n in list(graph) if n.op_type == "Softmax"
             and (p := _match_attention(n, report))]
    if not plans:
        return
    first = next(iter(graph))
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    lengths = _total_and_seqlens(graph, first, ids, plans[0].past_key)
    tables = {}
    for p in plans:
        key = p.inv_freq.tobytes()
        if key not in tables:
            pos = np.arange(max_seq, dtype=np.float32)[:, None] * p.inv_freq[None, :]
            tables[key] = (_initializer(graph, f"rotary_cos_{len(tables)}", np.cos(pos)),
                           _initializer(graph, f"rotary_sin_{len(tables)}", np.sin(pos)))
        cos, sin = tables[key]
        node = ir.node("GroupQueryAttention",
                       [p.q, p.k, p.v, p.past_key, p.past_value, *lengths, cos, sin],
                       attributes={"num_heads": p.num_heads, "kv_num_heads": p.kv_heads,
                                   "scale": p.scale, "do_rotary": 1, "rotary_interleaved": 0},
                       domain=_MSFT, num_outputs=3, name=f"{p.present_key.name}_gqa")
        graph.insert_after(p.out.producer(), node)
        _replace(graph, p.out, node.outputs[0])
        _replace(graph, p.present_key, node.outputs[1])
        _replace(graph, p.present_value, node.outputs[2])
        report.add("group_query_attention")


def _total_and_seqlens(graph, first, ids, past_key) -> tuple[ir.Value, ir.Value]:
    """``seqlens_k = past + seq - 1`` per batch row and ``total = past + seq`` (int32)."""
    nodes = [ir.node("Shape", [past_key], attributes={"start": 2, "end": 3}),
             ir.node("Shape", [ids], attributes={"start": 1, "end": 2}),
             ir.node("Shape", [ids], attributes={"start": 0, "end": 1})]
    total = ir.node("Add", [nodes[0].outputs[0], nodes[1].outputs[0]])
    total32 = ir.node("Cast", [total.outputs[0]], attributes={"to": ir.DataType.INT32})
    one = _initializer(graph, "gqa_one", np.array([1], np.int32))
    last = ir.node("Sub", [total32.outputs[0], one])
    seqlens = ir.node("Expand", [last.outputs[0], nodes[2].outputs[0]])
    scalar = ir.node("Squeeze", [total32.outputs[0]])
    new = [*nodes, total, total32, last, seqlens, scalar]
    for i, n in enumerate(new):
        n.name = f"gqa_lengths_{i}"
    graph.insert_before(first, new)
    return seqlens.outputs[0], scalar.outputs[0]


# ----------------------------------------------------------------------------- MatMulNBits

def _nbits(v: ir.Value) -> ir.Node | None:
    n = v.producer()
    return n if n is not None and n.op_type == "MatMulNBits" and n.domain == _MSFT else None


def _merge_key(n: ir.Node):
    attrs = tuple((k, _ints(n, k)) for k in ("K", "bits", "block_size", "accuracy_level"))
    consts = [_const(v) for v in n.inputs[1:]]
    return (n.inputs[0], attrs, len(n.inputs)) if all(c is not None for c in consts) else None


def _merged(graph: ir.Graph, nodes: list[ir.Node], name: str) -> ir.Node:
    """One ``MatMulNBits`` computing the outputs of ``nodes`` side by side (rows concatenated)."""
    parts = [np.concatenate([_const(n.inputs[i]) for n in nodes], axis=0)
             for i in range(1, len(nodes[0].inputs))]
    ins = [_initializer(graph, f"{name}_{i}", a) for i, a in enumerate(parts)]
    attrs = {k: _ints(nodes[0], k) for k in ("K", "bits", "block_size", "accuracy_level")}
    attrs["N"] = sum(_ints(n, "N") for n in nodes)
    node = ir.node("MatMulNBits", [nodes[0].inputs[0], *ins], attributes=attrs, domain=_MSFT,
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
        if n.op_type == "MatMulNBits" and n.domain == _MSFT and (key := _merge_key(n)):
            groups.setdefault(key, []).append(n)
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        merged = _merged(graph, nodes, f"{nodes[0].name}_merged")
        sizes = _initializer(graph, f"{merged.name}_split",
                             np.array([_ints(n, "N") for n in nodes], np.int64))
        split = ir.node("Split", [merged.outputs[0], sizes], attributes={"axis": -1},
                        num_outputs=len(nodes), name=f"{merged.name}_split")
        graph.insert_after(merged, split)
        for n, out in zip(nodes, split.outputs):
            _replace(graph, n.outputs[0], out)
        report.add("merged_matmul_nbits", len(nodes))


# ----------------------------------------------------------------------------- plumbing

def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                 shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(v)
    return v


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs included, keeping the output's name) reads ``new``."""
    name = old.name
    was_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name = f"{name}_unfused"
        new.name = name
        new.shape, new.type = new.shape or old.shape, new.type or old.type


def fuse_decoder(model: ir.Model, max_seq: int) -> FusionReport:
    """Apply the fusions above to ``model`` in place; return what was fused and skipped."""
    import onnx_ir.passes.common as common

    report = FusionReport()
    graph = model.graph
    _fuse_rms(graph, report)
    _fuse_attention(graph, max_seq, report)
    common.RemoveUnusedNodesPass()(model)
    _pack_qkv(graph, report)
    common.RemoveUnusedNodesPass()(model)
    _fuse_siblings(graph, report)
    common.RemoveUnusedNodesPass()(model)
    if _MSFT not in model.opset_imports:
        model.opset_imports[_MSFT] = 1
    return report
