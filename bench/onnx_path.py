"""The ONNX capture path against the FX path, per ../shared/PROTOCOL.md.

Exports the model with ``torch.onnx.export`` (unless ``--onnx`` names an exported file),
compiles each preset from the ``.onnx`` (ONNX graph adapter, calibration on ONNX Runtime)
and, with ``--fx``, from the PyTorch model too, both to onnxruntime. Causal LMs: WikiText-2
perplexity (64 windows of 512); encoders: mean cosine of mean-pooled sentence embeddings vs
fp32 (256 lines). One JSON line per row.

    .venv/bin/python bench/onnx_path.py --model smollm2 --presets w8a8,w4a16 --fx
    .venv/bin/python bench/onnx_path.py --model minilm --presets w8a8
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.compiler.capture import capture, load_hf_model
from lowbit.data.wikitext import eval_windows
from lowbit.eval import embedding_similarity, perplexity
from lowbit.testing import export_onnx


def _quality(cm, kind: str, tokenizer, windows, reference, lines: int) -> dict:
    if kind == "causal_lm":
        return {"ppl": round(perplexity(cm, tokenizer, windows=windows, progress=False)["ppl"],
                             3)}
    sim = embedding_similarity(cm, reference, tokenizer, n_lines=lines, progress=False)
    return {"cosine": round(sim["cosine"], 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--onnx", default=None, help="an exported .onnx (else export to a temp dir)")
    ap.add_argument("--presets", default="w8a8,w4a16")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--lines", type=int, default=256)
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--fx", action="store_true", help="also compile through the FX path")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-bench-onnx-")
    path = Path(a.onnx) if a.onnx else Path(tmp.name) / "model.onnx"
    base = capture(a.model)
    if not a.onnx:
        model, tokenizer, _ = load_hf_model(a.model)
        export_onnx(model, path, max_seq=min(2048, base.max_seq))
        tokenizer.save_pretrained(str(path.parent))
    tok = base.tokenizer
    windows = eval_windows(tok, a.windows, 512) if base.kind == "causal_lm" else None
    reference = None if base.kind == "causal_lm" else (
        lambda ids, mask: base.graph.run({"input_ids": ids, "attention_mask": mask})[0])
    sources = [("onnx", str(path))] + ([("fx", a.model)] if a.fx else [])
    for preset in filter(None, a.presets.split(",")):
        for form, source in sources:
            t0 = time.perf_counter()
            cm = lowbit.compile(source, recipe=preset, target="onnxruntime", progress=False,
                                calibration_samples=a.calibration_samples)
            seconds = round(time.perf_counter() - t0, 1)
            row = {"model": a.model, "preset": preset, "path": form, "compile_s": seconds,
                   "windows": a.windows, "calibration_samples": a.calibration_samples,
                   **_quality(cm, base.kind, tok, windows, reference, a.lines),
                   "bytes": cm.nbytes}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
