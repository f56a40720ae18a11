"""Unscheduled tensor-expression definitions of lowbit's operators (GPU targets).

These are plain compute definitions -- a dequantize stage inlined into a matmul reduction,
the activation fake-quantization as a reduction + elementwise stage, the factored Hadamard as
two small matmuls -- so that TVM's dlight GPU rules (``Matmul`` for prefill, ``GEMV`` /
``LowBatchGEMV`` for decode, ``Fallback``) can schedule them; the dequantization is fused into
the matmul's load of the weight tile. Weight-only linears use these only above 8 rows
(:mod:`._cuda` has the decode kernel and the dispatch).
"""
from __future__ import annotations

from tvm import te, tirx

from lowbit.backends.tvm import _unpack
from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec

__all__ = ["quant_linear", "hadamard"]


def _fake_quantize(x: te.Tensor, spec: QuantLinearSpec) -> te.Tensor:
    m, k = x.shape
    rk = te.reduce_axis((0, k), name="k")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, rk]), axis=rk), name="act_absmax")
    scale = te.compute((m,), lambda i: _unpack.row_scale(spec, amax[i]), name="act_scale")
    return te.compute(x.shape, lambda i, j: _unpack.quantize_value(spec, x[i, j], scale[i])
                      * scale[i], name="act_fake_quant")


def quant_linear(x: te.Tensor, qweight: te.Tensor, scales: te.Tensor, zero_points, bias,
                 spec: QuantLinearSpec) -> te.Tensor:
    """``x [M, K] -> y [M, N]``: ``y = x' @ ((q - z) * s)^T (+ bias)``."""
    if spec.act_bits:
        x = _fake_quantize(x, spec)
    m = x.shape[0]
    n, k, g = spec.out_features, spec.in_features, spec.group_size

    def weight(i, j):
        q = _unpack.code_at(spec, qweight, i, j) - _unpack.zero_point(spec, zero_points, i, j // g)
        return tirx.Cast("float32", q) * scales[i, j // g]

    w = te.compute((n, k), weight, name="dequantize")
    rk = te.reduce_axis((0, k), name="k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, rk] * w[j, rk], axis=rk), name="matmul")
    if bias is not None:
        y = te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="bias_add")
    return y


def hadamard(x: te.Tensor, left: te.Tensor, right: te.Tensor, spec: HadamardSpec) -> te.Tensor:
    """``x [M, a*b] -> y [M, a*b]``, ``Y = A^T X B`` per row."""
    a, b = spec.left, spec.right
    m = x.shape[0]
    rl = te.reduce_axis((0, b), name="l")
    t = te.compute((m, a, b), lambda r, i, j: te.sum(x[r, i * b + rl] * right[rl, j], axis=rl),
                   name="hadamard_right")
    ri = te.reduce_axis((0, a), name="i")
    return te.compute((m, a * b), lambda r, p: te.sum(left[ri, p // b] * t[r, ri, p % b], axis=ri),
                      name="hadamard_left")
