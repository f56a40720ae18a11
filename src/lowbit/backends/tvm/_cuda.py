"""Hand-written CUDA kernel for weight-only quantized linears (no activation quantization, no
bias): ``y [m, N] = x [m, K] @ ((q - z) * s)^T`` reading lowbit's packed layout.

Layout of the work:

* a block holds ``TS`` warps, one output column ``n`` each, and ``MT`` rows of ``x`` (``m``
  stays dynamic; rows past it are skipped);
* the 32 lanes of a warp split ``K`` into runs of ``VK`` consecutive weights (4 packed bytes,
  3 for int3), so a warp reads a contiguous stretch of its weight row; each lane dequantizes
  its run once into registers (scale and zero point once per run: a run never crosses a group)
  and uses it for all ``MT`` rows, keeping ``MT`` partial sums;
* the 32 partial sums of each row are added through shared memory.

dlight's rules see a dynamic-M matmul and choose their ``Matmul`` schedule (padded tiles) even
at M = 1: on an H200 that took 25-190 us per decode GEMV at SmolLM2's and 4096^2 shapes
(docs/results.md), where the weight-read bound is 0.02-2 us.
"""
from __future__ import annotations

from tvm import relax, te, tirx
from tvm.script import tirx as T

from lowbit.backends.tvm import _te, _unpack
from lowbit.backends.tvm.kernels import QuantLinearSpec

__all__ = ["handles", "quant_linear_kernel", "dispatch_function"]

TS, TR, MT = 4, 32, 8          # warps (output columns) per block, lanes per warp, rows per block


def handles(spec: QuantLinearSpec) -> bool:
    """Weight-only layers whose groups split into whole lane runs; the rest keep dlight's."""
    run = _lane_run(spec)
    return (not spec.act_bits and not spec.has_bias and spec.group_size % run == 0
            and spec.in_features % run == 0)


def _lane_run(spec: QuantLinearSpec) -> int:
    """Consecutive weights per lane per step: 4 packed bytes (int3: one 3-byte unit)."""
    return 8 if spec.bits == 3 else 32 // spec.bits


def quant_linear_kernel(spec: QuantLinearSpec):
    """``(x [m, K], qweight, scales, zero_points | (1,) placeholder) -> y [m, N]``."""
    if not handles(spec):
        raise ValueError(f"{spec.name}: the CUDA kernel covers weight-only layers")
    N, K, G = spec.out_features, spec.in_features, spec.group_size
    NG, GB, ZB, per = spec.n_groups, spec.group_bytes, spec.zero_point_bytes, spec.codes_per_unit
    VK = _lane_run(spec)
    STEP = TR * VK
    KO = -(-K // STEP)
    NB = -(-N // TS)
    zp_shape = (N, ZB) if spec.has_zero_points else (1,)

    def weight(w, zp, s, n, k0, v):
        g, j = k0 // G, k0 % G + v
        code = T.Cast("float32", _unpack.code_in_unit(spec, w, n, g, j % per, j // per))
        return (code - T.Cast("float32", _unpack.zero_point(spec, zp, n, g))) * s[n, g]

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, w: T.Buffer((N, NG, GB), "uint8"),
               s: T.Buffer((N, NG), "float32"), zp: T.Buffer(zp_shape, "uint8"),
               y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        for bm in T.thread_binding((m + MT - 1) // MT, thread="blockIdx.y"):
            for bn in T.thread_binding(T.int64(NB), thread="blockIdx.x"):
                for ty in T.thread_binding(T.int64(TS), thread="threadIdx.y"):
                    for tx in T.thread_binding(T.int64(TR), thread="threadIdx.x"):
                        acc = T.alloc_buffer((MT,), "float32", scope="local")
                        wv = T.alloc_buffer((VK,), "float32", scope="local")
                        red = T.alloc_buffer((TS, TR, MT), "float32", scope="shared")
                        for r in T.unroll(MT):
                            acc[r] = T.float32(0)
                        if bn * TS + ty < N:
                            for ko in range(T.int64(KO)):
                                if ko * STEP + tx * VK < K:
                                    for v in T.unroll(VK):
                                        wv[v] = weight(w, zp, s, bn * TS + ty,
                                                       ko * STEP + tx * VK, v)
                                    for r in T.unroll(MT):
                                        if bm * MT + r < m:
                                            for v in T.unroll(VK):
                                                acc[r] = acc[r] + x[
                                                    bm * MT + r, ko * STEP + tx * VK + v
                                                ] * wv[v]
                        for r in T.unroll(MT):
                            red[ty, tx, r] = acc[r]
                        T.tvm_storage_sync("shared")
                        if tx < MT and bm * MT + tx < m and bn * TS + ty < N:
                            acc[0] = T.float32(0)
                            for lane in range(T.int64(TR)):
                                acc[0] = acc[0] + red[ty, lane, tx]
                            y[bm * MT + tx, bn * TS + ty] = acc[0]
    return kernel


def gemm_function(spec: QuantLinearSpec) -> tirx.PrimFunc:
    """The same computation, unscheduled (:mod:`._te`): dlight's ``Matmul`` rule schedules it
    for the rows > ``MT`` case, where a tiled matmul reuses each dequantized weight tile."""
    m = tirx.Var("m", "int64")
    n, ng = spec.out_features, spec.n_groups
    x = te.placeholder((m, spec.in_features), "float32", name="x")
    qweight = te.placeholder((n, ng, spec.group_bytes), "uint8", name="qweight")
    scales = te.placeholder((n, ng), "float32", name="scales")
    zp_shape = (n, spec.zero_point_bytes) if spec.has_zero_points else (1,)
    zp = te.placeholder(zp_shape, "uint8", name="zero_points")
    y = _te.quant_linear(x, qweight, scales, zp if spec.has_zero_points else None, None, spec)
    return te.create_prim_func([x, qweight, scales, zp, y], index_dtype_override="int64") \
        .without_attr("global_symbol")


def dispatch_function(spec: QuantLinearSpec, gemv: relax.GlobalVar,
                      gemm: relax.GlobalVar) -> relax.Function:
    """``(x [m, K], qweight, scales, zero_points) -> y [m, N]``: the warp-per-column kernel
    for ``m <= MT`` rows (decode, short inputs), the tiled matmul above that (prefill)."""
    m = tirx.Var("m", "int64")
    n, ng = spec.out_features, spec.n_groups
    zp_shape = [n, spec.zero_point_bytes] if spec.has_zero_points else [1]
    params = [relax.Var("x", relax.TensorType([m, spec.in_features], "float32")),
              relax.Var("qweight", relax.TensorType([n, ng, spec.group_bytes], "uint8")),
              relax.Var("scales", relax.TensorType([n, ng], "float32")),
              relax.Var("zero_points", relax.TensorType(zp_shape, "uint8"))]
    out = relax.TensorType([m, n], "float32")
    bb = relax.BlockBuilder()
    with bb.function("dispatch", params, private=True):
        small = relax.SeqExpr([], relax.call_tir(gemv, params, out))
        large = relax.SeqExpr([], relax.call_tir(gemm, params, out))
        y = bb.emit(relax.If(relax.prim_value(m <= MT), small, large))
        bb.emit_func_output(y)
    return bb.get()["dispatch"]
