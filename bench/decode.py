"""Decode benchmark (issue 6) on SmolLM2-135M per ../shared/PROTOCOL.md.

Rows: fp32 on torch, fp32 on ONNX Runtime, ONNX Runtime's own int4 RTN quantizer applied to
the fp32 artifact (``MatMulNBitsQuantizer``: block 128, asymmetric, accuracy_level 4; the
peer baseline), and each lowbit preset on ONNX Runtime (4-bit presets at MatMulNBits
accuracy_level 0 and 4: one compile, the level is an attribute of the saved graph).

Columns: WikiText-2 perplexity (``--windows`` of 512, PROTOCOL: 64), artifact bytes (the
``.onnx`` file; the torch row counts its tensors), prefill of 512 tokens, decode of one token
on a 128-token cache, tokens/s of that decode, decode on 512- and 1024-token caches
(flatness; ``decode_growth`` is the longest context's step over the shortest's; ONNX Runtime
rows step the way ``generate()`` does, with the cache in fixed buffers extended in place, and
``--copy-cache`` adds rows stepping the same artifacts through separate past/present tensors),
and greedy agreement with fp32 torch (``--prompts`` WikiText-2 test lines cut to
32 tokens, 32 new tokens each: the share of prompts whose continuation is identical, and the
mean share of tokens generated before the first difference).

Timing (PROTOCOL): 2 threads, median of ``--runs`` (>= 5) after 2 warm-ups. All variants are
kept loaded and timed round-robin (per round and variant: 50 ms idle, one untimed call, one
timed call: the idle lets other sessions' spinning worker threads stop), so a
load change on a shared machine hits every row alike and the ratios of one run compare.
``paired_ratio_p25_p50_p75``: the decode ratio to fp32 ONNX Runtime within each round (the
two calls moments apart), as quartiles over the rounds: the spread of the ratio itself.

    .venv/bin/python bench/decode.py                                   # everything
    .venv/bin/python bench/decode.py --presets w4a16-rtn --windows 8   # quick look
    .venv/bin/python bench/decode.py --presets w4a16+head+embed --levels 4 --windows 0 \
        --prompts 0 --contexts 128 --runs 31 --load DIR  # timing only, DIR from --save
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.compiler.artifact import CompiledModel
from lowbit.data.wikitext import eval_windows, text_lines
from lowbit.eval import perplexity
from lowbit.report import format_table

THREADS = 2
IDLE_S = 0.05       # idle before each probe (see Timer.run)


def _log(msg: str) -> None:
    print(f"[decode] {msg}", file=sys.stderr, flush=True)


def _with_onnx(cm: CompiledModel, directory: Path, edit, label: str) -> CompiledModel:
    """A copy of an ORT artifact whose ``model.onnx`` went through ``edit(ModelProto)``."""
    import onnx

    from lowbit.backends.onnxruntime import OrtExecutable
    model = onnx.load(str(cm.executable.path))
    model = edit(model) or model
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    manifest = copy.deepcopy(cm.manifest)
    manifest["bench_variant"] = label
    exe = OrtExecutable(directory, cm.executable.spec, threads=THREADS)
    return CompiledModel(exe, manifest, cm.tokenizer)


def at_accuracy_level(cm: CompiledModel, level: int, directory: Path) -> CompiledModel:
    def edit(model):
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level
    return _with_onnx(cm, directory, edit, f"accuracy_level={level}")


def ort_rtn(fp32: CompiledModel, directory: Path) -> CompiledModel:
    """ONNX Runtime's own 4-bit RTN (its defaults: block 128, asymmetric) at level 4.

    It quantizes every MatMul with a constant weight: the output head included."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger().setLevel(logging.WARNING)    # its import configures INFO logging

    def edit(model):
        q = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False,
                                 accuracy_level=4)
        q.process()
        return q.model.model
    return _with_onnx(fp32, directory, edit, "onnxruntime MatMulNBitsQuantizer")


def recipe_of(variant: str):
    """``"w4a16+head+embed"``: the preset with ``include_head=True`` on its weight quantizer(s)
    (``+head``) and the ``embed_quant`` pass (int8 embedding rows) appended (``+embed``)."""
    from lowbit.compiler.recipe import PassSpec, Recipe, load_recipe
    from lowbit.plugins.manager import get_registry
    preset, *extras = variant.split("+")
    unknown = set(extras) - {"head", "embed"}
    if unknown:
        raise SystemExit(f"unknown variant suffix(es) {sorted(unknown)} (known: +head, +embed)")
    reg = get_registry()
    passes = []
    for spec in load_recipe(preset, reg.presets).passes:
        if "head" in extras and "include_head" in reg.passes[spec.name].option_names():
            spec = PassSpec(spec.name, {**spec.options, "include_head": True})
        passes.append(spec)
    if "embed" in extras:
        passes.append(PassSpec("embed_quant"))
    return Recipe(variant, tuple(passes), f"bench variant of '{preset}'")


def onnx_bytes(cm: CompiledModel) -> int:
    if cm.backend == "onnxruntime":
        d = Path(cm.executable.model_dir)
        return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))
    return cm.nbytes


class Timer:
    """Round-robin latency probes of many variants (see the module docstring)."""

    def __init__(self, vocab: int, contexts: list[int], prefill: int):
        self.vocab, self.contexts, self.prefill = vocab, contexts, prefill
        self.probes: dict[tuple[str, str], object] = {}

    def add(self, name: str, cm: CompiledModel, copy_cache: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.vocab, (1, max(self.prefill, *self.contexts) + 1),
                            generator=gen)
        if getattr(cm.executable, "static_cache", False) and not copy_cache:
            make = cm.executable.cached_decoder
            # what generate() runs: the cache in fixed buffers extended in place; each timed
            # call rewinds to the context and writes the same position again
            for ctx, key in [(0, "prefill_512_ms"), *((c, f"decode_{c}_ms")
                                                       for c in self.contexts)]:
                new = ids[:, :self.prefill] if ctx == 0 else ids[:, ctx:ctx + 1]
                dec = make(1, ctx + new.shape[1])
                if ctx:
                    dec(ids[:, :ctx])
                self.probes[(name, key)] = lambda d=dec, c=ctx, x=new: (d.rewind(c), d(x))
            return
        cache, step = cm.cache, cm.executable          # past/present tensors: copied per step
        feeds = {"input_ids": ids[:, :self.prefill], **cache.empty(1)}
        self.probes[(name, "prefill_512_ms")] = lambda f=feeds: step(f)
        for ctx in self.contexts:
            _, *present = step({"input_ids": ids[:, :ctx], **cache.empty(1)})
            f = {"input_ids": ids[:, ctx:ctx + 1], **dict(zip(cache.input_names, present))}
            self.probes[(name, f"decode_{ctx}_ms")] = lambda f=f: step(f)

    def run(self, runs: int, warmup: int = 2) -> dict[tuple[str, str], list[float]]:
        """Milliseconds of every timed run per probe, in round order (so runs pair up)."""
        times: dict = {k: [] for k in self.probes}
        for r in range(warmup + runs):
            for key, probe in self.probes.items():
                # idle first, then one untimed call: ONNX Runtime's worker threads spin for a
                # while after a run, and the previous variant's spinning workers would
                # otherwise share the two cores with this call (measured: 40 ms instead of 21
                # with 3 sessions without either; with the untimed call alone a 10 ms int4
                # step still read ~1 ms slow, fp32 steps less: the ratios were biased upward)
                time.sleep(IDLE_S)
                probe()
                t0 = time.perf_counter()
                probe()
                if r >= warmup:
                    times[key].append((time.perf_counter() - t0) * 1e3)
        return times


def agreement(cm: CompiledModel, prompts: list[torch.Tensor], reference: list[torch.Tensor],
              new_tokens: int) -> tuple[float, float]:
    """(share of identical greedy continuations, mean share before the first difference)."""
    same, prefix = 0, 0.0
    for ids, ref in zip(prompts, reference):
        out = cm.generate(ids, new_tokens, stop_at_eos=False).new_ids[0]
        diff = (out != ref).nonzero()
        n = int(diff[0]) if len(diff) else new_tokens
        same += n == new_tokens
        prefix += n / new_tokens
    return same / len(prompts), prefix / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--presets", default="w8a8,w4a16-rtn,w4a16,w4a16+head",
                    help="presets; PRESET+head also quantizes the output head, "
                         "PRESET+embed the embedding table (int8 rows)")
    ap.add_argument("--levels", default="0,4", help="MatMulNBits accuracy levels (4-bit)")
    ap.add_argument("--windows", type=int, default=64, help="perplexity windows (0: skip)")
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--prompts", type=int, default=16, help="greedy-agreement prompts (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-ort-rtn", action="store_true", help="skip ORT's own quantizer row")
    ap.add_argument("--copy-cache", action="store_true",
                    help="also time each in-place ORT row with separate past/present tensors "
                         "(the cache copied into new tensors each step), in the same rounds")
    ap.add_argument("--save", help="save each ORT artifact under this directory")
    ap.add_argument("--load", help="load PRESET from DIR/PRESET where saved (--save) "
                                   "instead of compiling it")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-decode-"))
    opts = {"threads": THREADS}
    contexts = [int(c) for c in a.contexts.split(",")]

    _log("compiling fp32 (torch, onnxruntime)")
    fp32_torch = lowbit.compile(a.model, recipe="fp32", target="torch", progress=False)
    tok = fp32_torch.tokenizer
    vocab = int(tok.vocab_size)
    windows = eval_windows(tok, a.windows) if a.windows else None
    lines = text_lines("test", a.prompts) if a.prompts else []
    prompts = [torch.tensor([tok(line)["input_ids"][:32]]) for line in lines]
    reference = [fp32_torch.generate(p, a.new_tokens, stop_at_eos=False).new_ids[0]
                 for p in prompts]
    variants: list[tuple[str, str, CompiledModel]] = [("fp32", "torch", fp32_torch)]
    fp32_ort = lowbit.compile(a.model, recipe="fp32", target="onnxruntime",
                              backend_options=opts, progress=False)
    variants.append(("fp32", "onnxruntime", fp32_ort))
    if not a.no_ort_rtn:
        _log("onnxruntime's own RTN quantizer")
        variants.append(("ORT MatMulNBitsQuantizer int4", "onnxruntime (accuracy_level=4)",
                         ort_rtn(fp32_ort, tmp / "ort-rtn")))
    for preset in filter(None, a.presets.split(",")):
        saved = Path(a.load) / preset if a.load else None
        if saved is not None and (saved / "manifest.json").exists():
            _log(f"loading {preset} from {saved}")
            cm = lowbit.load(saved)
        else:
            _log(f"compiling {preset}")
            t0 = time.perf_counter()
            cm = lowbit.compile(a.model, recipe=recipe_of(preset), target="onnxruntime",
                                backend_options=opts, progress=False)
            _log(f"compiled {preset} in {time.perf_counter() - t0:.0f} s")
        if a.save:
            cm.save(Path(a.save) / preset, overwrite=True)
        if any(q["bits"] == 4 for q in cm.manifest["layers"].values()):
            for level in (int(x) for x in a.levels.split(",")):
                variants.append((preset, f"onnxruntime (accuracy_level={level})",
                                 at_accuracy_level(cm, level, tmp / f"{preset}-{level}")))
        else:
            variants.append((preset, "onnxruntime", cm))

    rows = []
    for name, backend, cm in variants:
        _log(f"quality of {name} / {backend}")
        row = {"variant": name, "backend": backend, "bytes": onnx_bytes(cm)}
        if windows is not None:
            row["ppl"] = round(perplexity(cm, None, windows=windows, progress=False)["ppl"], 3)
        if prompts:
            row["greedy_identical"], row["greedy_prefix"] = (
                round(x, 3) for x in agreement(cm, prompts, reference, a.new_tokens))
        rows.append(row)
    _log("timing (round-robin)")
    timer = Timer(vocab, contexts, 512)
    for i, (_, _, cm) in enumerate(variants):
        timer.add(str(i), cm)
    for i, (name, backend, cm) in enumerate(variants if a.copy_cache else []):
        if getattr(cm.executable, "static_cache", False):
            timer.add(str(len(rows)), cm, copy_cache=True)
            rows.append({"variant": name, "backend": f"{backend}, copying cache",
                         "bytes": rows[i]["bytes"]})
    times = timer.run(a.runs)
    for i, row in enumerate(rows):
        row.update({k: round(statistics.median(v), 2) for (n, k), v in times.items()
                    if n == str(i)})
        row["tokens_per_s"] = round(1e3 / row[f"decode_{contexts[0]}_ms"], 1)
        if len(contexts) > 1:        # flatness: the longest context's step over the shortest's
            row["decode_growth"] = round(row[f"decode_{contexts[-1]}_ms"]
                                         / row[f"decode_{contexts[0]}_ms"], 3)
    base = next(i for i, r in enumerate(rows)
                if r["variant"] == "fp32" and r["backend"] == "onnxruntime")
    key = f"decode_{contexts[0]}_ms"
    for i, row in enumerate(rows):
        row["decode_ratio_vs_fp32_ort"] = round(row[key] / rows[base][key], 3)
        # paired: the ratio within each round (both timed moments apart), then its quartiles
        paired = np.array(times[(str(i), key)]) / np.array(times[(str(base), key)])
        row["paired_ratio_p25_p50_p75"] = [round(float(q), 3)
                                          for q in np.percentile(paired, [25, 50, 75])]
        print(json.dumps(row), flush=True)
    print()
    columns = ["variant", "backend", "ppl", "bytes", "prefill_512_ms",
               f"decode_{contexts[0]}_ms", "tokens_per_s",
               *(f"decode_{c}_ms" for c in contexts[1:]), "decode_growth",
               "decode_ratio_vs_fp32_ort",
               "greedy_identical", "greedy_prefix"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))


if __name__ == "__main__":
    main()
