"""SmolLM2-135M on the TVM llvm backend vs the torch reference backend (PROTOCOL.md).

For each preset: compile for ``torch``, lower the same graph for ``llvm``; logits of the first evaluation
windows (max relative error, max |diff| / max |ref| per window); perplexity on the same
windows for both backends; compile time. JSON lines, then a table.

    PYTHONPATH=src .venv/bin/python bench/tvm_smollm2.py --presets w4a16-rtn,w8a8 --windows 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import lowbit
from lowbit.compiler.instruments import max_relative_error
from lowbit.data.wikitext import eval_windows
from lowbit.eval import perplexity



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--presets", default="w4a16-rtn,w8a8")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--logit-windows", type=int, default=2)
    ap.add_argument("--mcpu", default="native")
    ap.add_argument("--save", default=None, help="save each llvm artifact under this folder")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ids = None

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    for preset in a.presets.split(","):
        log(f"{preset}: torch reference")
        ref = lowbit.compile(a.model, recipe=preset, target="torch", progress=False,
                             kv_cache=False)      # the TVM backend lowers the no-cache form
        if ids is None:
            ids = eval_windows(ref.tokenizer, a.windows)
        log(f"{preset}: llvm")
        t0 = time.perf_counter()
        cm = lowbit.relower(ref, "llvm", {"mcpu": a.mcpu, "threads": 2})
        compile_s = time.perf_counter() - t0
        if a.save:
            cm.save(f"{a.save}/{preset}", overwrite=True)
        log(f"{preset}: compiled in {compile_s:.0f} s; logits")
        errs = []
        with torch.no_grad():
            for w in ids[: a.logit_windows]:
                errs.append(max_relative_error(ref(w[None]), cm(w[None])))
        log(f"{preset}: perplexity")
        p_ref = perplexity(ref, None, windows=ids, progress=False)
        p_tvm = perplexity(cm, None, windows=ids, progress=False)
        print(json.dumps({
            "preset": preset, "windows": len(ids), "compile_s": round(compile_s, 1),
            "logits_max_rel_err": max(errs), "ppl_torch": round(p_ref["ppl"], 4),
            "ppl_llvm": round(p_tvm["ppl"], 4),
            "ppl_rel_diff": abs(p_tvm["ppl"] / p_ref["ppl"] - 1),
            "seconds_torch": p_ref["seconds"], "seconds_llvm": p_tvm["seconds"],
            "artifact_bytes": cm.nbytes}), flush=True)


if __name__ == "__main__":
    main()
