"""One layer's decode attention on ONNX Runtime against the cache length (issue 6 flatness).

SmolLM2's attention shape (9 query heads, 3 key/value heads, head size 64), one new token,
a cache of ``L`` tokens, float32, 2 threads (PROTOCOL), L3-hot (the same cache every call).
Two formulations of the same attention, both checked against a numpy reference:

- ``gqa``: ``com.microsoft.GroupQueryAttention`` with the cache in fixed-capacity buffers
  bound as both past and present (what the fused lowering and ``generate()`` run);
- ``std``: standard ops over a sequence-major cache ``[L, kv_heads * head_dim]`` whose first
  ``L`` rows are bound without a copy: ``Gemm(q_blocks, K, transB=1)`` with the query heads
  laid out block-diagonally against the key heads, the new token's score apart, one
  ``Softmax``, ``MatMul`` with ``V`` and the block diagonal of the result.

Per context and variant: the median over ``--rounds`` of the mean time of ``--calls`` calls
(variants interleaved per round). Prints one JSON line per row, then a table.

    .venv/bin/python bench/ort_attention.py --contexts 128,512,1024
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh

from lowbit.report import format_table

HEADS, KV_HEADS, DIM = 9, 3, 64
GROUP = HEADS // KV_HEADS


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _vi(name, shape, dtype=TP.FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def gqa_model() -> onnx.ModelProto:
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"],
                        ["o", "prk", "prv"], domain="com.microsoft", num_heads=HEADS,
                        kv_num_heads=KV_HEADS)
    cache = [1, KV_HEADS, "c", DIM]
    g = oh.make_graph([node], "gqa",
                      [_vi("q", [1, 1, HEADS * DIM]), _vi("k", [1, 1, KV_HEADS * DIM]),
                       _vi("v", [1, 1, KV_HEADS * DIM]), _vi("pk", cache), _vi("pv", cache),
                       _vi("seqlens", [1], TP.INT32), _vi("total", [1], TP.INT32)],
                      [_vi("o", [1, 1, HEADS * DIM]), _vi("prk", cache), _vi("prv", cache)])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17),
                                           oh.make_opsetid("com.microsoft", 1)])


def std_model() -> onnx.ModelProto:
    width = KV_HEADS * DIM
    mask = np.zeros((HEADS, width), np.float32)
    for j in range(HEADS):
        mask[j, (j // GROUP) * DIM:(j // GROUP + 1) * DIM] = 1
    inits = [oh.make_tensor("mask", TP.FLOAT, mask.shape, mask.ravel()),
             oh.make_tensor("rep", TP.INT64, [2], [1, KV_HEADS]),
             oh.make_tensor("scale", TP.FLOAT, [], [1 / np.sqrt(DIM)]),
             oh.make_tensor("shape", TP.INT64, [3], [HEADS, KV_HEADS, DIM]),
             oh.make_tensor("one", TP.INT64, [1], [1]),
             oh.make_tensor("zero", TP.INT64, [1], [0]),
             oh.make_tensor("zero_s", TP.INT64, [], [0]),
             oh.make_tensor("end", TP.INT64, [1], [1 << 30])]
    mk = oh.make_node
    nodes = [
        mk("Tile", ["q", "rep"], ["q_tiled"]),                      # [H, KV*D]
        mk("Mul", ["q_tiled", "mask"], ["q_block"]),
        mk("Mul", ["q_block", "scale"], ["qs"]),
        mk("Gemm", ["qs", "kp"], ["s_past"], transB=1),            # [H, L]
        mk("Mul", ["qs", "k"], ["qk"]),
        mk("ReduceSum", ["qk", "one"], ["s_new"], keepdims=1),     # [H, 1]
        mk("Concat", ["s_past", "s_new"], ["s"], axis=1),
        mk("Softmax", ["s"], ["p"], axis=1),
        mk("Shape", ["kp"], ["kp_shape"]),
        mk("Gather", ["kp_shape", "zero_s"], ["len0"], axis=0),
        mk("Unsqueeze", ["len0", "zero"], ["len"]),
        mk("Slice", ["p", "zero", "len", "one"], ["p_past"]),
        mk("Slice", ["p", "len", "end", "one"], ["p_new"]),
        mk("MatMul", ["p_past", "vp"], ["o_past"]),                 # [H, KV*D]
        mk("Mul", ["p_new", "v"], ["o_new"]),
        mk("Add", ["o_past", "o_new"], ["o_all"]),
        mk("Mul", ["o_all", "mask"], ["o_masked"]),
        mk("Reshape", ["o_masked", "shape"], ["o_heads"]),
        mk("ReduceSum", ["o_heads", "one"], ["o"], keepdims=0),    # [H, D]
    ]
    g = oh.make_graph(nodes, "std",
                      [_vi("q", [HEADS, DIM]), _vi("k", [1, width]), _vi("v", [1, width]),
                       _vi("kp", ["L", width]), _vi("vp", ["L", width])],
                      [_vi("o", [HEADS, DIM])], initializer=inits)
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def reference(q, k, v, kb, vb, n):
    keys = np.concatenate([kb[:n], k]).reshape(n + 1, KV_HEADS, DIM)
    values = np.concatenate([vb[:n], v]).reshape(n + 1, KV_HEADS, DIM)
    out = np.zeros((HEADS, DIM), np.float32)
    for j in range(HEADS):
        s = keys[:, j // GROUP] @ q[j] / np.sqrt(DIM)
        p = np.exp(s - s.max())
        out[j] = (p / p.sum()) @ values[:, j // GROUP]
    return out


def _bind_gqa(sess, q, k, v, pk, pv, n):
    b = sess.io_binding()
    for name, a in (("q", q.reshape(1, 1, -1)), ("k", k.reshape(1, 1, -1)),
                    ("v", v.reshape(1, 1, -1)), ("seqlens", np.array([n], np.int32)),
                    ("total", np.array([n + 1], np.int32))):
        b.bind_cpu_input(name, np.ascontiguousarray(a))
    b.bind_output("o", "cpu")
    for name, out, a in (("pk", "prk", pk), ("pv", "prv", pv)):   # in place, as generate()
        b.bind_input(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        b.bind_output(out, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
    return b


def _bind_std(sess, q, k, v, kb, vb, n):
    b = sess.io_binding()
    for name, a in (("q", q), ("k", k), ("v", v)):
        b.bind_cpu_input(name, a)
    for name, a in (("kp", kb), ("vp", vb)):     # the first n rows: a prefix, no copy
        b.bind_input(name, "cpu", 0, np.float32, [n, a.shape[1]], a.ctypes.data)
    b.bind_output("o", "cpu")
    return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    sessions = {"gqa": _session(gqa_model(), a.threads), "std": _session(std_model(), a.threads)}
    rows = []
    for n in [int(c) for c in a.contexts.split(",")]:
        if not 0 < n < a.capacity:
            raise SystemExit(f"context {n} must be in 1..{a.capacity - 1}")
        q = rng.standard_normal((HEADS, DIM), dtype=np.float32)
        k, v = (rng.standard_normal((1, KV_HEADS * DIM), dtype=np.float32) for _ in range(2))
        kb, vb = (rng.standard_normal((a.capacity, KV_HEADS * DIM), dtype=np.float32)
                  for _ in range(2))
        ref = reference(q, k, v, kb, vb, n)
        head_major = [np.ascontiguousarray(t.reshape(a.capacity, KV_HEADS, DIM)
                                           .transpose(1, 0, 2))[None] for t in (kb, vb)]
        bindings = {"gqa": _bind_gqa(sessions["gqa"], q, k, v, *head_major, n),
                    "std": _bind_std(sessions["std"], q, k, v, kb, vb, n)}
        times = {name: [] for name in bindings}
        errors = {}
        for name, b in bindings.items():
            sessions[name].run_with_iobinding(b)
            out = b.copy_outputs_to_cpu()[0].reshape(HEADS, DIM)
            errors[name] = float(np.abs(out - ref).max() / np.abs(ref).max())
        for _ in range(a.rounds):
            for name, b in bindings.items():
                run = sessions[name].run_with_iobinding
                for _ in range(5):
                    run(b)
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    run(b)
                times[name].append((time.perf_counter() - t0) / a.calls * 1e6)
        for name in bindings:
            cache_bytes = 2 * n * KV_HEADS * DIM * 4
            us = statistics.median(times[name])
            rows.append({"variant": name, "context": n, "us_per_call": round(us, 1),
                         "max_rel_error": float(f"{errors[name]:.1e}"),
                         "cache_bytes": cache_bytes,
                         "effective_gb_s": round(cache_bytes / us / 1e3, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
