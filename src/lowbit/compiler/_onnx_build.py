"""Building ONNX subgraphs for nodes lowbit inserts into an :class:`OnnxGraph`.

Each builder emits standard ONNX ops (plus ``com.microsoft`` ``MatMulNBits``) that compute
what the matching torch operator computes, mirroring the onnxruntime backend's translations
of ``lowbit::quant_linear`` and ``lowbit::hadamard`` so both graph forms lower alike.
All nodes of one insertion form a *group*: they carry ``lowbit.group`` (the name of the
group's last node, which the graph protocol shows as one node), ``lowbit.op`` and
``lowbit.created_by`` in their metadata.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler._onnx_quant import fake_quant, per_token_scale
from lowbit.compiler.graph import PackedLinear

__all__ = ["Builder", "quant_linear", "hadamard", "split_channels", "rms_normalize",
           "MSFT", "QUANT_ATTRS"]

MSFT = "com.microsoft"
QUANT_ATTRS = "lowbit.quant_linear"


class Builder:
    """Collects new nodes and initializers for one group (see module doc)."""

    def __init__(self, graph, group: str, op: str, created_by: str, source: str | None = None,
                 grouped: bool = True):
        self.graph, self.group, self.op = graph, group, op
        self.meta = {"lowbit.created_by": created_by}
        if grouped:       # shown as one node; else each node stands on its own
            self.meta.update({"lowbit.group": group, "lowbit.op": op})
        if source:
            self.meta["lowbit.source"] = source
        self.nodes: list[ir.Node] = []
        self.opset = graph.opset

    def __call__(self, op_type: str, *inputs, domain: str = "", **attrs) -> ir.Value:
        name = self.graph.fresh_name(f"{self.group}_{op_type}")
        node = ir.node(op_type, list(inputs), attributes=attrs or None, domain=domain,
                       name=name, metadata_props=dict(self.meta))
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, key: str, value) -> ir.Value:
        """A new initializer holding ``value`` (tensor or array)."""
        arr = value.detach().cpu().contiguous().numpy() if isinstance(value, torch.Tensor) \
            else np.asarray(value)
        return self.graph.new_initializer(f"{self.group}_{key}", arr)

    def f32(self, key: str, value: float) -> ir.Value:
        """A float32 scalar initializer."""
        return self.const(key, np.float32(value))

    def ints(self, key: str, values) -> ir.Value:
        return self.const(key, np.asarray(values, dtype=np.int64))

    def reduce_last(self, op: str, x: ir.Value) -> ir.Value:
        """``op(x, axis=-1, keepdims)`` (``ReduceMax``, ``ReduceMin``, ``ReduceMean``) in the
        form the model's opset defines (axes an input from opset 18)."""
        if self.opset >= 18:
            return self(op, x, self.ints(f"{op}_axes", [-1]), keepdims=1)
        return self(op, x, axes=[-1], keepdims=1)

    def finish(self, last: ir.Value) -> list[ir.Node]:
        """Name the node producing ``last`` after the group; returns the nodes in order."""
        last.producer().name = self.group
        last.name = self.graph.fresh_name(f"{self.group}_out")
        return self.nodes


def _integer(b: Builder, x: ir.Value, p: PackedLinear) -> ir.Value:
    """int8 per-token x int8 per-channel weights: ``MatMulInteger`` then both scales.

    The weight is stored ``[K, N]`` uint8 (offset 128, or the zero points) and read by
    ``MatMulInteger(int8 x, uint8 w)``, exact on AVX2 (see the onnxruntime backend).
    """
    n = p.out_features
    s = per_token_scale(b, x, 127.0, p.act_clip)
    q = b("Clip", b("Round", b("Div", x, s)), b.const("lo", np.float32(-127.0)),
          b.const("hi", np.float32(127.0)))
    xq = b("Cast", q, to=ir.DataType.INT8)
    w = p.qweight.reshape(n, -1)[:, :p.in_features].T.contiguous()
    wzp = np.full(n, 128, dtype=np.uint8) if p.zero_points is None \
        else p.zero_points.reshape(n).numpy()
    acc = b("MatMulInteger", xq, b.const("qweight_t", w), b.const("azp", np.int8(0)),
            b.const("wzp", wzp))
    y = b("Mul", b("Cast", acc, to=ir.DataType.FLOAT), s)
    return b("Mul", y, b.const("scales", p.scales.reshape(n)))


def quant_linear(b: Builder, x: ir.Value, p: PackedLinear, bias: ir.Value | None,
                 attrs: dict) -> ir.Value:
    """Nodes computing ``lowbit::quant_linear(x, ...)``; returns the output value.

    Float activations -> ``MatMulNBits`` on the packed bytes as they are (fake-quantized per
    token first when ``act_bits`` is set); 8-bit per-channel weights with 8-bit activations
    -> the integer path. ``accuracy_level`` starts at 0 and is set when lowering.
    """
    integer = p.act_bits == 8 and p.bits == 8 and p.scales.shape[1] == 1
    if p.bits == 3:
        raise NotImplementedError("3-bit weights are not yet lowered on ONNX graphs (no "
                                  "MatMulNBits kernel); use bits 2, 4 or 8")
    if integer:
        y = _integer(b, x, p)
    else:
        if p.act_bits:
            x = fake_quant(b, x, p.act_bits, p.act_clip, p.act_symmetric)
        ins = [x, b.const("qweight", p.qweight), b.const("scales", p.scales)]
        if p.zero_points is not None:
            ins.append(b.const("zero_points", p.zero_points))
        y = b("MatMulNBits", *ins, domain=MSFT, K=p.in_features, N=p.out_features,
              bits=p.bits, block_size=p.group_size, accuracy_level=0)
    if bias is not None:
        y = b("Add", y, bias)
    y.producer().metadata_props[QUANT_ATTRS] = json.dumps(attrs)
    return y


def hadamard(b: Builder, x: ir.Value, left: torch.Tensor, right: torch.Tensor) -> ir.Value:
    """``y = A^T X B`` on the last dim viewed as ``[a, b]`` (``lowbit::hadamard``)."""
    a, c = left.shape[0], right.shape[0]
    shape = b("Shape", x)
    lead = b("Slice", shape, b.ints("start", [0]), b.ints("end", [-1]))
    xr = b("Reshape", x, b("Concat", lead, b.ints("ab", [a, c]), axis=0))
    y = b("MatMul", b.const("left_t", left.T.contiguous()),
          b("MatMul", xr, b.const("right", right)))
    return b("Reshape", y, shape)


def split_channels(b: Builder, x: ir.Value, index: torch.Tensor, keep: torch.Tensor,
                   extra: torch.Tensor) -> ir.Value:
    """``[x * keep, x[..., index] * extra]`` (:func:`lowbit.passes.ocs.split_channels`)."""
    kept = b("Mul", x, b.const("keep", keep))
    picked = b("Mul", b("Gather", x, b.const("index", index.to(torch.int64)), axis=-1),
               b.const("extra", extra))
    return b("Concat", kept, picked, axis=-1)


def rms_normalize(b: Builder, x: ir.Value, eps: float, dtype: np.dtype) -> ir.Value:
    """``x * rsqrt(mean(x^2, -1) + eps)``: the decomposed RMS norm exporters produce."""
    ms = b.reduce_last("ReduceMean", b("Pow", x, b.const("two", np.asarray(2.0, dtype=dtype))))
    rs = b("Reciprocal", b("Sqrt", b("Add", ms, b.const("eps", np.asarray(eps, dtype=dtype)))))
    return b("Mul", x, rs)
