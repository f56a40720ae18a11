"""Default CPU schedule for the graph's ordinary operators (norms, attention, softmax...).

TVM 0.27 has no CPU rule for them (dlight ``cpu`` matches only GEMV / reductions, and
MetaSchedule crashes in this wheel), so legalized operators would run on one thread. This
pass makes each block's outer data-parallel loops one ``parallel`` loop. lowbit's own kernels
carry ``tir.is_scheduled`` and are left alone.
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


def _parallel_outer(sch, block) -> None:
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
