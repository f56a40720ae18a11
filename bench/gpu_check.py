"""Run a saved lowbit CUDA artifact on a GPU: logits vs the torch reference, kernel timings.

Needs only lowbit, apache-tvm 0.27 (its wheel carries the CUDA runtime; it loads when
libcuda.so.1 is present) and torch (CUDA build for the fp16 comparison; CPU-only torch skips
it). Prints one JSON object.

    # on the CPU machine: the CUDA artifact and a torch-reference artifact of the same compile
    python - <<'PY'
    import lowbit
    for target, d in (("cuda", "smollm2-w4a16-cuda"), ("torch", "smollm2-w4a16-torch")):
        lowbit.compile("smollm2", recipe="w4a16-rtn", target=target, verify=target != "cuda",
                       progress=False).save(d)
    PY
    # on the GPU machine
    PYTHONPATH=src python bench/gpu_check.py smollm2-w4a16-cuda --reference smollm2-w4a16-torch

Kernel timing: every distinct quantized linear of the artifact's manifest, re-built for the
GPU's architecture (``sm_XY`` read from the device) with the same dlight schedules, at M=1
and M=512, against ``torch.nn.functional.linear`` in fp16 (and fp32) on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _gpu_time(fn, sync, runs=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def check_logits(artifact: str, reference: str | None, seq: int) -> dict:
    import lowbit
    from lowbit.compiler.instruments import max_relative_error
    cm = lowbit.load(artifact)
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    out = cm(ids)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = cm(ids)
    second = time.perf_counter() - t
    res = {"logits_shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
           "first_call_s": round(first, 3), "prefill_s": round(second, 4)}
    if reference:
        ref = lowbit.load(reference)(ids)
        res["logits_max_rel_err_vs_torch"] = max_relative_error(ref, out)
        res["argmax_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    return res


def time_kernels(manifest: dict, arch: str) -> list[dict]:
    import tvm
    from lowbit.backends.tvm.kernels import QuantLinearSpec
    from lowbit.backends.tvm.testing import compile_quant_linear
    from lowbit.numerics.packing import pack_codes, pack_zero_points
    from lowbit.numerics.quant import quantize_weight
    specs = {}
    for layer in manifest["layers"].values():
        spec = QuantLinearSpec(layer["out_features"], layer["in_features"], layer["bits"],
                               layer["group_size"], not layer["symmetric"], False,
                               layer["act_bits"], layer["act_clip"])
        specs[spec.name] = spec
    cuda_torch = torch.cuda.is_available()
    dev = tvm.cuda(0)
    rows = []
    for spec in specs.values():
        kernel = compile_quant_linear(spec, target={"kind": "cuda", "arch": arch})
        w = torch.randn(spec.out_features, spec.in_features)
        qw = quantize_weight(w, spec.bits, spec.group_size, not spec.has_zero_points)
        tensors = [pack_codes(qw.codes, spec.bits), qw.scales]
        if spec.has_zero_points:
            tensors.append(pack_zero_points(qw.zero_points, spec.bits))
        for m in (1, 512):
            x = torch.randn(m, spec.in_features)
            args = kernel.to_device(x, *tensors)
            fn = kernel.raw()
            row = {"kernel": spec.name, "M": m,
                   "tvm_ms": _gpu_time(lambda: fn(*args), dev.sync) * 1e3}
            got = torch.from_numpy(fn(*args).numpy())
            import lowbit.ops as ops
            ref = ops.quant_linear(x, *tensors[:2], tensors[2] if spec.has_zero_points else None,
                                   None, spec.in_features, spec.bits, qw.group_size,
                                   spec.act_bits, spec.act_clip)
            row["max_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
            if cuda_torch:
                for dtype in (torch.float16, torch.float32):
                    xd, wd = x.cuda().to(dtype), w.cuda().to(dtype)
                    row[f"torch_{str(dtype)[6:]}_ms"] = _gpu_time(
                        lambda: torch.nn.functional.linear(xd, wd), torch.cuda.synchronize) * 1e3
            rows.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", help="a directory saved from compile(..., target='cuda')")
    ap.add_argument("--reference", help="the same model compiled for target='torch', saved")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-kernels", action="store_true")
    a = ap.parse_args()
    import tvm
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA device visible to TVM (is libcuda.so.1 on the loader path?)")
    arch = "sm_" + dev.compute_version.replace(".", "")
    manifest = json.loads(open(f"{a.artifact}/manifest.json").read())
    out = {"device": dev.device_name, "arch": arch,
           "artifact_target": manifest.get("backend_options", {}),
           "logits": check_logits(a.artifact, a.reference, a.seq)}
    if not a.no_kernels:
        out["kernels"] = time_kernels(manifest, arch)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
