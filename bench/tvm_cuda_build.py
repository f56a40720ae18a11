"""Build SmolLM2 for ``target='cuda'`` on a machine without a GPU; list the CUDA kernels.

Compiles the recipe once for the torch reference backend, lowers the same graph for cuda
(``{"kind": "cuda", "arch": ARCH}``), saves both artifacts (what ``bench/gpu_bundle.py``
packs for ``bench/gpu_check.py``) and prints the kernels (name, launch bound, CUDA source
bytes) and the library size as JSON.

    PYTHONPATH=src .venv/bin/python bench/tvm_cuda_build.py --out /tmp/smollm2-cuda
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

import lowbit
from lowbit.backends.tvm.inspect import cuda_kernels


# w4a16 without the calibration-heavy GPTQ: rotation (online Hadamard kernels included),
# int4 group-128 asymmetric RTN, packing
ROTATED_RTN = {"name": "w4a16-rotate-rtn", "passes": [
    "rotate", {"rtn": {"bits": 4, "group_size": 128, "symmetric": False}}, "pack"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", default=None, help="preset name (default: rotate + int4 RTN)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    recipe = a.recipe or ROTATED_RTN
    ref = lowbit.compile(a.model, recipe=recipe, target="torch", progress=False,
                         kv_cache=False)          # the TVM backend lowers the no-cache form
    t0 = time.perf_counter()
    cm = lowbit.relower(ref, "cuda", {"arch": a.arch})
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    cm.save(out / "cuda", overwrite=True)
    ref.save(out / "torch", overwrite=True)
    kernels = cuda_kernels(cm.executable)
    print(json.dumps({
        "recipe": ref.manifest["recipe"]["name"], "arch": a.arch, "lower_seconds": round(seconds),
        "library_bytes": (out / "cuda" / "model.so").stat().st_size,
        "params_bytes": (out / "cuda" / "params.safetensors").stat().st_size,
        "kernels": len(kernels),
        "lowbit_kernels": Counter(k["name"].rsplit("_kernel", 1)[0] for k in kernels
                                  if k["name"].startswith("lowbit_")),
        "all": kernels}, indent=1))


if __name__ == "__main__":
    main()
