"""Single lowbit operators compiled through the same emitter as whole models (tests, bench).

Example:
    >>> import torch
    >>> from lowbit.backends.tvm.kernels import HadamardSpec
    >>> from lowbit.numerics.hadamard import hadamard_matrix
    >>> h = hadamard_matrix(8).float()
    >>> y = compile_hadamard(HadamardSpec(1, 8))(torch.eye(8), torch.ones(1, 1), h)
    >>> bool(torch.allclose(y, h, atol=1e-6))
    True
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from lowbit.backends.tvm.kernels import HadamardSpec, QuantLinearSpec

__all__ = ["compile_quant_linear", "quant_linear_library", "compile_hadamard", "Kernel"]


class Kernel:
    """A compiled one-operator Relax module: call it on torch tensors (None = absent)."""

    def __init__(self, library, target: Mapping, threads: int = 0):
        import tvm
        from tvm.runtime.vm import VirtualMachine
        from lowbit.backends.tvm._runtime import set_threads
        set_threads(threads)
        self.library = library
        self.device = tvm.cuda(0) if target["kind"] == "cuda" else tvm.cpu(0)
        self.vm = VirtualMachine(library, self.device)

    def to_device(self, *tensors):
        import tvm
        return [tvm.runtime.tensor(np.ascontiguousarray(t.numpy()), self.device)
                for t in tensors if t is not None]

    def weights(self, *tensors: torch.Tensor | None) -> list:
        """The weights (every argument after the input) on the device, as ``main`` takes
        them: through the build's ``main_transform_params`` where it has one."""
        from lowbit.backends.tvm._runtime import transform_params
        return transform_params(self.vm, self.to_device(*tensors))

    def __call__(self, x: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
        return torch.from_numpy(self.vm["main"](*self.to_device(x),
                                                *self.weights(*weights)).numpy())

    def raw(self) -> Callable:
        """``main(x, *self.weights(...))`` on device tensors (for timing without host
        copies or weight transforms)."""
        return self.vm["main"]


def _library(make_body, arg_types, target, accuracy="float", vnni=None):
    """The built (not yet loaded) library of a one-operator module, and its target
    (``vnni``: None = as the target allows, like a model's lowering)."""
    from tvm import relax
    from lowbit.backends.tvm import build, has_vnni, resolve_target
    from lowbit.backends.tvm._emit import Emitter
    tgt = resolve_target(target, {"mcpu": "native"}) if isinstance(target, str) else target
    vnni = has_vnni(tgt) if vnni is None else vnni
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, dtype))
              for name, shape, dtype in arg_types]
    with bb.function("main", params, attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(make_body(bb, Emitter(tgt["kind"] == "llvm", accuracy, vnni),
                                           params))
        bb.emit_func_output(out)
    return build(bb.get(), tgt), tgt


def _build(make_body, arg_types, target, threads, accuracy="float", vnni=None):
    library, tgt = _library(make_body, arg_types, target, accuracy, vnni)
    return Kernel(library, tgt, threads)


def compile_quant_linear(spec: QuantLinearSpec, target="llvm", threads: int = 0,
                         accuracy: str = "float", vnni: bool | None = None):
    """``kernel(x [..., K], qweight, scales, zero_points | None, bias | None) -> y [..., N]``
    with a dynamic number of rows; zero_points / bias must match ``spec``; ``accuracy`` as the
    llvm backend option; ``vnni``: force the int8 GEMV's dot-product instructions (None: as
    the target allows)."""
    types, body = _quant_linear_module(spec)
    kernel = _build(body, types, target, threads, accuracy, vnni)
    n = spec.out_features

    def run(x, qweight, scales, zero_points=None, bias=None):
        y = Kernel.__call__(kernel, x.reshape(-1, x.shape[-1]), qweight, scales, zero_points,
                            bias)
        return y.reshape(*x.shape[:-1], n)
    return _Bound(kernel, run)


def quant_linear_library(spec: QuantLinearSpec, target, accuracy: str = "float",
                         vnni: bool | None = None):
    """The library :func:`compile_quant_linear` would run, built without loading it (a CUDA
    library builds on a machine without a GPU; ``export_library`` it and run it elsewhere;
    an llvm one for another CPU, to read its code)."""
    types, body = _quant_linear_module(spec)
    return _library(body, types, target, accuracy, vnni)[0]


def _quant_linear_module(spec: QuantLinearSpec):
    from tvm import tirx
    m = tirx.Var("m", "int64")
    n, ng = spec.out_features, spec.n_groups
    types = [("x", [m, spec.in_features], "float32"),
             ("qweight", [n, ng, spec.group_bytes], "uint8"), ("scales", [n, ng], "float32")]
    if spec.has_zero_points:
        types.append(("zero_points", [n, spec.zero_point_bytes], "uint8"))
    if spec.has_bias:
        types.append(("bias", [n], "float32"))

    def body(bb, emitter, p):
        zp = p[3] if spec.has_zero_points else None
        bias = p[-1] if spec.has_bias else None
        return emitter.quant_linear(bb, p[0], p[1], p[2], zp, bias, spec)
    return types, body


def compile_hadamard(spec: HadamardSpec, target="llvm", threads: int = 0):
    """``kernel(x [..., a*b], left [a, a], right [b, b]) -> y``."""
    from tvm import tirx
    m = tirx.Var("m", "int64")
    width = spec.left * spec.right
    types = [("x", [m, width], "float32"), ("left", [spec.left, spec.left], "float32"),
             ("right", [spec.right, spec.right], "float32")]
    kernel = _build(lambda bb, e, p: e.hadamard(bb, p[0], p[1], p[2], spec), types, target,
                    threads)

    def run(x, left, right):
        return Kernel.__call__(kernel, x.reshape(-1, width), left, right).reshape(x.shape)
    return _Bound(kernel, run)


class _Bound:
    """A :class:`Kernel` whose call reshapes ``[..., K]`` inputs to rows and back."""

    def __init__(self, kernel: Kernel, run):
        self.kernel, self._run = kernel, run

    def __call__(self, *args):
        return self._run(*args)

    def __getattr__(self, name):
        return getattr(self.kernel, name)
