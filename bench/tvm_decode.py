"""KV-cache decode on the TVM llvm backend vs ONNX Runtime and torch (SmolLM2-135M, PROTOCOL).

For each preset: compiled once for ``torch`` in cache form, the same graph lowered for
``llvm`` (TVM; exact float GEMV and ``accuracy="int8"``) and ``onnxruntime`` (accuracy_level
0 and 4). Reported: the logits of one decode step on a 128-token
cache against the torch reference (max relative error), prefill of 512 tokens and decode of
one token on caches of ``--contexts`` tokens, timed round-robin as in ``bench/decode.py``
(2 threads, median of ``--runs`` after 2 warm-ups). JSON lines, then a table.

    PYTHONPATH=src .venv/bin/python bench/tvm_decode.py --presets w4a16-rtn
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import lowbit
from lowbit.compiler.instruments import max_relative_error
from lowbit.compiler.kv_cache import run_in_chunks
from lowbit.report import format_table

from decode import Timer


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step_error(ref, cm, vocab: int) -> float:
    """Max relative error of ``cm``'s logits for one token after a 128-token prefill."""
    ids = torch.randint(3, vocab, (1, 129), generator=torch.Generator().manual_seed(1))
    out = [run_in_chunks(m.executable, m.cache, ids, splits=(128, 129))[0][-1]
           for m in (ref, cm)]
    return max_relative_error(torch.as_tensor(out[0]), torch.as_tensor(out[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--presets", default="w4a16-rtn")
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mcpu", default="native")
    a = ap.parse_args()
    torch.set_num_threads(2)
    contexts = [int(c) for c in a.contexts.split(",")]
    rows, variants = [], []
    for preset in a.presets.split(","):
        _log(f"{preset}: torch reference (cache form)")
        ref = lowbit.compile(a.model, recipe=preset, target="torch", progress=False,
                             kv_cache=True)
        vocab = int(ref.tokenizer.vocab_size)
        for target, options in (("llvm", {"mcpu": a.mcpu, "threads": 2}),
                                ("llvm", {"mcpu": a.mcpu, "threads": 2, "accuracy": "int8"}),
                                ("onnxruntime", {"threads": 2}),
                                ("onnxruntime", {"threads": 2, "accuracy_level": 4})):
            _log(f"{preset}: lowering for {target} {options}")
            t0 = time.perf_counter()
            cm = lowbit.relower(ref, target, options)
            seconds = time.perf_counter() - t0
            extra = {k: v for k, v in options.items() if k in ("accuracy", "accuracy_level")}
            rows.append({"preset": preset, "backend": cm.backend,
                         "options": ", ".join(f"{k}={v}" for k, v in extra.items()),
                         "lowering_s": round(seconds, 1),
                         "decode_logits_max_rel_err": step_error(ref, cm, vocab),
                         "lowering": getattr(cm.executable, "lowering", None)})
            variants.append(cm)
        rows.append({"preset": preset, "backend": "torch"})
        variants.append(ref)
    _log("timing (round-robin)")
    timer = Timer(vocab, contexts, 512)
    for i, cm in enumerate(variants):
        timer.add(str(i), cm)
    times = timer.run(a.runs)
    for i, row in enumerate(rows):
        row.update({k: round(statistics.median(v), 2) for (n, k), v in times.items()
                    if n == str(i)})
        print(json.dumps(row), flush=True)
    print()
    columns = ["preset", "backend", "options", "decode_logits_max_rel_err", "prefill_512_ms",
               *(f"decode_{c}_ms" for c in contexts), "lowering_s"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))


if __name__ == "__main__":
    main()
