"""Encoder quality per ../shared/PROTOCOL.md: all-MiniLM-L6-v2, mean cosine similarity of
mean-pooled sentence embeddings vs fp32 over the first 256 non-empty lines of WikiText-2 test
(max 128 tokens each), for each preset on each backend. JSON lines, then a table.

    .venv/bin/python bench/encoder.py
    .venv/bin/python bench/encoder.py --presets w8a8,w8a8-rtn --backends torch
"""
from __future__ import annotations

import argparse
import json

import torch

import lowbit
from lowbit.compiler.capture import capture
from lowbit.eval import embedding_similarity
from lowbit.report import format_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--presets", default="w8a8,w8a8-rtn,w8a16")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--lines", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = capture(a.model)
    ref = lambda ids, mask: base.graph.run({"input_ids": ids, "attention_mask": mask})[0]  # noqa
    rows = []
    for preset in filter(None, a.presets.split(",")):
        for backend in filter(None, a.backends.split(",")):
            cm = lowbit.compile(a.model, recipe=preset, target=backend, progress=False)
            sim = embedding_similarity(cm, ref, base.tokenizer, n_lines=a.lines,
                                       progress=False)
            row = {"model": a.model, "preset": preset, "backend": backend,
                   "cosine": round(sim["cosine"], 5), "bytes": cm.nbytes}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
