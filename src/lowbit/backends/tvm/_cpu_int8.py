"""The decode GEMV on int8 dot products (``accuracy="int8"``, x86 AVX2), in TVMScript.

One kernel per linear, ``(x [M, K], qweight, scales, zero_points, bias) -> y [M, N]``: no
separate ``prep`` call (at SmolLM2's small shapes the per-call overhead is a large part of a
decode GEMV). For M <= ``GEMV_MAX_M``:

1. each activation row is quantized per weight group to int8, ``t_g = max(max|x_g|, 1e-8) /
   127``, ``xq = clamp(round(x / t_g), -127, 127)``
   (:func:`lowbit.numerics.quant.quantize_activation_per_group`), and written in the order
   the packed units hold their codes (``xq[m, g, c, u] = x[m, g*group + u*codes_per_unit +
   c]``, zero past K, as :func:`._cpu.prep_kernel` does for floats), with ``t_g sum xq_g``;
2. per weight row and group, the packed bytes are split into code planes with and/shift on
   16- or 32-byte vectors (plane ``c`` holds code ``c`` of each unit, and meets
   ``xq[m, g, c, :]``); ``vpmaddubsw`` multiplies the unsigned codes by the signed int8
   activations and adds pairs into int16, the planes and up to a few vectors are summed in
   int16 (bounded: ``planes * vectors * 2 * (2**bits - 1) * 127 <= 32767``, no saturation),
   ``vpmaddwd`` with ones widens to int32;
3. per group ``acc += float(dot) * s_g t_g`` in float32 lanes, the zero point as
   ``s_g z_g t_g sum xq_g``; 4 weight rows share each activation load; row blocks are split
   into at most 16 parallel tasks; the weight rows ~4 KB ahead are prefetched. TVM 0.27 turns every TIR buffer into a workspace
   allocation (``scope="local"`` ones inside a parallel loop too), so scratch and the
   per-task accumulators are allocated once per call, indexed by task.

M > ``GEMV_MAX_M`` (prefill) runs the float ``prep`` and GEMM of :mod:`._cpu` unchanged.
"""
from __future__ import annotations

from tvm.script import tirx as T

from lowbit.backends.tvm import _unpack
from lowbit.backends.tvm._cpu import GEMV_MAX_M, _largest_pow2_divisor, gemm_macro, prep_macro
from lowbit.backends.tvm.kernels import QuantLinearSpec

__all__ = ["matmul_kernel"]

_ROWS = 4           # weight rows per step
_TASKS = 16         # most parallel tasks
_PREFETCH = 4096    # bytes of weights prefetched ahead
_QMAX = 127.0
_LANES = 8          # float lanes of the activation quantization loops


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _vector_ops(vb: int) -> tuple[str, str]:
    """``(u8 x s8 -> s16 pair sums, s16 x s16 -> s32 pair sums)`` on ``vb``-byte vectors."""
    if vb == 32:
        return "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    return "llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"


def _quantize_macro(spec: QuantLinearSpec):
    """``quantize(x, xq, ts, tz, amax, qsum, m)``: rows of ``x`` to int8 per group, in packed
    order (step 1; ``amax``, ``qsum``: scratch of ``_LANES`` floats)."""
    K, NG, C, U, G = (spec.in_features, spec.n_groups, spec.codes_per_unit,
                      spec.units_per_group, spec.group_size)
    full = K // G                    # groups without padding
    tail = K - full * G              # real values of the padded last group (0: none)
    padded = tail > 0
    VL = _LANES
    lanes = T.ramp(0, 1, VL)

    def vec(v):
        return T.broadcast(T.float32(v), VL)

    def q(v, t):
        return T.max(T.min(T.nearbyint(v / t), T.float32(_QMAX)), T.float32(-_QMAX))

    @T.macro
    def quantize(x, xq, ts, tz, amax, qsum, m):
        for mi in range(m):
            for g in range(full):
                amax[lanes] = vec(0)
                qsum[lanes] = vec(0)
                for j in range(G // VL):
                    amax[lanes] = T.max(amax[lanes], T.fabs(x[mi, T.ramp(g * G + j * VL, 1, VL)]))
                for l in range(1, VL):
                    amax[0] = T.max(amax[0], amax[l])
                ts[mi, g] = T.max(amax[0], T.float32(1e-8)) / T.float32(_QMAX)
                for c, u0 in T.grid(C, U // VL):
                    amax[lanes] = q(x[mi, T.ramp(g * G + u0 * VL * C + c, C, VL)],
                                    T.broadcast(ts[mi, g], VL))
                    qsum[lanes] = qsum[lanes] + amax[lanes]
                    xq[mi, g, c, T.ramp(u0 * VL, 1, VL)] = T.Cast(f"int8x{VL}", amax[lanes])
                for l in range(1, VL):
                    qsum[0] = qsum[0] + qsum[l]
                tz[mi, g] = ts[mi, g] * qsum[0]
            if padded:
                amax[0] = T.float32(0)
                qsum[0] = T.float32(0)
                for j in range(tail):
                    amax[0] = T.max(amax[0], T.fabs(x[mi, full * G + j]))
                ts[mi, full] = T.max(amax[0], T.float32(1e-8)) / T.float32(_QMAX)
                for c, u in T.grid(C, U):
                    amax[0] = q(T.if_then_else(full * G + u * C + c < K,
                                               x[mi, full * G + u * C + c], T.float32(0)),
                                ts[mi, full])
                    qsum[0] = qsum[0] + amax[0]
                    xq[mi, full, c, u] = T.Cast("int8", amax[0])
                tz[mi, full] = ts[mi, full] * qsum[0]
    return quantize


def matmul_kernel(spec: QuantLinearSpec):
    """``(x, qweight, scales, zero_points, bias) -> y [M, N]`` (``spec.int8_dot`` must
    hold; absent zero points / bias: ``(1,)`` placeholders, as for :func:`._cpu.matmul_kernel`)."""
    if not spec.int8_dot:
        raise ValueError(f"{spec.name}: the int8-dot GEMV needs accuracy='int8', float "
                         "activations, 2/4-bit codes and 16-byte multiples of packed codes "
                         "per group")
    N, NG, C, U = spec.out_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    K, GB, ZB, bits = spec.in_features, spec.group_bytes, spec.zero_point_bytes, spec.bits
    VB = 32 if GB % 32 == 0 else 16         # bytes per vector
    L = VB // 4                              # int32 / float32 lanes of one dot vector
    NV = GB // VB                            # vectors per code plane of a group
    S = _largest_divisor(NV, 32767 // (C * 2 * ((1 << bits) - 1) * 127))
    R = _largest_pow2_divisor(N, _ROWS)
    NB = N // R
    P = _largest_divisor(NB, _TASKS)
    D = -(-_PREFETCH // (R * NG * GB))       # prefetch distance in row blocks
    mask = (1 << bits) - 1
    ubsw, wd = _vector_ops(VB)
    has_zp, has_bias = spec.has_zero_points, spec.has_bias
    zp_shape = (N, ZB) if has_zp else (1,)
    b_shape = (N,) if has_bias else (1,)
    prep, gemm = prep_macro(spec), gemm_macro(spec)
    quantize = _quantize_macro(spec)

    def plane(w, n, g, v, c):
        """Code ``c`` of each of the ``VB`` packed units at vector ``v`` (uint8 x VB)."""
        wv = w[n, g, T.ramp(v * VB, 1, VB)]
        if c:
            wv = T.shift_right(wv, T.broadcast(T.uint8(c * bits), VB))
        if c < C - 1:
            wv = wv & T.broadcast(T.uint8(mask), VB)
        return wv

    def dot(w, xq, n, mi, g, v0):
        """int32 x L partial dot products of vectors ``v0 .. v0+S-1`` of all planes."""
        acc = None
        for v in range(S):
            for c in range(C):
                t = T.call_llvm_pure_intrin(f"int16x{VB // 2}", ubsw, plane(w, n, g, v0 + v, c),
                                            xq[mi, g, c, T.ramp((v0 + v) * VB, 1, VB)])
                acc = t if acc is None else acc + t
        return T.call_llvm_pure_intrin(f"int32x{L}", wd, acc, T.broadcast(T.int16(1), VB // 2))

    def prefetch(w, n, g, b):
        """Software prefetch of byte ``b`` of group ``g`` of row ``n``: streamed from DRAM,
        the hardware prefetchers lose track of 4 interleaved rows (measured 1 thread:
        1536x576 0.088 -> 0.060 ms, 4096x4096 0.97 -> 0.70 ms)."""
        return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(w[n, g, b]),
                                  T.int32(0), T.int32(3), T.int32(1))

    def zero_f(zp, n, g):
        return T.Cast("float32", _unpack.zero_point(spec, zp, n, g))

    def out(v, bias, n):
        return v + bias[n] if has_bias else v

    lanes = T.ramp(0, 1, L)

    @T.prim_func(private=True, s_tir=True)
    def matmul(x_h: T.handle, w: T.Buffer((N, NG, GB), "uint8"),
               s: T.Buffer((N, NG), "float32"), zp: T.Buffer(zp_shape, "uint8"),
               bias: T.Buffer(b_shape, "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        with T.sblock("root"):
            if m <= GEMV_MAX_M:
                xq = T.alloc_buffer((GEMV_MAX_M, NG, C, U), "int8")
                # one allocation each per call (TVM 0.27 makes every buffer a workspace
                # allocation, even "local" ones): per-task accumulators indexed by task
                fbuf = T.alloc_buffer((2 * GEMV_MAX_M * NG + 2 * _LANES + P * R * (L + 1),),
                                      "float32")
                acci_all = T.alloc_buffer((P, R, L), "int32")
                ts = T.decl_buffer((GEMV_MAX_M, NG), "float32", data=fbuf.data)
                tz = T.decl_buffer((GEMV_MAX_M, NG), "float32", data=fbuf.data,
                                   elem_offset=GEMV_MAX_M * NG)
                amax = T.decl_buffer((_LANES,), "float32", data=fbuf.data,
                                     elem_offset=2 * GEMV_MAX_M * NG)
                qsum = T.decl_buffer((_LANES,), "float32", data=fbuf.data,
                                     elem_offset=2 * GEMV_MAX_M * NG + _LANES)
                quantize(x, xq, ts, tz, amax, qsum, m)
                for p in T.parallel(P):
                    accf = T.decl_buffer((R, L), "float32", data=fbuf.data,
                                         elem_offset=2 * GEMV_MAX_M * NG + 2 * _LANES
                                         + p * R * (L + 1))
                    zacc = T.decl_buffer((R,), "float32", data=fbuf.data,
                                         elem_offset=2 * GEMV_MAX_M * NG + 2 * _LANES
                                         + p * R * (L + 1) + R * L)
                    acci = T.decl_buffer((R, L), "int32", data=acci_all.data,
                                         elem_offset=p * R * L)
                    for nb, mi in T.grid(NB // P, m):
                        for r in T.unroll(R):
                            zacc[r] = T.float32(0)
                            accf[r, lanes] = T.broadcast(T.float32(0), L)
                        for g in range(NG):
                            for r in T.unroll(R):
                                acci[r, lanes] = T.broadcast(T.int32(0), L)
                                for v in T.unroll(max(GB // 64, 1)):
                                    T.evaluate(prefetch(w, T.min(
                                        (p * (NB // P) + nb + D) * R + r, N - 1), g, v * 64))
                            for v0 in range(NV // S):
                                for r in T.unroll(R):
                                    acci[r, lanes] = acci[r, lanes] + dot(
                                        w, xq, (p * (NB // P) + nb) * R + r, mi, g, v0 * S)
                            for r in T.unroll(R):
                                accf[r, lanes] = accf[r, lanes] \
                                    + T.Cast(f"float32x{L}", acci[r, lanes]) * T.broadcast(
                                        s[(p * (NB // P) + nb) * R + r, g] * ts[mi, g], L)
                                zacc[r] = zacc[r] + s[(p * (NB // P) + nb) * R + r, g] \
                                    * zero_f(zp, (p * (NB // P) + nb) * R + r, g) * tz[mi, g]
                        for r in range(R):
                            for l in range(1, L):
                                accf[r, 0] = accf[r, 0] + accf[r, l]
                            y[mi, (p * (NB // P) + nb) * R + r] = out(
                                accf[r, 0] - zacc[r], bias, (p * (NB // P) + nb) * R + r)
            else:
                xp = T.alloc_buffer((m, NG, C, U), "float32")
                xs = T.alloc_buffer((m, NG), "float32")
                rs = T.alloc_buffer((m,), "float32")
                prep(x, xp, xs, rs, m)
                gemm(xp, rs, w, s, zp, bias, y, m)
    return matmul
