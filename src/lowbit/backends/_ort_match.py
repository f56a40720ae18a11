"""Structural matching and editing helpers for the ONNX Runtime fusions (onnx-ir graphs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = ["MSFT", "FusionReport", "prod", "const", "scalar", "ints", "split_const",
           "heads_view", "initializer", "replace_value"]

MSFT = "com.microsoft"


@dataclass
class FusionReport:
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


def prod(v: ir.Value | None, op: str | tuple[str, ...]) -> ir.Node | None:
    """The producer of ``v`` if it is an ``op`` node in the default domain."""
    if v is None:
        return None
    n = v.producer()
    ops = (op,) if isinstance(op, str) else op
    return n if n is not None and n.op_type in ops and n.domain in ("", "ai.onnx") else None


def const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def scalar(v: ir.Value | None) -> float | None:
    c = const(v)
    return float(c.reshape(())) if c is not None and c.size == 1 else None


def ints(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def split_const(node: ir.Node) -> tuple[ir.Value, float] | None:
    """``Mul(x, c)`` with a scalar constant ``c`` (either order) -> ``(x, c)``."""
    for i in (0, 1):
        c = scalar(node.inputs[1 - i])
        if c is not None:
            return node.inputs[i], c
    return None


def heads_view(v: ir.Value) -> ir.Value | None:
    """``Transpose[0,2,1,3](Reshape(x))`` -> ``x`` (``[B,S,H*D]`` viewed as ``[B,H,S,D]``)."""
    t = prod(v, "Transpose")
    if t is None or list(ints(t, "perm", [])) != [0, 2, 1, 3]:
        return None
    r = prod(t.inputs[0], "Reshape")
    return None if r is None else r.inputs[0]


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                 shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(v)
    return v


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs included, keeping the output's name) reads ``new``."""
    name = old.name
    was_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name = f"{name}_unfused"
        new.name = name
        new.shape, new.type = new.shape or old.shape, new.type or old.type
