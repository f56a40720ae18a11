"""The compiled TVM model: a Relax VM over an exported library plus its parameters.

Saved as ``model.so`` (``export_library``: host code + device kernels), ``params.safetensors``
(every weight, packed ones included, in the order the model takes them) and ``tvm.json``
(target, parameter order). On CPUs the weights pass once through the library's
``main_transform_params`` when the model first runs (:func:`transform_params`). Loading runs
the library as it is (a CUDA library's kernels, which TVM's pip wheel keeps as CUDA C source,
are compiled for the GPU they load on), and needs only TVM's runtime library, not its
compiler.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lowbit.backends import ModelSpec
from lowbit.compiler.kv_cache import KVCacheSpec
from lowbit.errors import UsageError

__all__ = ["TvmExecutable", "LIBRARY", "PARAMS", "META", "transform_params"]

LIBRARY, PARAMS, META = "model.so", "params.safetensors", "tvm.json"


def _device(target: Mapping):
    import tvm
    return tvm.cuda(0) if target["kind"] == "cuda" else tvm.cpu(0)


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (``libtvm_runtime_cuda``) if ``import tvm`` did not.

    A full TVM loads it at import; a runtime-only TVM (the package without
    ``libtvm_compiler``, or ``TVM_USE_RUNTIME_LIB=1``: enough to run a saved artifact) skips
    every device backend, and ``load_module`` of a CUDA library then fails with "a loader of
    that name is not registered"."""
    from tvm import base
    if "tvm_runtime_cuda" in base._LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes
    runtime_dir = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        raise UsageError(
            f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so next to {runtime_dir}) "
            f"to run a CUDA artifact: {e}. Fix: run it where the NVIDIA driver (libcuda.so.1) "
            "and the CUDA 13 runtime (libcudart.so.13) are on the loader path "
            "(LD_LIBRARY_PATH)") from e
    if base._RUNTIME_ONLY:
        _register_nvrtc_for_device()


def _register_nvrtc_for_device() -> None:
    """A CUDA library built where no CUDA runtime is linked (the pip wheel) carries its kernels
    as CUDA C source, compiled by ``tvm_callback_cuda_compile`` when the library loads. TVM's
    own callback reads the architecture from the current compilation target, which a
    runtime-only TVM cannot construct; this one compiles for device 0's architecture with
    NVRTC (the ``cuda-bindings`` package), or with ``nvcc`` from PATH where that is missing."""
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    def compile_for_device(code):
        arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        try:
            return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
        except RuntimeError as e:
            if "cuda-bindings" not in str(e) or shutil.which("nvcc") is None:
                raise
        with tempfile.TemporaryDirectory(prefix="lowbit-nvcc-") as d:
            src, out = Path(d) / "kernels.cu", Path(d) / "kernels.cubin"
            src.write_text(code)
            subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", str(out), str(src)],
                           check=True, capture_output=True)
            return bytearray(out.read_bytes())
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_for_device, override=True)


def set_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (its default here is 1 thread)."""
    import tvm
    if threads > 0:
        tvm.get_global_func("runtime.config_threadpool")(0, threads)


def transform_params(vm, params: list) -> list:
    """The weights ``main`` takes: ``params`` through the library's
    ``main_transform_params`` (weight-only work lifted out of ``main`` at build, e.g. the int8
    GEMV's scale prepacking; :func:`lowbit.backends.tvm.build`) once, or unchanged when there
    is none (CUDA builds)."""
    from lowbit.backends.tvm import TRANSFORM_PARAMS
    if not vm.module.implements_function(TRANSFORM_PARAMS):
        return params
    return list(vm[TRANSFORM_PARAMS](params))


class TvmExecutable:
    def __init__(self, library, params: Sequence[torch.Tensor], spec: ModelSpec,
                 target: Mapping, backend: str, threads: int = 0,
                 library_path: Path | None = None):
        self.library, self.spec, self.target, self.backend = library, spec, dict(target), backend
        self.params = list(params)
        self.threads = threads
        self._vm = None
        self._device_params = None
        self._export = None
        self._library_path = library_path
        self.lowering: dict | None = None     # what the build did (fusion), for the manifest

    def can_run(self) -> bool:
        """False for a CUDA library on a machine without a CUDA device (it still saves)."""
        if self.target["kind"] != "cuda":
            return True
        try:
            return bool(_device(self.target).exist)
        except Exception:                  # noqa: BLE001 - no driver at all: no device
            return False

    def _ready(self):
        if self._vm is None:
            import tvm
            from tvm.runtime.vm import VirtualMachine   # runtime only: no compiler needed
            set_threads(self.threads)
            dev = _device(self.target)
            self._vm = VirtualMachine(self.library, dev)
            self._device_params = transform_params(self._vm, [
                tvm.runtime.tensor(p.contiguous().numpy(), dev) for p in self.params])
        return self._vm

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        import tvm
        vm = self._ready()
        dev = _device(self.target)
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[k].numpy()), dev)
                for k in self.spec.input_names]
        out = vm["main"](*args, *self._device_params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [torch.from_numpy(o.numpy()) for o in outs]

    def imported_kinds(self) -> list[str]:
        """Kinds of the modules the library links (``llvm``, ``cuda``, ...)."""
        lib = self.library if hasattr(self.library, "imports") else self.library.mod
        kinds, todo = [], [lib]
        while todo:
            m = todo.pop()
            kinds.append(m.kind if hasattr(m, "kind") else m.type_key)
            todo.extend(m.imports)
        return kinds

    def _exported(self) -> Path:
        """The library exported once (linking takes seconds), kept for ``save``/``nbytes``."""
        if self._library_path is not None:
            return self._library_path
        if self._export is None:
            self._export = tempfile.TemporaryDirectory(prefix="lowbit-tvm-")
            self.library.export_library(str(Path(self._export.name) / LIBRARY))
        return Path(self._export.name) / LIBRARY

    @property
    def nbytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.params)
        return self._exported().stat().st_size + params

    def save(self, directory: Path) -> list[str]:
        shutil.copy2(self._exported(), directory / LIBRARY)
        save_file({f"p{i:05d}": p.detach().contiguous() for i, p in enumerate(self.params)},
                  str(directory / PARAMS))
        (directory / META).write_text(json.dumps(
            {"target": self.target, "params": len(self.params), "threads": self.threads}))
        return [LIBRARY, PARAMS, META]


def load(directory: Path, manifest: Mapping, backend: str) -> TvmExecutable:
    import tvm
    meta = json.loads((directory / META).read_text())
    state = load_file(str(directory / PARAMS))
    params = [state[f"p{i:05d}"] for i in range(meta["params"])]
    m = manifest["model"]
    spec = ModelSpec(kind=m["kind"], input_names=tuple(m.get("graph_inputs") or m["input_names"]),
                     output_names=tuple(m.get("graph_outputs") or ()),
                     cache=KVCacheSpec.from_dict(m.get("cache")))
    if meta["target"]["kind"] == "cuda":
        ensure_cuda_runtime()
    library = tvm.runtime.load_module(str(directory / LIBRARY))
    exe = TvmExecutable(library, params, spec, meta["target"], backend, meta.get("threads", 0),
                        library_path=directory / LIBRARY)
    exe.lowering = manifest.get("lowering")
    return exe
