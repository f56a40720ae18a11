"""Weight-quantizer comparison on SmolLM2-135M per ../shared/PROTOCOL.md.

Captures the model once, then for each recipe runs its passes on a copy of the graph and
measures WikiText-2 perplexity (64 windows of 512) on the torch reference backend, the packed
bytes, pass seconds and the process's peak RSS. Prints one JSON line per recipe, then a table.

    .venv/bin/python bench/weight_quant.py                          # the default table
    .venv/bin/python bench/weight_quant.py --recipes w4a16 --windows 16
    .venv/bin/python bench/weight_quant.py --recipe-json '{"name": "x", "passes": [...]}'
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch

from lowbit.compiler.capture import capture
from lowbit.compiler.context import PassContext
from lowbit.compiler.instruments import Timing
from lowbit.compiler.manager import PassManager
from lowbit.compiler.pipeline import calibration_batches
from lowbit.compiler.recipe import Recipe, load_recipe, schedule
from lowbit.data.wikitext import eval_windows
from lowbit.eval import perplexity
from lowbit.plugins.manager import get_registry
from lowbit.report import format_table


def _w4(quantizer: dict, *pre) -> dict:
    return {"passes": [*pre, quantizer, "pack"]}


G128 = {"bits": 4, "group_size": 128, "symmetric": False}
#: name -> recipe; the issue's table of quantizers and combinations at W4 g128 asymmetric.
TABLE = {
    "rtn": _w4({"rtn": G128}),
    "clip": _w4({"clip": G128}),
    "gptq": _w4({"gptq": {**G128, "clip_search": False}}),
    "gptq+clip": _w4({"gptq": G128}),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_recipe(base, recipe: Recipe, registry, batches, ids) -> dict:
    graph_copy = dataclasses.replace(base, graph=base.graph.copy())
    passes = schedule(recipe, registry)
    ctx = PassContext(calibration=batches, model_kind=graph_copy.kind, progress=False)
    t0 = time.perf_counter()
    PassManager(passes, [Timing()], catalog=registry.passes.values()).run(graph_copy.graph, ctx)
    seconds = time.perf_counter() - t0
    fn = lambda x: graph_copy.graph.run({"input_ids": x})[0]  # noqa: E731
    packed = sum(r.metrics.get("packed_bytes", 0) for r in ctx.records if r.name == "pack")
    return {"recipe": recipe.name, "ppl": round(perplexity(fn, None, windows=ids,
                                                           progress=False)["ppl"], 3),
            "pass_seconds": round(seconds, 1), "packed_bytes": packed,
            "peak_rss_mb": round(peak_rss_mb()),
            "passes": {r.name: round(r.seconds, 1) for r in ctx.records}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", default=",".join(TABLE),
                    help=f"comma-separated names from {list(TABLE)} or presets")
    ap.add_argument("--recipe-json", action="append", default=[],
                    help="an extra recipe as JSON (repeatable)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (PROTOCOL: 2)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    registry = get_registry()
    base = capture(a.model)
    batches = calibration_batches(None, base, True)
    ids = eval_windows(base.tokenizer, a.windows)
    recipes = []
    for name in filter(None, a.recipes.split(",")):
        spec = TABLE.get(name)
        recipes.append(Recipe.from_dict({"name": name, **spec}) if spec
                       else load_recipe(name, registry.presets))
    recipes += [Recipe.from_dict(json.loads(j)) for j in a.recipe_json]
    rows = []
    for recipe in recipes:
        row = run_recipe(base, recipe, registry, batches, ids)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(format_table([{k: v for k, v in r.items() if k != "passes"} for r in rows]))


if __name__ == "__main__":
    main()
