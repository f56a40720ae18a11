"""The decode GEMV on int8 dot products (``accuracy="int8"``, x86 AVX2 / AVX512-VNNI), in TVMScript.

Two kernels per linear (docs/explanation/tvm-backend.md has the measured reasons):

* ``prepack`` (``(scales, zero_points) -> factors [N/ROWS, G, 2*ROWS]``, weights only): the
  scales and the products ``scale * zero_point`` as float32, transposed into blocks of
  ``ROWS`` weight rows (``f[b, g, r] = s[b*ROWS + r, g]``, ``f[b, g, ROWS + r] = s * z``), so
  that one vector load gives a group's factors for a whole block. It reads parameters only:
  the llvm build lifts it into ``main_transform_params`` (:func:`lowbit.backends.tvm.build`),
  which runs once when the model loads, like ONNX Runtime's weight prepacking; the stored
  artifact keeps the packed layout of :mod:`lowbit.numerics.packing` unchanged.
* ``matmul`` (``(x, qweight, scales, zero_points, factors, bias) -> y [M, N]``). For M <=
  ``GEMV_MAX_M``:

  1. each activation row is quantized per weight group to int8, ``t_g = max(max|x_g|, 1e-8)
     / 127``, ``xq = clamp(round(x / t_g), -127, 127)``
     (:func:`lowbit.numerics.quant.quantize_activation_per_group`), and written in the order
     the packed units hold their codes (``xq[m, g, c, u] = x[m, g*group + u*codes_per_unit +
     c]``, zero past K, as :func:`._cpu.prep_kernel` does for floats), with ``t_g sum xq_g``;
  2. per weight row and group, the packed bytes are split into code planes (and/shift on 16-
     or 32-byte vectors; plane ``c`` holds code ``c`` of each unit and meets
     ``xq[m, g, c, :]``) and multiplied with the int8 activations: ``vpdpbusd`` where the
     target has AVX512-VNNI, else ``vpmaddubsw`` (pairs into int16, summed over planes and up
     to a few vectors, bounded: ``planes * vectors * 2 * (2**bits - 1) * 127 <= 32767``, no
     saturation) and ``vpmaddwd`` with ones to int32 -- exact integer sums either way;
  3. the partial sums of the ``ROWS`` rows of a block are reduced together (``vphaddd``)
     into one int32 vector with a lane per row, converted once, and accumulated as
     ``acc += float(dot) * f[b, g, :R] * t_g - f[b, g, R:] * t_g sum xq_g`` (the zero
     point's term), ``ROWS`` rows per vector operation.

  The sum over ``_CHUNK`` groups is one expression, so its partial sums stay in registers
  (TVM 0.27 turns every TIR buffer into a workspace allocation: a loop-carried accumulator
  buffer costs a store and a load per step). Each step prefetches the same step of the row
  block ``_PREFETCH`` bytes ahead into L2; row blocks are split into at most 16 parallel
  tasks, each of which first prefetches its own first blocks.

M > ``GEMV_MAX_M`` (prefill) runs the float ``prep`` and GEMM of :mod:`._cpu` unchanged.
"""
from __future__ import annotations

from tvm.script import tirx as T

from lowbit.backends.tvm import _unpack
from lowbit.backends.tvm._cpu import GEMV_MAX_M, gemm_macro, prep_macro
from lowbit.backends.tvm.kernels import INT8_DOT_ROWS, QuantLinearSpec

__all__ = ["matmul_kernel", "prepack_kernel", "ROWS"]

ROWS = INT8_DOT_ROWS    # weight rows per block (the lanes of the float accumulator)
_TASKS = 16             # most parallel tasks
_PREFETCH = 16384       # bytes of weights prefetched ahead (into L2)
_CHUNK = 4              # groups per accumulation statement (and per prefetch)
_QMAX = 127.0
_LANES = 8              # float lanes of the activation quantization loops


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _vector_ops(vb: int) -> tuple[str, str, str]:
    """``(u8 x s8 -> s16 pair sums, s16 x s16 -> s32 pair sums, s32 pair sums)`` on
    ``vb``-byte vectors."""
    if vb == 32:
        return "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", "llvm.x86.avx2.phadd.d"
    return ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd",
            "llvm.x86.ssse3.phadd.d.128")


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


def prepack_kernel(spec: QuantLinearSpec):
    """``(scales [N, G], zero_points) -> factors [N/ROWS, G, 2*ROWS]``: scales and scale x
    zero point, transposed into row blocks (module doc; runs once, at load)."""
    N, NG, R = spec.out_features, spec.n_groups, ROWS
    has_zp = spec.has_zero_points
    zp_shape = (N, spec.zero_point_bytes) if has_zp else (1,)

    @T.prim_func(private=True, s_tir=True)
    def prepack(s: T.Buffer((N, NG), "float32"), zp: T.Buffer(zp_shape, "uint8"),
                f: T.Buffer((N // R, NG, 2 * R), "float32")):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        for b, g, r in T.grid(N // R, NG, R):
            with T.sblock("prepack"):
                f[b, g, r] = s[b * R + r, g]
                f[b, g, R + r] = s[b * R + r, g] * T.Cast(
                    "float32", _unpack.zero_point(spec, zp, b * R + r, g))
    return prepack


def matmul_kernel(spec: QuantLinearSpec, vnni: bool = False):
    """``(x, qweight, scales, zero_points, factors, bias) -> y [M, N]`` (``spec.int8_dot``
    must hold; absent zero points / bias: ``(1,)`` placeholders, as for
    :func:`._cpu.matmul_kernel`; ``factors`` from :func:`prepack_kernel`). ``vnni``: use
    AVX512-VNNI ``vpdpbusd`` (the target must have ``avx512vnni`` and ``avx512vl``)."""
    if not spec.int8_dot:
        raise ValueError(f"{spec.name}: the int8-dot GEMV needs accuracy='int8', float "
                         "activations, 2/4-bit codes, 16-byte multiples of packed codes "
                         f"per group and a multiple of {ROWS} output features")
    N, NG, C, U = spec.out_features, spec.n_groups, spec.codes_per_unit, spec.units_per_group
    K, GB, ZB, bits = spec.in_features, spec.group_bytes, spec.zero_point_bytes, spec.bits
    R = ROWS
    VB = 32 if GB % 32 == 0 else 16         # bytes per vector
    L = VB // 4                              # int32 lanes of one dot vector
    NV = GB // VB                            # vectors per code plane of a group
    S = NV if vnni else _largest_divisor(NV, 32767 // (C * 2 * ((1 << bits) - 1) * 127))
    NB = N // R
    P = _largest_divisor(NB, _TASKS)
    mask = (1 << bits) - 1
    ubsw, wd, hadd = _vector_ops(VB)
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

    def dot(w, xq, n, mi, g):
        """int32 x L partial dot products of row ``n`` and group ``g``."""
        total = None
        for v0 in range(0, NV, S):
            acc = None
            for v in range(v0, v0 + S):
                for c in range(C):
                    a = xq[mi, g, c, T.ramp(v * VB, 1, VB)]
                    if vnni:
                        acc = T.call_llvm_pure_intrin(
                            f"int32x{L}", f"llvm.x86.avx512.vpdpbusd.{VB * 8}",
                            T.broadcast(T.int32(0), L) if acc is None else acc,
                            plane(w, n, g, v, c), a)
                    else:
                        t = T.call_llvm_pure_intrin(f"int16x{VB // 2}", ubsw,
                                                    plane(w, n, g, v, c), a)
                        acc = t if acc is None else acc + t
            if not vnni:
                acc = T.call_llvm_pure_intrin(f"int32x{L}", wd, acc,
                                              T.broadcast(T.int16(1), VB // 2))
            total = acc if total is None else total + acc
        return total

    def four(d):
        """int32 x 4: the sums of four rows' partial-sum vectors."""
        h = T.call_llvm_pure_intrin(
            f"int32x{L}", hadd, T.call_llvm_pure_intrin(f"int32x{L}", hadd, d[0], d[1]),
            T.call_llvm_pure_intrin(f"int32x{L}", hadd, d[2], d[3]))
        if L == 8:                  # [r0 r1 r2 r3 | r0 r1 r2 r3] halves of each row's sum
            h = T.vectorlow("int32x4", h) + T.vectorhigh("int32x4", h)
        return h

    def block(w, xq, f, ts, tz, b, mi, groups):
        """float32 x ROWS: the sum over ``groups`` for rows ``b*ROWS ..`` of ``y[mi]``."""
        acc = None
        for g in groups:
            d = [dot(w, xq, b * R + r, mi, g) for r in range(R)]
            h = four(d) if R == 4 else T.vectorcombine(f"int32x{R}", four(d[:4]), four(d[4:]))
            t = (T.Cast(f"float32x{R}", h) * f[b, g, T.ramp(0, 1, R)]
                 * T.broadcast(ts[mi, g], R)
                 - f[b, g, T.ramp(R, 1, R)] * T.broadcast(tz[mi, g], R))
            acc = t if acc is None else acc + t
        return acc

    CH = min(_CHUNK, NG)                     # groups per statement
    NCH, TAIL = NG // CH, NG % CH > 0
    D = -(-_PREFETCH // (R * NG * GB))       # prefetch distance in row blocks

    def prefetch(address):
        """``prefetcht2``: into L2, not L1 (locality 1). Streamed from DRAM, ``prefetcht0``
        reached 0.40-0.46 ms on a 4096x4096 int4 layer and ``prefetcht2`` 0.20-0.28 ms; no
        software prefetch at all, 0.49-0.56 ms (Zen 4, 2 threads, 16 KB ahead)."""
        return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0),
                                  T.int32(1), T.int32(1))

    def prefetch_macro(ng: int):
        wl, fl = -(-(ng * GB) // 64), -(-(ng * 8 * R) // 64)    # cache lines

        @T.macro
        def prefetch_groups(w, f, b, g0):
            """Prefetch groups ``g0 .. g0+ng-1`` of row block ``b`` (``b < NB``)."""
            for r, j in T.grid(R, wl):
                T.evaluate(prefetch(T.address_of(w[b * R + r, g0 + j * 64 // GB, j * 64 % GB])))
            for j in range(fl):
                T.evaluate(prefetch(T.address_of(f[b, g0 + j * 64 // (8 * R), 0])))
        return prefetch_groups

    prefetch_chunk, prefetch_tail = prefetch_macro(CH), prefetch_macro(max(NG % CH, 1))

    def out(v, bias, b):
        return v + bias[T.ramp(b * R, 1, R)] if has_bias else v

    @T.prim_func(private=True, s_tir=True)
    def matmul(x_h: T.handle, w: T.Buffer((N, NG, GB), "uint8"),
               s: T.Buffer((N, NG), "float32"), zp: T.Buffer(zp_shape, "uint8"),
               f: T.Buffer((NB, NG, 2 * R), "float32"),
               bias: T.Buffer(b_shape, "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        with T.sblock("root"):
            if m <= GEMV_MAX_M:
                xq = T.alloc_buffer((GEMV_MAX_M, NG, C, U), "int8")
                fbuf = T.alloc_buffer((2 * GEMV_MAX_M * NG + 2 * _LANES + P * R,), "float32")
                ts = T.decl_buffer((GEMV_MAX_M, NG), "float32", data=fbuf.data)
                tz = T.decl_buffer((GEMV_MAX_M, NG), "float32", data=fbuf.data,
                                   elem_offset=GEMV_MAX_M * NG)
                amax = T.decl_buffer((_LANES,), "float32", data=fbuf.data,
                                     elem_offset=2 * GEMV_MAX_M * NG)
                qsum = T.decl_buffer((_LANES,), "float32", data=fbuf.data,
                                     elem_offset=2 * GEMV_MAX_M * NG + _LANES)
                quantize(x, xq, ts, tz, amax, qsum, m)
                for p in T.parallel(P):
                    acc = T.decl_buffer((R,), "float32", data=fbuf.data,
                                        elem_offset=2 * GEMV_MAX_M * NG + 2 * _LANES + p * R)
                    # a task's first blocks: nothing ran ahead of them
                    for nb in range(T.min(D, NB // P)):
                        for c in range(NCH):
                            prefetch_chunk(w, f, p * (NB // P) + nb, c * CH)
                        if TAIL:
                            prefetch_tail(w, f, p * (NB // P) + nb, NCH * CH)
                    for nb, mi in T.grid(NB // P, m):
                        acc[T.ramp(0, 1, R)] = T.broadcast(T.float32(0), R)
                        for c in range(NCH):
                            if mi == 0:
                                prefetch_chunk(w, f, T.min(p * (NB // P) + nb + D, NB - 1),
                                               c * CH)
                            acc[T.ramp(0, 1, R)] = acc[T.ramp(0, 1, R)] + block(
                                w, xq, f, ts, tz, p * (NB // P) + nb, mi,
                                [c * CH + i for i in range(CH)])
                        if TAIL:
                            if mi == 0:
                                prefetch_tail(w, f, T.min(p * (NB // P) + nb + D, NB - 1),
                                              NCH * CH)
                            acc[T.ramp(0, 1, R)] = acc[T.ramp(0, 1, R)] + block(
                                w, xq, f, ts, tz, p * (NB // P) + nb, mi, range(NCH * CH, NG))
                        y[mi, T.ramp((p * (NB // P) + nb) * R, 1, R)] = out(
                            acc[T.ramp(0, 1, R)], bias, p * (NB // P) + nb)
            else:
                xp = T.alloc_buffer((m, NG, C, U), "float32")
                xs = T.alloc_buffer((m, NG), "float32")
                rs = T.alloc_buffer((m,), "float32")
                prep(x, xp, xs, rs, m)
                gemm(xp, rs, w, s, zp, bias, y, m)
    return matmul
