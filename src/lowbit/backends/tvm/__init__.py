"""Apache TVM backend: the compiled graph lowered to Relax, lowbit nodes to TIR kernels.

Two registered backends share this package: ``tvm-llvm`` (targets ``llvm``, ``tvm``; CPU,
hand-scheduled kernels in :mod:`._cpu`) and ``tvm-cuda`` (target ``cuda``; compute definitions
in :mod:`._te` scheduled by TVM's dlight GPU rules). ``tvm`` (apache-tvm 0.27) is imported
only when one of them lowers or loads a model.

Options: ``mcpu`` (llvm; default ``x86-64-v3`` on x86-64 hosts -- AVX2+FMA, portable to
any such CPU -- or ``native`` for this CPU, resolved with ``llvm_get_system_cpu`` because
LLVM's own ``native`` silently yields generic code), ``threads`` (CPU thread pool; 0 = TVM's
default), ``accuracy`` (llvm; ``"float"``, the default, or ``"int8"``: the decode GEMV of 2/4-bit
weights rounds each activation group to int8 and uses int8 dot products -- AVX512-VNNI where
the target has it, else AVX2 --, ~1e-2 relative error like ONNX Runtime's ``accuracy_level=4``;
needs an AVX2 target), ``arch`` (cuda;
default ``sm_90``), ``target`` (a full JSON-dict target).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Mapping

from lowbit.backends import BackendInfo, ModelSpec
from lowbit.errors import LoweringError, UsageError

__all__ = ["LLVM_BACKEND", "CUDA_BACKEND", "resolve_target", "build", "has_vnni",
           "TRANSFORM_PARAMS"]

_OPTIONS = {"llvm": {"mcpu": None, "threads": 0, "accuracy": "float", "target": None},
            "cuda": {"arch": "sm_90", "target": None}}


def _require():
    try:
        import tvm  # noqa: F401
    except ImportError as e:
        raise UsageError("the TVM backend needs the [tvm] extra (apache-tvm 0.27): "
                         "pip install 'lowbit[tvm]'") from e


def resolve_target(kind: str, options: Mapping) -> dict:
    """The JSON-dict target for ``kind`` ('llvm' or 'cuda') and the backend options."""
    import tvm
    if options.get("target"):
        return dict(options["target"])
    if kind == "cuda":
        return {"kind": "cuda", "arch": options.get("arch") or "sm_90"}
    mcpu = options.get("mcpu")
    if mcpu == "native":
        mcpu = tvm.target.codegen.llvm_get_system_cpu()
    elif mcpu is None and platform.machine() in ("x86_64", "AMD64"):
        mcpu = "x86-64-v3"
    return {"kind": "llvm", **({"mcpu": mcpu} if mcpu else {})}


#: FuseTIR of TVM 0.27 fails on operator groups whose shapes mix two symbolic lengths
#: (``past + new`` of the KV-cache form): "Check failed: (VarRemapGet(source) == nullptr)"
_FUSE_TIR_BUG = "VarRemapGet"


def has_vnni(target: Mapping) -> bool:
    """Whether an llvm target has AVX512-VNNI with 128/256-bit forms (``vpdpbusd``)."""
    import tvm
    tgt = tvm.target.Target(dict(target))
    return tgt.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features(
        ["avx512vnni", "avx512vl"], tgt))


#: the function TVM's ``LiftTransformParams`` makes of ``main``'s weight-only computations
TRANSFORM_PARAMS = "main_transform_params"


def build(mod, target: Mapping, fuse: bool = True):
    """``tvm.compile`` with TVM's default pipeline for ``target``; on CPUs with
    :func:`._schedule.parallelize_cpu` between legalization and lowering. ``fuse=False``
    drops operator fusion (``FuseOps``/``FuseTIR``): every Relax op becomes its own kernel.

    On CPUs, when ``main`` says how many of its leading parameters are inputs (attribute
    ``num_input``), what it computes from the weights alone (the int8 GEMV's ``prepack``,
    weight transposes) is lifted into :data:`TRANSFORM_PARAMS` (weights -> the weights ``main``
    then takes), to run once when the model loads instead of on every call."""
    import tvm
    from tvm import relax
    tgt = tvm.target.Target(dict(target))
    if tgt.kind.name != "llvm":
        return tvm.compile(mod, target=tgt, relax_pipeline=relax.get_default_pipeline(tgt))
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from lowbit.backends.tvm._schedule import parallelize_cpu
    lift = [relax.transform.LiftTransformParams()] \
        if mod["main"].attrs and "num_input" in mod["main"].attrs else []
    passes = (lift + cpu.library_dispatch_passes(tgt) + cpu.legalize_passes(tgt)
              + [parallelize_cpu] + cpu.dataflow_lower_passes(tgt) + cpu.finalize_passes(tgt))
    if not fuse:
        passes = [p for p in passes if p.info.name not in ("FuseOps", "FuseTIR")]

    @tvm.transform.module_pass(opt_level=0, name="lowbit.CPUPipeline")
    def pipeline(m, _ctx):
        with tgt:
            return tvm.transform.Sequential(passes)(m)
    return tvm.compile(mod, target=tgt, relax_pipeline=pipeline)


def _build_recorded(mod, target: Mapping, cache_form: bool) -> tuple[object, dict]:
    """Build; a cache-form graph that hits TVM's FuseTIR bug is rebuilt unfused, and the
    returned record (for the manifest's ``lowering``) says so."""
    try:
        return build(mod, target), {"operator_fusion": True}
    except Exception as e:                       # noqa: BLE001 - re-raised unless the bug
        if not (cache_form and target.get("kind") == "llvm" and _FUSE_TIR_BUG in str(e)):
            raise
    return build(mod, target, fuse=False), {
        "operator_fusion": False,
        "reason": "TVM 0.27 FuseTIR fails on the KV-cache form's past+new shapes "
                  "(VarRemapGet check); built with every op as its own kernel"}


def _options(kind: str, options: Mapping) -> dict:
    from lowbit.backends.tvm.kernels import ACCURACIES
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        raise UsageError(f"unknown tvm ({kind}) option(s) {unknown}; valid: "
                         f"{sorted(_OPTIONS[kind])}")
    opts = {**_OPTIONS[kind], **options}
    if kind == "llvm" and opts["accuracy"] not in ACCURACIES:
        raise UsageError(f"tvm (llvm) option accuracy={opts['accuracy']!r} is not one of "
                         f"{list(ACCURACIES)}")
    return opts


def _check_accuracy(target: Mapping, accuracy: str) -> None:
    """``accuracy="int8"`` emits AVX2 intrinsics: refuse targets without AVX2."""
    import tvm
    if accuracy != "float" and not tvm.target.codegen.target_has_features(
            "avx2", tvm.target.Target(dict(target))):
        raise UsageError(f"tvm (llvm) option accuracy={accuracy!r} needs an x86 target with "
                         f"AVX2 (e.g. mcpu 'x86-64-v3' or 'native'); got {dict(target)}")


def _lower(kind: str, graph, spec: ModelSpec, options: Mapping):
    _require()
    from lowbit.backends.tvm._import import import_graph
    from lowbit.backends.tvm._runtime import TvmExecutable
    opts = _options(kind, options)
    target = resolve_target(kind, opts)
    accuracy = opts.get("accuracy", "float")
    _check_accuracy(target, accuracy)
    for node, q in graph.quant_linears().items():
        if q["act_bits"] and not q.get("act_symmetric", True):
            raise LoweringError(
                f"layer '{q['name']}' (node {node}): asymmetric per-token activations "
                "(act_quant symmetric: false) are not lowered to TVM yet. Fix: act_quant with "
                "symmetric: true, or target='onnxruntime' / 'torch'")
    mod, params = import_graph(graph.sync(), spec, cpu=kind == "llvm", accuracy=accuracy,
                               vnni=kind == "llvm" and has_vnni(target))
    try:
        library, lowering = _build_recorded(mod, target, spec.cache is not None)
    except Exception as e:
        raise LoweringError(f"TVM build for {target} failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[-1][:400]}") from e
    exe = TvmExecutable(library, params, spec, target, f"tvm-{kind}", int(opts.get("threads", 0)))
    exe.lowering = lowering
    if kind == "cuda" and "cuda" not in exe.imported_kinds():
        raise LoweringError("TVM built no CUDA kernel for this graph (no dlight rule matched)")
    return exe


def _load(kind: str, directory: Path, manifest: Mapping):
    _require()
    from lowbit.backends.tvm._runtime import load
    return load(directory, manifest, f"tvm-{kind}")


LLVM_BACKEND = BackendInfo(
    name="tvm-llvm", lower=lambda g, s, o: _lower("llvm", g, s, o),
    load=lambda d, m: _load("llvm", d, m), aliases=("llvm", "tvm"),
    description="Apache TVM for CPUs: Relax + hand-scheduled TIR low-bit kernels (.so)",
    options=tuple(_OPTIONS["llvm"]), kv_cache=True)
CUDA_BACKEND = BackendInfo(
    name="tvm-cuda", lower=lambda g, s, o: _lower("cuda", g, s, o),
    load=lambda d, m: _load("cuda", d, m), aliases=("cuda",),
    description="Apache TVM for NVIDIA GPUs: Relax + dlight-scheduled TIR kernels (.so)",
    options=tuple(_OPTIONS["cuda"]), kv_cache=False)
