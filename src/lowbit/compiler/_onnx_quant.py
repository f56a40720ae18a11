"""Per-token activation fake-quantization as ONNX ops, written once for both ways lowbit emits
ONNX: the onnxscript translations of ``torch.onnx.export`` (ONNX Runtime backend) and the
``onnx_ir`` builders of ONNX graphs (:mod:`._onnx_build`).

The op sequence is that of :func:`lowbit.numerics.quant.quantize_activation_per_token`, op for
op, so every backend rounds the same values the same way. ``ops`` is an adapter: called as
``ops(op_type, *inputs)``, with ``ops.f32(name, value)`` for a float scalar constant and
``ops.reduce_last(op_type, x)`` for a reduction over the last axis with kept dims.
"""
from __future__ import annotations

__all__ = ["per_token_scale", "fake_quant", "ScriptOps"]


def per_token_scale(ops, x, qmax: float, clip: float):
    """``s = clip * max(max|x|, 1e-8) / qmax`` per token (as the torch reference computes)."""
    a = ops("Max", ops.reduce_last("ReduceMax", ops("Abs", x)), ops.f32("eps", 1e-8))
    if clip != 1.0:
        a = ops("Mul", a, ops.f32("clip", clip))
    return ops("Div", a, ops.f32("qmax", qmax))


def fake_quant(ops, x, bits: int, clip: float, symmetric: bool = True):
    """Quantize-dequantize ``x`` per token: symmetric ``[-qmax, qmax]``, or the clipped
    ``[min, max]`` range with a zero point (``symmetric=False``)."""
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        s = per_token_scale(ops, x, qmax, clip)
        q = ops("Clip", ops("Round", ops("Div", x, s)), ops.f32("lo", -qmax),
                ops.f32("hi", qmax))
        return ops("Mul", q, s)
    zero, top = ops.f32("zero", 0.0), ops.f32("top", float(2 ** bits - 1))
    lo = ops("Min", ops.reduce_last("ReduceMin", x), zero)
    hi = ops("Max", ops.reduce_last("ReduceMax", x), zero)
    if clip != 1.0:
        c = ops.f32("clip", clip)
        lo, hi = ops("Mul", lo, c), ops("Mul", hi, c)
    s = ops("Div", ops("Max", ops("Sub", hi, lo), ops.f32("eps", 1e-8)), top)
    z = ops("Round", ops("Div", ops("Neg", lo), s))
    q = ops("Clip", ops("Add", ops("Round", ops("Div", x, s)), z), zero, top)
    return ops("Mul", ops("Sub", q, z), s)


class ScriptOps:
    """The adapter for an onnxscript opset (``op``, opset 18) inside a translation function."""

    def __init__(self, op):
        self.op = op

    def __call__(self, op_type: str, *inputs):
        return getattr(self.op, op_type)(*inputs)

    def f32(self, name: str, value: float):
        return self.op.Constant(value_float=float(value))

    def reduce_last(self, op_type: str, x):
        return getattr(self.op, op_type)(x, self.op.Constant(value_ints=[-1]), keepdims=1)
