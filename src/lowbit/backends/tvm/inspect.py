"""What a compiled TVM library holds: its CUDA kernels (names, threads, source size).

Example (needs a compiled CUDA executable)::

    >>> from lowbit.backends.tvm.inspect import cuda_kernels    # doctest: +SKIP
    >>> cuda_kernels(cm.executable)[0]                            # doctest: +SKIP
    {'name': 'lowbit_quant_linear_..._kernel', 'threads_per_block': 256, 'source_bytes': 2417}
"""
from __future__ import annotations

import re

__all__ = ["cuda_kernels", "cuda_source"]

_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(')


def cuda_source(executable) -> str:
    """The CUDA C source of the library's device module ('' if it has none)."""
    lib = executable.library if hasattr(executable.library, "imports") \
        else executable.library.mod
    todo = [lib]
    while todo:
        m = todo.pop()
        if getattr(m, "kind", None) == "cuda":
            return m.inspect_source()
        todo.extend(m.imports)
    return ""


def cuda_kernels(executable) -> list[dict]:
    """One dict per ``__global__`` function: name, launch bound, bytes of its source."""
    src = cuda_source(executable)
    starts = [(m.start(), m.group(2), m.group(1)) for m in _KERNEL.finditer(src)]
    out = []
    for i, (pos, name, threads) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(src)
        out.append({"name": name, "threads_per_block": int(threads) if threads else None,
                    "source_bytes": end - pos})
    return out
