"""Quality benchmark on SmolLM2-135M per ../shared/PROTOCOL.md.

For fp32 and each preset, on each backend: WikiText-2 perplexity (64 windows of 512),
artifact bytes, prefill-512 latency (2 threads). Prints one JSON line per row, then a table.

    .venv/bin/python bench/quality.py                       # all presets, both backends
    .venv/bin/python bench/quality.py --presets w4a16 --backends onnxruntime --windows 16
"""
from __future__ import annotations

import argparse
import json

import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.data.wikitext import eval_windows
from lowbit.eval import perplexity
from lowbit.job import latency
from lowbit.report import format_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--presets", default="w8a16,w8a8,w4a16")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--accuracy-levels", default="0,4",
                    help="MatMulNBits accuracy levels to measure on onnxruntime")
    ap.add_argument("--no-latency", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = capture(a.model)
    ids = eval_windows(base.tokenizer, a.windows)
    vocab = int(base.tokenizer.vocab_size)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    fp32 = lambda x: base.graph.run({"input_ids": x})[0]  # noqa: E731
    emit({"variant": "fp32", "backend": "torch", "ppl": round(perplexity(
        fp32, None, windows=ids)["ppl"], 3), "bytes": base.graph.num_parameters_bytes(),
        "prefill_512_ms": None if a.no_latency else round(latency(fp32, vocab, 512), 1)})
    for preset in a.presets.split(","):
        for backend in a.backends.split(","):
            levels = [int(x) for x in a.accuracy_levels.split(",")] \
                if backend == "onnxruntime" and not preset.endswith("a8") else [None]
            for level in levels:
                opts = {"threads": 2} if backend == "onnxruntime" else {}
                if level is not None:
                    opts["accuracy_level"] = level
                cm = lowbit.compile(a.model, recipe=preset, target=backend,
                                    backend_options=opts, progress=False)
                name = backend if level is None else f"{backend} (accuracy_level={level})"
                emit({"variant": preset, "backend": name,
                      "ppl": round(perplexity(cm, None, windows=ids)["ppl"], 3),
                      "bytes": cm.nbytes,
                      "prefill_512_ms": None if a.no_latency or backend == "torch"
                      else round(latency(cm, vocab, 512), 1),
                      "max_rel_err_vs_torch": round(
                          cm.figures["backend_max_rel_error_vs_torch"], 6)})
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
