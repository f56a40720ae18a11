"""Default CPU schedule for the graph's ordinary operators (norms, attention, softmax...).

TVM 0.27 has no CPU rule for them (dlight ``cpu`` matches only GEMV / reductions, and
MetaSchedule crashes in this wheel), so legalized operators would run on one thread, and a
legalized matmul ``y[.., i, j] = sum_k a[.., i, k] b[.., k, j]`` walks ``b`` down a column
in its innermost loop. This pass

* matmul-like blocks (spatial loops, then one reduction loop): tiles ``j`` by 64 and orders
  the loops ``(j_outer, .., i, k, j_inner)``, the outer ones fused into one parallel loop:
  the inner loop is a contiguous axpy LLVM vectorizes, and one 64-column panel of ``b``
  (``K x 64`` floats) serves every row before the next is read;
* other blocks: the outer data-parallel loops fused into one ``parallel`` loop.

lowbit's own kernels carry ``tir.is_scheduled`` and are left alone.
"""
from __future__ import annotations

import tvm
from tvm import tirx

__all__ = ["parallelize_cpu"]


def _parallelize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        try:
            _parallel_outer(sch, block)
        except Exception:   # a block no rule fits keeps its serial loops (still correct)
            continue
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


_PANEL = 64


def _matmul_like(sch, block) -> bool:
    loops = sch.get_loops(block)
    kinds = [it.iter_type for it in sch.get(block).iter_vars]
    if len(loops) != len(kinds) or len(kinds) < 3 or kinds[-1] != tirx.IterVar.CommReduce \
            or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return False
    *spatial, k = loops
    jo, ji = sch.split(spatial[-1], [None, _PANEL])
    sch.reorder(jo, *spatial[:-1], k, ji)
    sch.parallel(sch.fuse(jo, *spatial[:-1]))
    sch.decompose_reduction(block, k)
    return True


def _parallel_outer(sch, block) -> None:
    if _matmul_like(sch, block):
        return
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    spatial = []
    for loop, it in zip(loops, iters):
        if it.iter_type != tirx.IterVar.DataPar:
            break
        spatial.append(loop)
    if not spatial:
        return
    outer = sch.fuse(*spatial[:2]) if len(spatial) > 1 else spatial[0]
    sch.parallel(outer)


@tvm.transform.module_pass(opt_level=0, name="lowbit.ParallelizeCPU")
def parallelize_cpu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tir.is_scheduled" in func.attrs:
            continue
        updates[gv] = _parallelize(func)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
