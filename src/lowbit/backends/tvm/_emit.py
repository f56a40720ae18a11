"""Emit lowbit's operators into a Relax function being built (one place for both targets).

CPU (llvm): ``call_tir`` of the hand-scheduled kernels in :mod:`._cpu` (marked scheduled, so
no default schedule touches them); with ``accuracy="int8"`` the matmul of the linears it
applies to (:attr:`QuantLinearSpec.int8_dot`) comes from :mod:`._cpu_int8`, after a
``prepack`` of their scales that the build lifts into ``main_transform_params`` (``vnni``:
the target has AVX512-VNNI). GPU: ``emit_te`` of the compute definitions in :mod:`._te`,
scheduled later by dlight together with the rest of the graph.
"""
from __future__ import annotations

import dataclasses
import math

from tvm import relax

from lowbit.backends.tvm import _cpu, _cpu_int8, _cuda, _te
from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec

__all__ = ["Emitter"]


def _shape(expr) -> list:
    shape = expr.ty.shape
    if shape is None:
        raise ValueError(f"lowbit TVM lowering needs a known shape for {expr}")
    return list(shape)


class Emitter:
    """Adds lowbit kernels to a Relax ``BlockBuilder``; each distinct kernel once."""

    def __init__(self, cpu: bool, accuracy: str = "float", vnni: bool = False):
        self.cpu, self.accuracy, self.vnni = cpu, accuracy, vnni
        self._funcs: dict[str, relax.GlobalVar] = {}

    def _func(self, bb: relax.BlockBuilder, name: str, make) -> relax.GlobalVar:
        if name not in self._funcs:
            self._funcs[name] = bb.add_func(make(), name)
        return self._funcs[name]

    @staticmethod
    def _rows(bb, x, width: int):
        """``x [..., width] -> [M, width]``; returns the 2-D view and the leading dims."""
        lead = _shape(x)[:-1]
        m = math.prod(lead) if lead else 1
        return bb.emit(relax.op.reshape(x, [m, width])), lead, m

    def quant_linear(self, bb, x, qweight, scales, zero_points, bias,
                     spec: QuantLinearSpec):
        x2, lead, m = self._rows(bb, x, spec.in_features)
        n = spec.out_features
        if self.cpu:
            y = self._quant_linear_cpu(bb, x2, m, qweight, scales, zero_points, bias, spec)
        elif _cuda.handles(spec):
            name = f"lowbit_quant_linear_{spec.name}"
            gemv = self._func(bb, f"{name}_gemv", lambda: _cuda.quant_linear_kernel(spec))
            gemm = self._func(bb, f"{name}_gemm", lambda: _cuda.gemm_function(spec))
            fn = self._func(bb, name, lambda: _cuda.dispatch_function(spec, gemv, gemm))
            y = bb.emit(relax.Call(fn, [x2, qweight, scales, _or_placeholder(zero_points,
                                                                            "uint8")]))
        else:
            y = self._quant_linear_te(bb, x2, qweight, scales, zero_points, bias, spec)
        return bb.emit(relax.op.reshape(y, [*lead, n]))

    @staticmethod
    def _quant_linear_te(bb, x2, qweight, scales, zero_points, bias, spec):
        # emit_te passes only tensors: absent inputs and the spec are bound here
        def compute(x, w, s, *rest):
            zp = rest[0] if spec.has_zero_points else None
            b = rest[-1] if spec.has_bias else None
            return _te.quant_linear(x, w, s, zp, b, spec)
        extra = [t for t in (zero_points, bias) if t is not None]
        return bb.emit_te(compute, x2, qweight, scales, *extra,
                          primfunc_name_hint=f"lowbit_quant_linear_{spec.name}")

    def _quant_linear_cpu(self, bb, x2, m, qweight, scales, zero_points, bias, spec):
        zp, b = _or_placeholder(zero_points, "uint8"), _or_placeholder(bias, "float32")
        out = relax.TensorType([m, spec.out_features], "float32")
        int8 = dataclasses.replace(spec, accuracy=self.accuracy)
        if int8.int8_dot:       # it quantizes x itself; prepack reads weights only
            prepack = self._func(bb, f"lowbit_prepack_{int8.name}",
                                 lambda: _cpu_int8.prepack_kernel(int8))
            factors = bb.emit(relax.call_tir(prepack, [scales, zp], relax.TensorType(
                [spec.out_features // _cpu_int8.ROWS, spec.n_groups, 2 * _cpu_int8.ROWS],
                "float32")))
            name = f"lowbit_quant_linear_{int8.name}{'_vnni' if self.vnni else ''}"
            matmul = self._func(bb, name, lambda: _cpu_int8.matmul_kernel(int8, self.vnni))
            return bb.emit(relax.call_tir(matmul, [x2, qweight, scales, zp, factors, b], out))
        prep = self._func(bb, f"lowbit_prep_{spec.name}", lambda: _cpu.prep_kernel(spec))
        matmul = self._func(bb, f"lowbit_quant_linear_{spec.name}",
                            lambda: _cpu.matmul_kernel(spec))
        g, c, u = spec.n_groups, spec.codes_per_unit, spec.units_per_group
        f32 = "float32"
        prepped = bb.emit(relax.call_tir(prep, [x2], [
            relax.TensorType([m, g, c, u], f32), relax.TensorType([m, g], f32),
            relax.TensorType([m], f32)]))
        args = [relax.TupleGetItem(prepped, i) for i in range(3)] + [qweight, scales, zp, b]
        return bb.emit(relax.call_tir(matmul, args, out))

    def hadamard(self, bb, x, left, right, spec: HadamardSpec):
        width = spec.left * spec.right
        x2, lead, m = self._rows(bb, x, width)
        if self.cpu:
            fn = self._func(bb, f"lowbit_hadamard_{spec.name}",
                            lambda: _cpu.hadamard_kernel(spec))
            y = bb.emit(relax.call_tir(fn, [x2, left, right],
                                       relax.TensorType([m, width], "float32")))
        else:
            y = bb.emit_te(lambda a, lt, rt: _te.hadamard(a, lt, rt, spec), x2, left, right,
                           primfunc_name_hint=f"lowbit_hadamard_{spec.name}")
        return bb.emit(relax.op.reshape(y, lead + [width]))


def _or_placeholder(t, dtype: str):
    """``t``, or for an absent zero point / bias the ``(1,)``-shaped constant that lowbit's
    hand-written kernels take in its place."""
    return t if t is not None else relax.const(_zeros((1,), dtype))


def _zeros(shape, dtype):
    import numpy as np
    import tvm
    return tvm.runtime.tensor(np.zeros(shape, dtype=dtype))

