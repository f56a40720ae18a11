"""Adapter of the :class:`~lowbit.compiler.graph.Graph` protocol over an ONNX model (onnx-ir).

The protocol's nodes are the model's values seen through their producers:

* ``input`` (a graph input, named by its value), ``constant`` (an initializer, named by its
  value), ``output`` (one node reading every graph output);
* one node per ONNX node, named by the node, standing for its first output; further outputs
  that are read appear as ``getitem`` nodes ``"<node>:<i>"``;
* a ``linear`` is one node made of several ONNX nodes: ``MatMul(x, W)`` with a constant
  ``W [K, N]``, ``MatMul(x, Transpose(W))`` with ``W [N, K]``, or ``Gemm`` (``transB`` or
  not), each with its bias ``Add`` of a 1-D constant folded in;
* nodes lowbit inserted (``lowbit.quant_linear``, ``hadamard``, ``split_channels``) are one
  node each, however many ONNX nodes compute them (see :mod:`._onnx_build`).

``Shape``/``Size`` read only metadata, so they are not listed among a value's consumers:
passes that rescale or rotate values never change a shape they read.

Evaluation runs on ONNX Runtime: observed values become extra graph outputs of a temporary
session; :meth:`OnnxGraph.staged` runs the graph segment by segment (one small session per
stage, built from the current weights).
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler import _onnx_build as build
from lowbit.compiler._onnx_index import Entry as _Entry, Linear as _Linear, attr as _attr, \
    const_array as _const, node_entries
from lowbit.compiler.graph import LinearSite, Observer, PackedLinear

__all__ = ["OnnxGraph"]

_METADATA_OPS = {"Shape", "Size"}
#: torch operators ``insert_before_input``/``insert_on_input`` accept -> ONNX builder
_BUILDERS = {"lowbit.hadamard.default": ("hadamard", build.hadamard),
             "lowbit.passes.ocs.split_channels": ("split_channels", build.split_channels)}



@dataclass(frozen=True)
class NodeView:
    """What ``graph.node(name)`` gives: ``target`` names a constant (as FX's get_attr)."""
    name: str
    op: str
    target: str | None



class OnnxGraph:
    """A captured ONNX model as a mutable onnx-ir graph (see module doc)."""

    form = "onnx"

    def __init__(self, model: ir.Model, strip_prefix: str = ""):
        self.model = model
        self.strip_prefix = strip_prefix
        self.version = 0              # bumped on every change: sessions are rebuilt
        self._sessions: dict = {}
        self._names: set[str] = set()
        self._index()

    # -- naming and indexing ------------------------------------------------------------
    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return int(self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 0)))

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def _touch(self, structure: bool = False) -> None:
        self.version += 1
        self._sessions.clear()
        if structure:
            self._index()

    def _index(self) -> None:
        g = self.graph
        self._order = list(g)
        self._pos = {n: i for i, n in enumerate(self._order)}
        self._names = {v.name for v in g.inputs} | set(g.initializers) | \
            {n.name for n in self._order} | {v.name for n in self._order for v in n.outputs}
        entries: dict[str, _Entry] = {}
        for v in g.inputs:
            entries[v.name] = _Entry(v.name, "input", v)
        for name, v in g.initializers.items():
            entries[name] = _Entry(name, "constant", v)
        self._entry_of: dict[ir.Node, str] = {}
        self._items: dict[str, list[str]] = {}       # multi-output node -> its getitems
        for e in sorted(node_entries(self._order, self._pos),
                        key=lambda e: self._pos[e.parts[-1]]):
            entries[e.name] = e
            for p in e.parts:
                self._entry_of[p] = e.name
            for i, out in enumerate(e.parts[-1].outputs[1:], 1):
                if out.uses() or out.is_graph_output():
                    key = f"{e.name}:{i}"
                    entries[key] = _Entry(key, "getitem", out, op="getitem", parent=e.name)
                    self._items.setdefault(e.name, []).append(key)
        self._output = "output" if "output" not in entries else self.fresh_name("output")
        entries[self._output] = _Entry(self._output, "output", op="output")
        self._entries = entries
        self._owner = {e.value: k for k, e in entries.items() if e.value is not None}

    # -- the protocol: structure ------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no node named '{name}' in the graph") from None

    def node(self, name: str) -> NodeView:
        e = self._entry(name)
        return NodeView(name, self.op(name), name if e.kind == "constant" else None)

    def nodes(self) -> list[str]:
        return list(self._entries)

    def op(self, node: str) -> str:
        e = self._entry(node)
        return e.kind if e.kind in ("input", "constant", "output") else e.op

    def inputs(self, node: str) -> list[str]:
        e = self._entry(node)
        if e.kind == "output":
            return [self._owner[v] for v in self.graph.outputs]
        if e.kind == "getitem":
            return [e.parent]
        if e.linear is not None:            # as FX's linear(x, w, b)
            lin = e.linear
            return [self._owner[v] for v in (lin.x, lin.weight, lin.bias) if v is not None]
        inside = {v for p in e.parts for v in p.outputs}
        out = []
        for p in e.parts:
            for v in p.inputs:
                if v is not None and v not in inside and v in self._owner \
                        and self._owner[v] not in out:
                    out.append(self._owner[v])
        return out

    def consumers(self, node: str) -> list[str]:
        e = self._entry(node)
        if e.value is None:
            return []
        out = []
        for use in e.value.uses():
            name = self._entry_of.get(use.node)
            if name is None or name == node or name in out:
                continue
            if use.node.op_type in _METADATA_OPS and not use.node.metadata_props.get(
                    "lowbit.group"):
                continue
            out.append(name)
        if e.value.is_graph_output():
            out.append(self._output)
        return out + self._items.get(node, [])

    # -- constants -------------------------------------------------------------------------
    def attr(self, target: str) -> torch.Tensor:
        """The tensor of the constant (initializer) ``target``."""
        v = self.graph.initializers.get(target)
        if v is None or v.const_value is None:
            raise KeyError(f"no constant named '{target}' in the graph")
        return torch.from_numpy(np.array(v.const_value.numpy()))

    def set_attr(self, target: str, value: torch.Tensor) -> None:
        """Replace the constant ``target`` (every reader sees the new value)."""
        v = self.graph.initializers[target]
        arr = value.detach().cpu().contiguous().numpy().astype(v.const_value.dtype.numpy())
        v.const_value = ir.Tensor(arr, name=target)
        v.shape = ir.Shape(arr.shape)
        self._touch()

    def new_initializer(self, key: str, arr: np.ndarray) -> ir.Value:
        name = self.fresh_name(key)
        tensor = ir.Tensor(np.ascontiguousarray(arr), name=name)
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
        self.graph.register_initializer(v)
        return v

    def untie_constant(self, node: str, target: str, created_by: str) -> str:
        """Give ``node`` its own copy of the constant ``target``; returns the copy's name."""
        old = self.graph.initializers[target]
        parts = set(self._entry(node).parts)
        new = self.new_initializer(f"{node}_{target}", np.array(old.const_value.numpy()))
        for use in list(old.uses()):
            if use.node in parts:
                use.node.replace_input_with(use.idx, new)
        self._touch(structure=True)
        return new.name

    # -- linears ---------------------------------------------------------------------------
    def _layer_name(self, lin: _Linear) -> str:
        scopes = lin.main.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                name = ast.literal_eval(scopes)[-2]
            except (ValueError, SyntaxError, IndexError):
                name = ""
            if name:
                return name[len(self.strip_prefix):] if name.startswith(self.strip_prefix) \
                    else name
        w = lin.weight.name
        return w[:-len(".weight")] if w.endswith(".weight") else lin.main.name

    def _site(self, e: _Entry) -> LinearSite:
        lin = e.linear
        shape = lin.weight.const_value.shape
        k, n = (shape[0], shape[1]) if lin.layout == "kn" else (shape[1], shape[0])
        return LinearSite(node=e.name, name=self._layer_name(lin), input=self._owner[lin.x],
                          weight=lin.weight.name,
                          bias=lin.bias.name if lin.bias is not None else None,
                          in_features=int(k), out_features=int(n))

    def linears(self) -> list[LinearSite]:
        return [self._site(e) for e in self._entries.values() if e.linear is not None]

    def _linear(self, site: LinearSite) -> _Linear:
        lin = self._entry(site.node).linear
        if lin is None:
            raise KeyError(f"node '{site.node}' is not a linear")
        return lin

    def linear_weight(self, site: LinearSite) -> torch.Tensor:
        lin = self._linear(site)
        w = torch.from_numpy(np.array(lin.weight.const_value.numpy()))
        return w.T if lin.layout == "kn" else w

    def set_linear_weight(self, site: LinearSite, weight: torch.Tensor) -> None:
        lin = self._linear(site)
        stored = weight.T if lin.layout == "kn" else weight
        reader = lin.transpose or lin.main
        if len(lin.weight.uses()) > 1:       # shared (tied) weight: this layer gets its own
            arr = stored.detach().contiguous().numpy().astype(
                lin.weight.const_value.dtype.numpy())
            reader.replace_input_with(1 if reader is lin.main else 0,
                                      self.new_initializer(f"{site.node}_weight", arr))
            self._touch(structure=True)
        else:
            self.set_attr(lin.weight.name, stored)

    def replace_with_quant_linear(self, site: LinearSite, packed: PackedLinear,
                                  created_by: str) -> str:
        e = self._entry(site.node)
        lin = self._linear(site)
        attrs = {"name": site.name, "bits": packed.bits, "group_size": packed.group_size,
                 "act_bits": packed.act_bits, "act_clip": float(packed.act_clip),
                 "act_symmetric": packed.act_symmetric,
                 "in_features": packed.in_features, "out_features": packed.out_features,
                 "symmetric": packed.zero_points is None, "created_by": created_by}
        self.model.opset_imports.setdefault(build.MSFT, 1)
        b = build.Builder(self, self.fresh_name(f"{site.node}_quant"), "lowbit.quant_linear",
                          created_by, site.name)
        y = build.quant_linear(b, lin.x, packed, lin.bias, attrs)
        self._splice(e, b.finish(y), y)
        return b.group

    def _splice(self, e: _Entry, nodes: list[ir.Node], y: ir.Value) -> None:
        """Insert ``nodes`` before ``e`` and let ``y`` replace ``e``'s value; drop ``e``."""
        g = self.graph
        # before the MatMul/Gemm itself: a folded Transpose of the weight may come before x
        g.insert_before(e.linear.main if e.linear is not None else e.parts[0], nodes)
        old = e.value
        was_output = old.is_graph_output()
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        if was_output:                    # keep the model's output names
            name = old.name
            old.name = self.fresh_name(f"{name}_replaced")
            y.name = name
        consts = [v for p in e.parts for v in p.inputs if v is not None and v.is_initializer()]
        g.remove(list(e.parts), safe=True)
        for v in consts:
            if not v.uses() and not v.is_graph_output() and v.name in g.initializers:
                del g.initializers[v.name]
        self._touch(structure=True)

    def quant_linears(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, e in self._entries.items():
            if e.op == "lowbit.quant_linear":
                attrs = e.parts[-1].metadata_props.get(build.QUANT_ATTRS)
                out[name] = json.loads(attrs) if attrs else {}
        return out

    # -- inserting nodes ----------------------------------------------------------------
    def _builder_for(self, op):
        key = str(op) if isinstance(op, torch._ops.OpOverload) else \
            f"{getattr(op, '__module__', '')}.{getattr(op, '__qualname__', op)}"
        if key not in _BUILDERS:
            raise NotImplementedError(f"no ONNX form of operator '{key}' is known to the ONNX "
                                      f"graph adapter (known: {sorted(_BUILDERS)})")
        return _BUILDERS[key]

    def insert_on_input(self, sites: Sequence[LinearSite], op,
                        constants: Sequence[torch.Tensor], created_by: str) -> str:
        """Feed every site in ``sites`` (reading one value ``x``) with ``op(x, *constants)``."""
        lins = [self._linear(s) for s in sites]
        xs = {lin.x for lin in lins}
        if len(xs) != 1:
            raise ValueError(f"sites {[s.name for s in sites]} do not read one value")
        x = xs.pop()
        kind, fn = self._builder_for(op)
        first = min((lin.main for lin in lins), key=self._pos.__getitem__)
        b = build.Builder(self, self.fresh_name(f"{sites[0].node}_{kind}"), kind, created_by,
                          sites[0].name)
        y = fn(b, x, *constants)
        self.graph.insert_before(first, b.finish(y))
        for lin in lins:
            lin.main.replace_input_with(0, y)
        self._touch(structure=True)
        return b.group

    def insert_before_input(self, site: LinearSite, op, constants: Sequence[torch.Tensor],
                            created_by: str) -> str:
        """Feed ``site`` with ``op(x, *constants)`` instead of its input ``x``."""
        return self.insert_on_input([site], op, constants, created_by)

    def norm_args(self, node: str) -> dict:
        """``{"width", "weight", "bias", "eps"}`` of a norm node (constant names or None)."""
        e = self._entry(node)
        n = e.parts[-1]
        ins = list(n.inputs) + [None] * 3
        weight, bias = ins[1], ins[2] if e.op == "layer_norm" else None
        axis = _attr(n, "axis", -1)
        rank = len(n.inputs[0].shape) if n.inputs[0].shape is not None else None
        wt = _const(weight)
        last = axis == -1 or (rank is not None and axis == rank - 1)
        width = int(wt.shape[0]) if wt is not None and wt.ndim == 1 and last else None
        name = lambda v: self._owner.get(v) if v is not None else None  # noqa: E731
        eps = _attr(n, "epsilon", 1e-5)
        return {"width": width, "weight": name(weight), "bias": name(bias), "eps": float(eps)}

    # -- execution ------------------------------------------------------------------------
    def placeholders(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        names = self.placeholders()
        if not isinstance(inputs, Mapping):
            inputs = dict(zip(names, inputs))
        missing = [k for k in names if k not in inputs]
        if missing:
            raise KeyError(f"graph inputs {missing} not given (have {sorted(inputs)})")
        return {k: np.ascontiguousarray(torch.as_tensor(inputs[k]).detach().cpu().numpy())
                for k in names}

    def _session(self, extra: tuple[ir.Value, ...] = ()):
        key = (self.version, tuple(v.name for v in extra))
        if key not in self._sessions:
            from lowbit.compiler._onnx_run import session_for
            outs = self.graph.outputs
            added = [v for v in extra if v not in outs]
            outs.extend(added)
            try:
                sess = session_for(self.model)
            finally:
                for _ in added:
                    outs.pop()
            self._sessions.clear()         # one session at a time: each holds the weights
            self._sessions[key] = sess
        return self._sessions[key]

    def complete(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` as given: an ONNX graph's inputs are all required (no defaults)."""
        return dict(inputs)

    def run(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
            observe: Mapping[str, Observer] | None = None) -> list[torch.Tensor]:
        feeds = self._feeds(inputs)
        observe = dict(observe or {})
        for name in [k for k in observe if self._entry(k).kind in ("input", "constant")]:
            cb = observe.pop(name)
            cb(torch.from_numpy(feeds[name]) if name in feeds else self.attr(name))
        extra = tuple(dict.fromkeys(self._entry(k).value for k in observe))
        outs = self._session(extra).run(None, feeds)
        n = len(self.graph.outputs)
        got = dict(zip(self.graph.outputs, outs[:n]))
        got.update(zip([v for v in extra if v not in got], outs[n:]))
        for k, cb in observe.items():
            cb(torch.from_numpy(got[self._entry(k).value]))
        return [torch.from_numpy(o) for o in outs[:n]]

    def staged(self, inputs: Sequence[Mapping[str, torch.Tensor]]):
        """Run the graph over ``inputs`` stage by stage (:class:`._onnx_run.StagedRun`)."""
        from lowbit.compiler._onnx_run import StagedRun
        return StagedRun(self, [self._feeds(b) for b in inputs])

    def sync(self):
        return self.model

    def dump(self) -> str:
        lines = []
        for name, e in self._entries.items():
            if e.kind == "constant":
                continue
            meta = e.parts[-1].metadata_props if e.parts else {}
            by = meta.get("lowbit.created_by")
            extra = f"  # {meta.get('lowbit.source', '')} (by {by})" if by else ""
            lines.append(f"{name} = {self.op(name)}({', '.join(self.inputs(name))}){extra}")
        return "\n".join(lines)

    def num_parameters_bytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.graph.initializers.values()
                   if v.const_value is not None)

    def set_accuracy_level(self, level: int) -> None:
        """``accuracy_level`` of every ``MatMulNBits`` lowbit created (a backend option)."""
        for n in self._order:
            if n.op_type == "MatMulNBits" and n.metadata_props.get("lowbit.group"):
                n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", int(level))
        self._touch()

    def save(self, path, external: bool | None = None) -> None:
        """Write the model to ``path`` (external data beside it above ~1.8 GB)."""
        from lowbit.compiler._onnx_run import save_model
        save_model(self.model, path, external)
