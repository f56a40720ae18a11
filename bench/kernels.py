"""lowbit's TVM int4 kernels vs torch fp32 ``linear`` and ONNX Runtime ``MatMulNBits``.

TVM twice: the float kernels (``tvm``, the default, exact) and ``accuracy="int8"``
(``tvm_i8``: decode GEMV on int8 dot products, activations rounded to int8 per group -- the
counterpart of ORT's ``accuracy_level=4``; M > 4 runs the float GEMM in both).

Shapes (K x N): SmolLM2's 576x576, 576x192 (k/v, GQA), 576x1536, 1536x576, and 4096x4096;
M = 1 (GEMV, decode) and M = 512 (GEMM, prefill); int4, group 128, asymmetric (zero points).
Each timed call applies C linears to one input inside one graph (TVM: one Relax function;
ORT: one session; torch: a Python loop), so per-call overhead is amortised:

* hot: the C linears share one weight (it stays in cache);
* streamed: C distinct weights totalling >= 96 MB (3x the L3), read from DRAM each call.

Roofline: bytes moved per linear (packed weight + scales + zero points + x + y) over the best
streaming read bandwidth measured in the same run (torch sum over 512 MB, same threads).

Every case runs in its own process (median of 7 runs after 2 warm-ups there): ONNX Runtime's
and TVM's worker threads spin for a while after each call, and in one process the pool of one
runtime measurably slowed the other (ORT's 576x192 GEMV read 9.7 us before a TVM case ran in
the process and 17.2 us after). ``--rounds R`` repeats all cases R times, interleaved, and
reports the median per case. JSON lines, then a table.

    TVM_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/kernels.py [--quick] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from lowbit.numerics.packing import pack_codes, pack_zero_points
from lowbit.numerics.quant import quantize_weight

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)]
BITS, GROUP = 4, 128
STREAM_BYTES = 96e6


def timeit(fn, runs=7, warmup=2, min_s=0.05) -> float:
    """Median seconds per call (each run repeats ``fn`` until ``min_s`` has passed)."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    fn()
    reps = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return float(np.median(times))


def bandwidth(threads: int) -> float:
    """Best streaming read bandwidth (bytes/s): torch sum over a 512 MB float32 array."""
    torch.set_num_threads(threads)
    a = torch.ones(128 * 1024 * 1024)
    best = min(timeit(lambda: a.sum(), runs=5) for _ in range(2))
    return a.numel() * 4 / best


def packed(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qw = quantize_weight(w, BITS, GROUP, symmetric=False)
    return pack_codes(qw.codes, BITS), qw.scales, pack_zero_points(qw.zero_points, BITS)


def linear_bytes(m, k, n) -> int:
    ng = -(-k // GROUP)
    return n * ng * GROUP * BITS // 8 + n * ng * 4 + n * -(-ng // 2) + 4 * m * (k + n)


def copies(k, n, streamed: bool) -> int:
    return math.ceil(STREAM_BYTES / linear_bytes(0, k, n)) if streamed else 8


def tvm_case(m, k, n, count, distinct, threads, accuracy="float"):
    import tvm
    from tvm import relax, tirx
    from lowbit.backends.tvm import build, has_vnni, resolve_target
    from lowbit.backends.tvm._emit import Emitter
    from lowbit.backends.tvm._runtime import set_threads, transform_params
    from lowbit.backends.tvm.kernels import QuantLinearSpec
    spec = QuantLinearSpec(n, k, BITS, GROUP, True, False)
    weights = [packed(n, k, i) for i in range(distinct)]
    rows = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([rows, k], "float32"))
    ws = [[relax.Var(f"{p}{i}", relax.TensorType(list(t.shape), str(t.dtype)[6:]))
           for p, t in zip("wsz", weights[i])] for i in range(distinct)]
    target = resolve_target("llvm", {"mcpu": "native"})
    bb, emitter = relax.BlockBuilder(), Emitter(True, accuracy, has_vnni(target))
    with bb.function("main", [x] + [v for w in ws for v in w], attrs={"num_input": 1}):
        with bb.dataflow():
            outs = [emitter.quant_linear(bb, x, *ws[i % distinct][:2], ws[i % distinct][2],
                                         None, spec) for i in range(count)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    lib = build(bb.get(), target)
    set_threads(threads)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal((m, k), "float32"))]
    args += transform_params(vm, [tvm.runtime.tensor(t.numpy()) for w in weights for t in w])
    fn = vm["main"]
    return timeit(lambda: fn(*args)) / count


def ort_case(m, k, n, count, distinct, threads, level):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    weights = [packed(n, k, i) for i in range(distinct)]
    inits, nodes, outs = [], [], []
    for i, (q, s, z) in enumerate(weights):
        inits += [numpy_helper.from_array(q.numpy(), f"q{i}"),
                  numpy_helper.from_array(s.numpy(), f"s{i}"),
                  numpy_helper.from_array(z.numpy(), f"z{i}")]
    for i in range(count):
        j = i % distinct
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{j}", f"s{j}", f"z{j}"], [f"y{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=BITS,
                                      block_size=GROUP, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [m, k])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((m, k), "float32")}
    return timeit(lambda: sess.run(None, feed)) / count


def torch_case(m, k, n, count, distinct, threads):
    torch.set_num_threads(threads)
    ws = [torch.randn(n, k) for _ in range(distinct)]
    x = torch.randn(m, k)

    def run():
        for i in range(count):
            torch.nn.functional.linear(x, ws[i % distinct])
    return timeit(run) / count


KINDS = ("tvm", "tvm_i8", "ort_l0", "ort_l4", "torch_fp32")


def run_case(kind: str, m: int, k: int, n: int, streamed: bool, threads: int) -> float:
    """Seconds per linear of one case (in this process)."""
    count = copies(k, n, streamed) if m == 1 else 2
    distinct = count if streamed else 1
    if kind == "torch_fp32":
        count = max(1, count // 8) if streamed else count
        return torch_case(m, k, n, count, count if streamed else 1, threads)
    if kind.startswith("tvm"):
        return tvm_case(m, k, n, count, distinct, threads, "int8" if kind == "tvm_i8" else "float")
    return ort_case(m, k, n, count, distinct, threads, int(kind[-1]))


def case_in_subprocess(kind: str, m: int, k: int, n: int, streamed: bool, threads: int) -> float:
    cmd = [sys.executable, __file__, "--case", kind, str(m), str(k), str(n),
           "streamed" if streamed else "hot", "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4096x4096 and 576x576 only")
    ap.add_argument("--gemm", action="store_true", help="also M=512 (slow)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every case, interleaved")
    ap.add_argument("--case", nargs=5, metavar=("KIND", "M", "K", "N", "MODE"),
                    help=argparse.SUPPRESS)      # internal: one case, seconds on stdout
    a = ap.parse_args()
    if a.case:
        kind, m, k, n, mode = a.case
        print(run_case(kind, int(m), int(k), int(n), mode == "streamed", a.threads))
        return
    bw = bandwidth(a.threads)
    print(json.dumps({"stream_read_GBps": round(bw / 1e9, 2), "threads": a.threads}), flush=True)
    shapes = [(576, 576), (4096, 4096)] if a.quick else SHAPES
    cases = [(m, k, n, streamed) for m in ([1, 512] if a.gemm else [1]) for k, n in shapes
             for streamed in ((False, True) if m == 1 else (False,))]
    times: dict = {}
    for _ in range(a.rounds):
        for m, k, n, streamed in cases:
            for kind in KINDS:
                if kind == "tvm_i8" and m > 4:
                    continue
                times.setdefault((m, k, n, streamed, kind), []).append(
                    case_in_subprocess(kind, m, k, n, streamed, a.threads))
    rows = []
    for m, k, n, streamed in cases:
        count = copies(k, n, streamed) if m == 1 else 2
        r = {"M": m, "K": k, "N": n, "mode": "streamed" if streamed else "hot",
             "linears_per_call": count}
        for kind in KINDS:
            if (m, k, n, streamed, kind) in times:
                r[f"{kind}_ms"] = statistics.median(times[(m, k, n, streamed, kind)]) * 1e3
        spread = {}                 # each round's figure (JSON only), to show the spread
        for kind in KINDS:
            if a.rounds > 1 and (m, k, n, streamed, kind) in times:
                spread[f"{kind}_rounds_ms"] = [round(t * 1e3, 4)
                                               for t in times[(m, k, n, streamed, kind)]]
        r["roofline_ms"] = linear_bytes(m, k, n) / bw * 1e3
        r["tvm_frac_bw"] = r["roofline_ms"] / r["tvm_ms"]
        if "tvm_i8_ms" in r:
            r["tvm_i8_frac_bw"] = r["roofline_ms"] / r["tvm_i8_ms"]
        r["ort_l4_frac_bw"] = r["roofline_ms"] / r["ort_l4_ms"]
        r = {key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}
        rows.append(r)
        print(json.dumps({**r, **spread}), flush=True)
    cols = ["M", "K", "N", "mode", "tvm_i8_ms", "tvm_ms", "ort_l4_ms", "ort_l0_ms",
            "torch_fp32_ms", "roofline_ms", "tvm_i8_frac_bw", "tvm_frac_bw", "ort_l4_frac_bw"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols))


if __name__ == "__main__":
    main()
