"""Run lowbit's CUDA artifact and kernels on a GPU: numerics against the torch reference, times.

Takes the bundle of ``bench/gpu_bundle.py`` (built on a machine without a GPU) and needs only
lowbit's source, torch with CUDA, and a runtime-only TVM: the ``tvm`` package without
``libtvm_compiler`` (``tvm.base`` then loads ``libtvm_runtime`` alone) and ``tvm_ffi``; the
kernels' CUDA source is compiled by NVRTC as each library loads. Prints JSON per part and
writes the whole result to ``--out``.

    PYTHONPATH=<runtime-only tvm>:src python bench/gpu_check.py --bundle /tmp/gpu/bundle

- ``tiny``: each tiny model of ``tiny/`` (fp32, int4 RTN, w8a8, rotation at SmolLM2's widths)
  on its reference inputs; a non-finite output is traced to the first VM call that produced it.
- ``kernels``: each CUDA library of ``kernels/`` on seeded random weights, at M = 1 (decode GEMV)
  and M = 512 (prefill GEMM): max relative error against lowbit's torch reference
  (``lowbit.ops.quant_linear`` on the CPU, fp32), time per call through TVM's VM
  (``time_evaluator``, launch included) and per kernel on the device (CUPTI through
  ``torch.profiler``), against ``torch.nn.functional.linear`` in fp16 and fp32 on the same GPU,
  and the bytes the int4 GEMV must read over the device-to-device copy bandwidth measured in the
  same run.
- ``model``: the artifact's logits on the probe tokens (and a 5-token probe, the decode-kernel
  side of the row dispatch) against the torch reference backend's (max relative error, argmax
  agreement), and perplexity on the bundle's windows against the reference perplexity computed
  on the CPU.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch


def _events_ms(fn, runs: int = 200, warmup: int = 20) -> float:
    """Mean ms per call of ``fn`` over ``runs`` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


def _device_kernel_ms(fn, runs: int = 50) -> dict[str, float]:
    """Device time per call of ``fn``, by kernel name (CUPTI sees TVM's launches too)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time > 0:
            times[ev.name] = times.get(ev.name, 0.0) + ev.device_time / 1e3 / runs
    return times


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (best of 5)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        best = min(best, _events_ms(lambda: b.copy_(a), runs=5, warmup=1))
    return 2 * nbytes / (best / 1e3) / 1e9


def check_kernels(bundle: Path, bandwidth: float) -> list[dict]:
    import tvm
    from tvm.runtime.vm import VirtualMachine
    import lowbit.ops as ops
    from lowbit.backends.tvm._runtime import ensure_cuda_runtime
    from lowbit.numerics.packing import pack_codes, pack_zero_points
    from lowbit.numerics.quant import dequantize_weight, quantize_weight
    ensure_cuda_runtime()
    dev = tvm.cuda(0)
    rows = []
    for k in json.loads((bundle / "kernels.json").read_text()):
        vm = VirtualMachine(tvm.runtime.load_module(str(bundle / "kernels" / k["file"])), dev)
        n, kin, bits = k["out_features"], k["in_features"], k["bits"]
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, kin, generator=g)
        qw = quantize_weight(w, bits, k["group_size"], not k["zero_points"])
        tensors = [pack_codes(qw.codes, bits), qw.scales]
        if k["zero_points"]:
            tensors.append(pack_zero_points(qw.zero_points, bits))
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
        w_deq = dequantize_weight(qw)
        for m in (1, 512):
            x = torch.randn(m, kin, generator=g)
            args = [tvm.runtime.tensor(np.ascontiguousarray(t.numpy()), dev) for t in (x, *tensors)]
            main = vm["main"]
            got = torch.from_numpy(main(*args).numpy())
            ref = ops.quant_linear(x, *tensors[:2], tensors[2] if k["zero_points"] else None,
                                   None, kin, bits, qw.group_size, k["act_bits"], k["act_clip"])
            row = {"kernel": k["name"], "K": kin, "N": n, "M": m,
                   "max_rel_err": float((got - ref).abs().max() / ref.abs().max())}
            ev = vm.time_evaluator("main", dev, number=200, repeat=5)(*args)
            row["tvm_call_ms"] = float(np.median(ev.results)) * 1e3
            try:
                dk = _device_kernel_ms(lambda: main(*args))
                row["tvm_device_ms"] = sum(dk.values())
                row["tvm_kernels"] = sorted(dk)
            except Exception as e:                       # noqa: BLE001 - report, go on
                row["tvm_device_ms"] = f"profiler failed: {type(e).__name__}: {e}"
            for dtype in (torch.float16, torch.float32):
                xd, wd = x.cuda().to(dtype), w_deq.cuda().to(dtype)
                name = str(dtype)[6:]
                row[f"torch_{name}_call_ms"] = _events_ms(
                    lambda: torch.nn.functional.linear(xd, wd))
                try:
                    row[f"torch_{name}_device_ms"] = sum(_device_kernel_ms(
                        lambda: torch.nn.functional.linear(xd, wd)).values())
                except Exception as e:                   # noqa: BLE001
                    row[f"torch_{name}_device_ms"] = f"profiler failed: {e}"
            if m == 1:
                moved = weight_bytes + 4 * (kin + n)
                row["weight_bytes"] = weight_bytes
                row["roofline_ms"] = moved / (bandwidth * 1e9) * 1e3
            rows.append({kk: round(v, 6) if isinstance(v, float) else v for kk, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def trace_nonfinite(cm, ids: torch.Tensor, limit: int = 6) -> list[dict]:
    """The first VM calls after which an argument holds NaN/Inf (the culprit is the first one
    whose inputs are finite), via the Relax VM's instrument hook."""
    vm = cm.executable._ready()
    events: list[dict] = []

    def nonfinite(a):
        try:
            arr = a.numpy()
        except Exception:                              # noqa: BLE001 - not a tensor
            return None
        return int((~np.isfinite(arr)).sum()) if arr.dtype.kind == "f" else None

    def instrument(func, symbol, before_run, ret_value, *args):
        if not before_run and len(events) < limit:
            counts = [nonfinite(a) for a in args]
            if any(counts):
                events.append({"symbol": str(symbol), "nonfinite_per_arg": counts,
                               "shapes": [list(a.shape) if hasattr(a, "shape") else None
                                          for a in args]})
        return 0
    vm.set_instrument(instrument)
    try:
        cm(ids)
    finally:
        vm.set_instrument(None)
    return events


def check_tiny(bundle: Path) -> dict:
    """Tiny random models compiled for cuda next to their torch-reference logits."""
    import lowbit
    from lowbit.compiler.instruments import max_relative_error
    from safetensors.torch import load_file
    res = {}
    for d in sorted((bundle / "tiny").iterdir()):
        ref = load_file(str(d / "reference.safetensors"))
        cm = lowbit.load(d / "artifact")
        row = {}
        for key in sorted(k for k in ref if k.startswith("ids")):
            out = cm(ref[key].to(torch.int64)).float()
            row[key] = {"max_rel_err": max_relative_error(ref["logits" + key[3:]], out),
                        "finite": bool(torch.isfinite(out).all())}
            if not row[key]["finite"]:
                row[key]["trace"] = trace_nonfinite(cm, ref[key].to(torch.int64))
        res[d.name] = row
        print(json.dumps({d.name: row}), flush=True)
    return res


def check_model(bundle: Path) -> dict:
    import lowbit
    from lowbit.compiler.instruments import max_relative_error
    from lowbit.eval import perplexity
    from safetensors.torch import load_file
    ref = load_file(str(bundle / "reference.safetensors"))
    meta = json.loads((bundle / "reference.json").read_text())
    t = time.perf_counter()
    cm = lowbit.load(bundle / "artifact")
    res = {"load_s": round(time.perf_counter() - t, 2)}
    probe = ref["probe"].to(torch.int64)
    t = time.perf_counter()
    out = cm(probe).float()
    res["first_call_s"] = round(time.perf_counter() - t, 3)
    res["logits_max_rel_err_vs_torch"] = max_relative_error(ref["logits"], out)
    res["argmax_agreement"] = float((ref["logits"].argmax(-1) == out.argmax(-1)).float().mean())
    if "probe_short" in ref:
        short = cm(ref["probe_short"].to(torch.int64)).float()
        res["short_probe_tokens"] = int(ref["probe_short"].shape[1])
        res["short_logits_max_rel_err_vs_torch"] = max_relative_error(ref["logits_short"], short)
    if not bool(torch.isfinite(out).all()):
        res["nonfinite_logits"] = int((~torch.isfinite(out)).sum())
        res["trace"] = trace_nonfinite(cm, probe[:, :8])
        return res
    windows = ref["windows"].to(torch.int64)
    ppl = perplexity(cm, None, windows=windows, progress=False)
    res["perplexity_cuda"] = ppl["ppl"]
    res["perplexity_torch_reference"] = meta["perplexity"]["ppl"]
    res["perplexity_rel_diff"] = ppl["ppl"] / meta["perplexity"]["ppl"] - 1
    res["windows"] = ppl["windows"]
    res["seconds_per_512_window"] = ppl["seconds"] / ppl["windows"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out")
    ap.add_argument("--skip", default="", help="comma list of: tiny, kernels, model")
    a = ap.parse_args()
    import tvm
    import tvm.base
    from lowbit.backends.tvm._runtime import ensure_cuda_runtime
    ensure_cuda_runtime()
    bundle, skip = Path(a.bundle), set(filter(None, a.skip.split(",")))
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA device visible to TVM (is libcuda.so.1 on the loader path?)")
    out = {"device": dev.device_name, "compute_version": dev.compute_version,
           "tvm_runtime_only": bool(tvm.base._RUNTIME_ONLY), "torch": torch.__version__,
           "torch_device": torch.cuda.get_device_name(0)}
    out["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)
    print(json.dumps(out), flush=True)
    for part, fn in (("tiny", lambda: check_tiny(bundle)),
                     ("kernels", lambda: check_kernels(bundle, out["copy_bandwidth_gbs"])),
                     ("model", lambda: check_model(bundle))):
        if part in skip or (part == "tiny" and not (bundle / "tiny").is_dir()):
            continue
        try:
            out[part] = fn()
        except Exception:                              # noqa: BLE001 - report, go on
            out[part] = {"error": traceback.format_exc()[-3000:]}
        print(json.dumps({part: out[part]}, indent=1), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
