"""Hand-scheduled TIR kernels for CPUs (llvm target), written as loop nests in TVMScript.

A quantized linear is two kernels:

* ``prep`` (per call, O(M K)): activation rows -> ``xp [M, n_groups, codes_per_unit, units]``,
  the row in the order the packed units hold their codes (code ``c`` of unit ``u`` of group
  ``g`` is input ``g*group + u*codes_per_unit + c``), zero past K; their per-group sums
  ``xs [M, n_groups]``; the row scale ``rs [M]`` (1, or the dynamic per-token activation
  scale, in which case ``xp`` holds the integer codes). This makes every weight load and every
  activation load of the main kernel contiguous.
* ``matmul``: for M <= ``GEMV_MAX_M`` (decode) a GEMV that unpacks each weight unit once per
  row and keeps the zero point and scale out of the inner loop
  (``y = rs * sum_g s_g (x'.q - z_g xs_g)``); rows of weights in blocks of ``_ROWS`` share
  each activation load. For larger M (prefill) a GEMM: the weight is dequantized once per
  call into float panels ``[N/16, K, 16]`` (in the permuted k order of ``xp``), then a 6x16
  register-blocked micro-kernel (12 accumulator vectors) runs over the panels in parallel.
"""
from __future__ import annotations

from tvm.script import tirx as T

from lowbit.backends.tvm import _unpack
from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec

__all__ = ["prep_kernel", "matmul_kernel", "hadamard_kernel", "prep_macro", "gemm_macro",
           "GEMV_MAX_M"]

GEMV_MAX_M = 4
_ROWS = 4            # weight rows per GEMV step
_MR, _NR = 6, 16     # GEMM micro-tile


def _largest_pow2_divisor(n: int, cap: int) -> int:
    v = 1
    while v < cap and n % (v * 2) == 0:
        v *= 2
    return v


def prep_macro(spec: QuantLinearSpec):
    """The body of :func:`prep_kernel` as a TIR macro ``prep(x, xp, xs, rs, m)`` (shared with
    :mod:`._cpu_int8`)."""
    K, NG, C, U = spec.in_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    G = spec.group_size
    act = spec.act_bits > 0
    padded = spec.padded_in_features != K

    def load(x, m, g, c, u):
        k = g * G + u * C + c
        return T.if_then_else(k < K, x[m, k], T.float32(0)) if padded else x[m, k]

    @T.macro
    def prep(x, xp, xs, rs, m):
        for mi in T.parallel(m):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            acc = T.alloc_buffer((1,), "float32", scope="local")
            amax[0] = T.float32(0)
            if act:
                for k in range(K):
                    amax[0] = T.max(amax[0], T.fabs(x[mi, k]))
                rs[mi] = _unpack.row_scale(spec, amax[0])
            else:
                rs[mi] = T.float32(1)
            for g in range(NG):
                acc[0] = T.float32(0)
                for c in range(C):
                    for u in range(U):
                        if act:
                            xp[mi, g, c, u] = _unpack.quantize_value(spec, load(x, mi, g, c, u),
                                                                     rs[mi])
                        else:
                            xp[mi, g, c, u] = load(x, mi, g, c, u)
                        acc[0] = acc[0] + xp[mi, g, c, u]
                xs[mi, g] = acc[0]
    return prep


def prep_kernel(spec: QuantLinearSpec):
    """``x [M, K] -> (xp [M, G, C, U], xs [M, G], rs [M])`` (see the module doc)."""
    K, NG, C, U = spec.in_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    body = prep_macro(spec)

    @T.prim_func(private=True, s_tir=True)
    def prep(x_h: T.handle, xp_h: T.handle, xs_h: T.handle, rs_h: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        xp = T.match_buffer(xp_h, (m, NG, C, U), "float32")
        xs = T.match_buffer(xs_h, (m, NG), "float32")
        rs = T.match_buffer(rs_h, (m,), "float32")
        with T.sblock("root"):
            body(x, xp, xs, rs, m)
    return prep


def _dequant(spec, w, s, zp, n, g, c, u):
    q = _unpack.code_in_unit(spec, w, n, g, c, u) - _unpack.zero_point(spec, zp, n, g)
    return T.Cast("float32", q) * s[n, g]


def gemm_macro(spec: QuantLinearSpec):
    """The prefill (M > ``GEMV_MAX_M``) branch of :func:`matmul_kernel` as a TIR macro
    ``gemm(xp, rs, w, s, zp, bias, y, m)``, shared with :mod:`._cpu_int8`."""
    N, NG, C, U = spec.out_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    G, KP = spec.group_size, spec.padded_in_features
    NR = _largest_pow2_divisor(N, _NR)

    def out(acc, rs, bias, m, n):
        v = acc * rs[m]
        return v + bias[n] if spec.has_bias else v

    @T.macro
    def gemm(xp, rs, w, s, zp, bias, y, m):
        wp = T.alloc_buffer((N // NR, KP, NR), "float32")
        for nb in T.parallel(N // NR):
            for j, g, c, u in T.grid(NR, NG, C, U):
                wp[nb, g * G + c * U + u, j] = _dequant(spec, w, s, zp, nb * NR + j, g, c, u)
        for nb in T.parallel(N // NR):
            for m0 in range(m // _MR):
                acc = T.alloc_buffer((_MR, NR), "float32", scope="local")
                for i in T.unroll(_MR):
                    for j in T.vectorized(NR):
                        acc[i, j] = T.float32(0)
                for g, c, u in T.grid(NG, C, U):
                    for i in T.unroll(_MR):
                        for j in T.vectorized(NR):
                            acc[i, j] = acc[i, j] + xp[m0 * _MR + i, g, c, u] \
                                * wp[nb, g * G + c * U + u, j]
                for i in T.unroll(_MR):
                    for j in T.vectorized(NR):
                        y[m0 * _MR + i, nb * NR + j] = out(acc[i, j], rs, bias, m0 * _MR + i,
                                                           nb * NR + j)
            for mt in range(m % _MR):
                acc1 = T.alloc_buffer((NR,), "float32", scope="local")
                for j in T.vectorized(NR):
                    acc1[j] = T.float32(0)
                for g, c, u in T.grid(NG, C, U):
                    for j in T.vectorized(NR):
                        acc1[j] = acc1[j] + xp[m - m % _MR + mt, g, c, u] \
                            * wp[nb, g * G + c * U + u, j]
                for j in T.vectorized(NR):
                    y[m - m % _MR + mt, nb * NR + j] = out(acc1[j], rs, bias,
                                                           m - m % _MR + mt, nb * NR + j)
    return gemm


def matmul_kernel(spec: QuantLinearSpec):
    """``(xp, xs, rs, qweight, scales[, zero_points][, bias]) -> y [M, N]``."""
    N, NG, C, U = spec.out_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    GB, ZB = spec.group_bytes, spec.zero_point_bytes
    VL = _largest_pow2_divisor(U, 8)
    R = _largest_pow2_divisor(N, _ROWS)
    has_zp, has_bias = spec.has_zero_points, spec.has_bias
    zp_shape = (N, ZB) if has_zp else (1,)
    b_shape = (N,) if has_bias else (1,)

    def code_f(w, n, g, c, u):
        return T.Cast("float32", _unpack.code_in_unit(spec, w, n, g, c, u))

    def zero_f(zp, n, g):
        return T.Cast("float32", _unpack.zero_point(spec, zp, n, g))

    def out(acc, rs, bias, m, n):
        v = acc * rs[m]
        return v + bias[n] if has_bias else v

    gemm = gemm_macro(spec)

    @T.prim_func(private=True, s_tir=True)
    def matmul(xp_h: T.handle, xs_h: T.handle, rs_h: T.handle,
               w: T.Buffer((N, NG, GB), "uint8"), s: T.Buffer((N, NG), "float32"),
               zp: T.Buffer(zp_shape, "uint8"), bias: T.Buffer(b_shape, "float32"),
               y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        xp = T.match_buffer(xp_h, (m, NG, C, U), "float32")
        xs = T.match_buffer(xs_h, (m, NG), "float32")
        rs = T.match_buffer(rs_h, (m,), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        with T.sblock("root"):
            if m <= GEMV_MAX_M:
                for n0 in T.parallel(N // R):
                    for mi in range(m):
                        acc = T.alloc_buffer((R, VL), "float32", scope="local")
                        dot = T.alloc_buffer((R, VL), "float32", scope="local")
                        zacc = T.alloc_buffer((R,), "float32", scope="local")
                        for r in T.unroll(R):
                            zacc[r] = T.float32(0)
                            for l in T.vectorized(VL):
                                acc[r, l] = T.float32(0)
                        for g in range(NG):
                            for r in T.unroll(R):
                                for l in T.vectorized(VL):
                                    dot[r, l] = T.float32(0)
                            for u0 in range(U // VL):
                                for c in T.unroll(C):
                                    for r in T.unroll(R):
                                        for l in T.vectorized(VL):
                                            dot[r, l] = dot[r, l] + xp[mi, g, c, u0 * VL + l] \
                                                * code_f(w, n0 * R + r, g, c, u0 * VL + l)
                            for r in T.unroll(R):
                                zacc[r] = zacc[r] + s[n0 * R + r, g] * zero_f(zp, n0 * R + r, g) \
                                    * xs[mi, g]
                                for l in T.vectorized(VL):
                                    acc[r, l] = acc[r, l] + s[n0 * R + r, g] * dot[r, l]
                        for r in range(R):
                            for l in range(1, VL):
                                acc[r, 0] = acc[r, 0] + acc[r, l]
                            y[mi, n0 * R + r] = out(acc[r, 0] - zacc[r], rs, bias, mi, n0 * R + r)
            else:
                gemm(xp, rs, w, s, zp, bias, y, m)
    return matmul


def hadamard_kernel(spec: HadamardSpec):
    """``x [M, a*b] -> y [M, a*b]`` with ``Y = A^T X B`` per row (X viewed as ``[a, b]``)."""
    A, B = spec.left, spec.right
    VB = _largest_pow2_divisor(B, 8)

    @T.prim_func(private=True, s_tir=True)
    def hadamard(x_h: T.handle, left: T.Buffer((A, A), "float32"),
                 right: T.Buffer((B, B), "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, A * B), "float32")
        y = T.match_buffer(y_h, (m, A * B), "float32")
        with T.sblock("root"):
            for mi in T.parallel(m):
                tmp = T.alloc_buffer((A, B), "float32")
                for i in range(A):
                    for j0, j1 in T.grid(B // VB, VB):
                        tmp[i, j0 * VB + j1] = T.float32(0)
                    for l in range(B):
                        for j0 in range(B // VB):
                            for j1 in T.vectorized(VB):
                                tmp[i, j0 * VB + j1] = tmp[i, j0 * VB + j1] \
                                    + x[mi, i * B + l] * right[l, j0 * VB + j1]
                for p in range(A):
                    for j0, j1 in T.grid(B // VB, VB):
                        y[mi, p * B + j0 * VB + j1] = T.float32(0)
                    for i in range(A):
                        for j0 in range(B // VB):
                            for j1 in T.vectorized(VB):
                                y[mi, p * B + j0 * VB + j1] = y[mi, p * B + j0 * VB + j1] \
                                    + left[i, p] * tmp[i, j0 * VB + j1]
    return hadamard
