"""The main job: compile the default model with the default recipe, evaluate, tabulate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lowbit.benchmark import median_ms
from lowbit.report import format_table

__all__ = ["run_main_job", "latency", "decode_latency"]


def latency(fn, vocab: int, seq: int, runs: int = 5) -> float:
    """Median ms of one forward over ``seq`` tokens (PROTOCOL: >= 5 runs, 2 warm-ups)."""
    ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    return median_ms(lambda: fn(ids), runs=runs)


def decode_latency(cm, vocab: int, context: int = 128, runs: int = 5) -> float:
    """Median ms of one cached decode step after ``context`` tokens (PROTOCOL: 128), stepped
    the way ``generate()`` steps it (in place where the artifact offers a cached decoder)."""
    cache = cm.cache
    ids = torch.randint(3, vocab, (1, context + 1), generator=torch.Generator().manual_seed(0))
    make = getattr(cm.executable, "cached_decoder", None)
    decoder = make(1, context + 1) if make is not None else None
    if decoder is not None:
        decoder(ids[:, :context])
        return median_ms(lambda: (decoder.rewind(context), decoder(ids[:, context:])),
                         runs=runs)
    _, *present = cm.executable({"input_ids": ids[:, :context], **cache.empty(1)})
    feeds = {"input_ids": ids[:, context:], **dict(zip(cache.input_names, present))}
    return median_ms(lambda: cm.executable(feeds), runs=runs)


def run_main_job(model: str = "smollm2", recipe: str = "w4a16", target: str = "onnxruntime",
                 windows: int = 64, out: str | Path = "artifacts/smollm2-w4a16",
                 data_dir=None, threads: int = 2) -> list[dict]:
    import lowbit
    from lowbit.compiler.capture import capture
    from lowbit.data.wikitext import eval_windows
    from lowbit.eval import perplexity

    torch.set_num_threads(threads)
    options = {"threads": threads} if target in ("onnxruntime", "cpu", "ort") else {}
    cm = lowbit.compile(model, recipe=recipe, target=target, data_dir=data_dir,
                        backend_options=options)
    tok = cm.tokenizer
    ids = eval_windows(tok, windows, 512, data_dir)
    vocab = int(tok.vocab_size)
    fp32 = capture(model).graph                 # the same graph, before any pass
    variants = [("fp32 (torch)", lambda x: fp32.run({"input_ids": x})[0],
                 fp32.num_parameters_bytes())]
    if target != "torch":                       # the uncompressed graph on the same runtime
        base = lowbit.compile(model, recipe="fp32", target=target, backend_options=options,
                              progress=False)
        variants.append((f"fp32 ({base.backend})", base, base.nbytes))
    variants.append((f"{recipe} ({cm.backend})", cm, cm.nbytes))
    rows = []
    for name, fn, nbytes in variants:
        print(f"[lowbit] evaluating {name} on {windows} windows...", file=sys.stderr)
        ppl = perplexity(fn, tok, windows=ids)
        rows.append({"model": model, "variant": name, "ppl": round(ppl["ppl"], 3),
                     "bytes": nbytes, "prefill_512_ms": round(latency(fn, vocab, 512), 1),
                     "forward_129_ms": round(latency(fn, vocab, 129), 1),
                     "decode_128_ms": round(decode_latency(fn, vocab, 128), 2)
                     if getattr(fn, "cache", None) is not None else None})
    cm.figures.update({"perplexity": rows[-1]["ppl"], "perplexity_fp32": rows[0]["ppl"],
                       "eval_windows": windows, "prefill_512_ms": rows[-1]["prefill_512_ms"],
                       "forward_129_ms": rows[-1]["forward_129_ms"],
                       "decode_128_ms": rows[-1]["decode_128_ms"]})
    cm.save(out, overwrite=True)
    rows[-1]["bytes"] = cm.figures["artifact_bytes"]
    print(format_table(rows))
    print(f"\nartifact: {out}  (lowbit report {out})")
    for r in rows:
        print(json.dumps(r))
    return rows
