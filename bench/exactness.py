"""Exactness of the function-preserving passes on real and tiny random models.

For every model and every pass declared ``numerics="exact"`` (``smooth``, ``awq``, ``rotate``,
``ocs``), compiles the model with that pass alone (float32; the pass manager's verification
instrument compares the outputs before and after on a held-out input) and prints the maximum
relative error of the outputs it measured, or the pass's skip reason. JSON lines, then a
table.

    .venv/bin/python bench/exactness.py                      # tiny models + SmolLM2 + MiniLM
    .venv/bin/python bench/exactness.py --models llama,opt   # a subset
"""
from __future__ import annotations

import argparse
import json

import torch

import lowbit
from lowbit import testing
from lowbit.report import format_table

PASSES = ("smooth", "awq", "rotate", "ocs")
TINY = {"llama": testing.tiny_llama, "qwen2": testing.tiny_qwen2, "opt": testing.tiny_opt,
        "gpt2": testing.tiny_gpt2, "bert": testing.tiny_bert}
REAL = ("smollm2", "minilm")


def run(model_name: str, pass_name: str, calibration_samples: int) -> dict:
    real = model_name in REAL
    model = model_name if real else TINY[model_name]()
    kw = ({"calibration_samples": calibration_samples} if real
          else {"calibration": testing.random_ids(4, 32, seed=3)})
    cm = lowbit.compile(model, recipe={"passes": [pass_name]}, target="torch", progress=False,
                        **kw)
    rec = cm.manifest["passes"][0]
    ver = rec.get("verification") or {}
    err = ver.get("max_rel_error")
    reasons = [r["reason"] for r in rec["skipped"]
               if not r["reason"].startswith("output head kept in float")]
    return {"model": model_name, "pass": pass_name,
            "max_rel_error": None if err is None else f"{err:.1e}",
            "transformed": rec["transformed"], "skipped": len(rec["skipped"]),
            "skip_reason": reasons[0][:90] if reasons else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join([*TINY, *REAL]))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--calibration-samples", type=int, default=8,
                    help="calibration windows for the real models (the passes' searches)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for m in filter(None, a.models.split(",")):
        for p in filter(None, a.passes.split(",")):
            row = run(m, p, a.calibration_samples)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
