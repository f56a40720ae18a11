"""Wall time of ``lowbit.compile`` per recipe, each run in a fresh process (imports, model
load, JIT caches: what a user waits for), on the PROTOCOL's 2 threads.

Per run: the process's wall seconds, the manifest's ``compile_seconds`` (the ``compile`` call:
capture, passes, lowering, backend check), ``capture_seconds``, each pass's seconds and the
process's peak RSS. Prints one JSON line per run, then a table.

    .venv/bin/python bench/compile_time.py                         # w4a16 for torch, 2 runs
    .venv/bin/python bench/compile_time.py --recipes w4a16,w8a8 --target onnxruntime --runs 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from lowbit.report import format_table

_CHILD = """
import json, resource, sys, torch
torch.set_num_threads(int(sys.argv[4]))
import lowbit
cm = lowbit.compile(sys.argv[1], recipe=sys.argv[2], target=sys.argv[3], progress=False)
f = cm.manifest["figures"]
print("RESULT " + json.dumps({
    "compile_seconds": f["compile_seconds"], "capture_seconds": f.get("capture_seconds"),
    "passes": {p["name"]: p.get("seconds") for p in cm.manifest["passes"]},
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def run_once(model: str, recipe: str, target: str, threads: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, model, recipe, target, str(threads)],
                         capture_output=True, text=True, env=env)
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"compile of {model} with {recipe} for {target} failed:\n"
                         f"{out.stderr[-3000:]}")
    return {"recipe": recipe, "target": target, "process_seconds": wall,
            **json.loads(lines[-1][len("RESULT "):])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", default="w4a16")
    ap.add_argument("--target", default="torch")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    rows = []
    for recipe in a.recipes.split(","):
        for _ in range(a.runs):
            row = run_once(a.model, recipe, a.target, a.threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(format_table([{"recipe": r["recipe"], "target": r["target"],
                         "process_s": r["process_seconds"], "compile_s": r["compile_seconds"],
                         "capture_s": r["capture_seconds"],
                         "passes_s": " ".join(f"{k} {v}" for k, v in r["passes"].items()),
                         "peak_rss_mb": r["peak_rss_mb"]} for r in rows]))


if __name__ == "__main__":
    main()
