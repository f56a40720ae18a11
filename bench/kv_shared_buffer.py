"""What a shared past/present KV buffer would buy (issue 6): a timing probe, not a feature.

Takes a saved ONNX Runtime artifact (``cm.save(DIR)`` / ``bench/decode.py --save``), sets its
``MatMulNBits`` to ``--level``, and writes a copy whose ``GroupQueryAttention`` lengths come
from an extra ``past_length`` input instead of the past tensor's shape. Bound through I/O
binding with each ``present_*`` output on the same buffer as its ``past_*`` input (capacity
``context + 64``), ``GroupQueryAttention`` appends the new token in place instead of copying
the cache into a new tensor. One decode step on a ``--context``-token cache, both ways,
alternating (50 ms idle, one untimed and one timed call each), 2 threads; prints the logits'
difference, the median step of each, and the paired ratio quartiles.

    .venv/bin/python bench/kv_shared_buffer.py DIR --context 1024 --runs 31
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def edited(src: Path, level: int, shared: bool, out: Path) -> Path:
    m = onnx.load(str(src))
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    if shared:
        shape = next(n for n in m.graph.node
                     if n.op_type == "Shape" and n.input[0] == "past_key_0")
        m.graph.node.remove(shape)
        m.graph.input.append(helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]))
        for n in m.graph.node:
            n.input[:] = ["past_length" if x == shape.output[0] else x for x in n.input]
    onnx.save(m, str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--level", type=int, default=4)
    ap.add_argument("--runs", type=int, default=31)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-kvshare-"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    src = Path(a.artifact) / "model.onnx"
    plain = ort.InferenceSession(str(edited(src, a.level, False, tmp / "plain.onnx")), so,
                                 providers=["CPUExecutionProvider"])
    share = ort.InferenceSession(str(edited(src, a.level, True, tmp / "shared.onnx")), so,
                                 providers=["CPUExecutionProvider"])
    past = [i for i in plain.get_inputs() if i.name.startswith("past_")]
    outs = [o.name for o in plain.get_outputs()]
    ctx = a.context
    ids = np.random.default_rng(0).integers(3, 49000, (1, ctx + 1))
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past}
    _, *present = plain.run(None, {"input_ids": ids[:, :ctx], **empty})
    step = {"input_ids": ids[:, ctx:], **{i.name: p for i, p in zip(past, present)}}
    buffers = {}
    for i, p in zip(past, present):
        b = np.zeros((1, p.shape[1], ctx + 64, p.shape[3]), np.float32)
        b[:, :, :ctx] = p
        buffers[i.name] = ort.OrtValue.ortvalue_from_numpy(b)
    present_of = dict(zip([i.name for i in past], outs[1:]))

    def shared_step():
        b = share.io_binding()
        b.bind_cpu_input("input_ids", ids[:, ctx:])
        b.bind_cpu_input("past_length", np.array([ctx], np.int64))
        b.bind_output(outs[0], "cpu")
        for name, v in buffers.items():       # the step rewrites position ctx in place
            b.bind_ortvalue_input(name, v)
            b.bind_ortvalue_output(present_of[name], v)
        share.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    ref = plain.run(None, step)[0]
    print(f"logits: max abs difference {float(np.abs(shared_step() - ref).max()):.3g} "
          f"(max |logit| {float(np.abs(ref).max()):.3g})")
    probes = {"separate past/present": lambda: plain.run(None, step), "shared buffer": shared_step}
    times: dict[str, list[float]] = {k: [] for k in probes}
    for r in range(a.runs + 2):
        for k, f in probes.items():
            time.sleep(0.05)
            f()
            t0 = time.perf_counter()
            f()
            if r >= 2:
                times[k].append((time.perf_counter() - t0) * 1e3)
    base = np.array(times["separate past/present"])
    for k, v in times.items():
        q = np.percentile(np.array(v) / base, [25, 50, 75]).round(3).tolist()
        print(f"{k:22s} decode @{ctx}: {statistics.median(v):7.2f} ms  paired ratio p25/p50/p75 {q}")


if __name__ == "__main__":
    main()
