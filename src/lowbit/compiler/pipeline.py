"""compile(): capture -> calibrate/transform/quantize/pack (passes) -> lower -> verify."""
from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lowbit.backends import ModelSpec
from lowbit.compiler.artifact import FORMAT_VERSION, CompiledModel
from lowbit.compiler.capture import Captured, capture
from lowbit.compiler.context import PassContext
from lowbit.compiler.instruments import GraphDump, Log, NumericVerifier, Timing, \
    max_relative_error
from lowbit.compiler.manager import PassManager
from lowbit.compiler.recipe import load_recipe, override, schedule
from lowbit.errors import DataError, UsageError
from lowbit.plugins.manager import get_registry

__all__ = ["compile", "relower", "resolve_backend", "calibration_batches"]

def resolve_backend(target: str, registry):
    if target in registry.backends:
        return registry.backends[target]
    raise UsageError(f"unknown target '{target}'; available targets: "
                     f"{sorted(registry.backends)}")


def calibration_batches(calibration: Any, captured: Captured, needed: bool,
                        data_dir=None, samples: int = 32) -> list[dict[str, torch.Tensor]]:
    """Normalise ``calibration`` into input dicts (one per sample)."""
    def as_dict(t: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = t if t.dim() == 2 else t[None]
        d = {"input_ids": ids.long()}
        if "attention_mask" in captured.input_names:
            d["attention_mask"] = torch.ones_like(d["input_ids"])
        return d

    if calibration is None:
        if not needed:
            return []
        if captured.tokenizer is None:
            raise DataError("this recipe needs calibration data and the model has no tokenizer "
                            "to read WikiText-2 with: pass calibration=LongTensor[n, seq]")
        from lowbit.data.wikitext import calibration_windows
        windows = calibration_windows(captured.tokenizer, samples, 512, data_dir)
        return [as_dict(w) for w in windows]
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise DataError(f"calibration tensor must be [n, seq] token ids, got shape "
                            f"{tuple(calibration.shape)}")
        return [as_dict(row) for row in calibration]
    if isinstance(calibration, (list, tuple)):
        out = []
        for i, item in enumerate(calibration):
            if isinstance(item, torch.Tensor):
                out.append(as_dict(item))
            elif isinstance(item, Mapping):
                missing = [k for k in captured.input_names if k not in item]
                if missing:
                    raise DataError(f"calibration item #{i} lacks input(s) {missing}")
                out.append({k: item[k] for k in captured.input_names})
            else:
                raise DataError(f"calibration item #{i} is a {type(item).__name__}; give "
                                "token-id tensors or input dicts")
        return out
    raise DataError(f"calibration must be a LongTensor [n, seq], a list of tensors or of input "
                    f"dicts, or None; got {type(calibration).__name__}")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lowbit", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _layer_table(graph) -> dict[str, dict]:
    keys = ("bits", "group_size", "act_bits", "act_clip", "symmetric", "in_features",
            "out_features")
    return {v["name"]: {**{k: v[k] for k in keys}, "act_symmetric": v.get("act_symmetric", True)}
            for v in graph.quant_linears().values()}


def compile(model: Any, recipe: Any = "w4a16", target: str = "onnxruntime",
            calibration: Any = None, *, example_inputs: Any = None, tokenizer: Any = None,
            data_dir: str | Path | None = None, calibration_samples: int = 32,
            backend_options: Mapping[str, Any] | None = None, verify: bool = True,
            verify_tolerance: float = 1e-4, dump_dir: str | Path | None = None,
            progress: bool = True, disable_plugins: Iterable[str] = (),
            recipe_options: Mapping[str, Mapping[str, Any]] | None = None,
            kv_cache: bool | None = None) -> CompiledModel:
    """Compile ``model`` with ``recipe`` for ``target``; returns a :class:`CompiledModel`.

    ``kv_cache`` (default: on for Hugging Face causal LMs on backends that lower a cache;
    the TVM targets do not yet) captures the model in cache form:
    the artifact takes and returns per-layer keys and values, so :meth:`CompiledModel.generate`
    decodes one token per step; ``cm(input_ids)`` still returns the logits.

    Example (tiny random model; real models work the same way)::

        >>> import lowbit, torch
        >>> from lowbit.testing import tiny_llama
        >>> cm = lowbit.compile(tiny_llama(), recipe="w8a16", target="torch", progress=False)
        >>> cm(torch.tensor([[1, 2, 3, 4]])).shape
        torch.Size([1, 4, 128])
    """
    t0 = time.perf_counter()
    registry = get_registry(disable_plugins)
    backend = resolve_backend(target, registry)
    rec = override(load_recipe(recipe, registry.presets), recipe_options)
    passes = schedule(rec, registry)
    if kv_cache is None:
        kv_cache = None if backend.kv_cache else False
    elif kv_cache and not backend.kv_cache:
        raise UsageError(f"backend '{backend.name}' does not lower a KV cache yet: compile "
                         "with kv_cache=False (generate() then recomputes the whole sequence "
                         "per token) or pick target='onnxruntime'/'torch'")
    captured = capture(model, example_inputs=example_inputs, tokenizer=tokenizer,
                       kv_cache=kv_cache)
    capture_seconds = round(time.perf_counter() - t0, 2)
    needs_data = any("calibration" in sp.info.requires for sp in passes)
    batches = calibration_batches(calibration, captured, needs_data, data_dir,
                                  calibration_samples)
    verify_inputs = captured.graph.complete(_verify_inputs(batches, captured))
    ctx = PassContext(calibration=batches, model_kind=captured.kind, progress=progress)
    # before_pass runs in list order, after_pass in reverse: Timing innermost, Log outermost
    instruments: list = [Log()] if progress else []
    if verify:
        instruments.append(NumericVerifier(verify_inputs, verify_tolerance))
    if dump_dir:
        instruments.append(GraphDump(dump_dir))
    instruments.append(Timing())
    PassManager(passes, instruments, catalog=registry.passes.values()).run(captured.graph, ctx)
    spec = ModelSpec(kind=captured.kind, input_names=tuple(captured.graph_inputs),
                     example_inputs=captured.example_inputs, dynamic=captured.kind != "module",
                     max_seq=captured.max_seq or 8192,
                     output_names=tuple(captured.graph_outputs), cache=captured.cache)
    reference = captured.graph.run(verify_inputs) if verify else None
    executable = backend.lower(captured.graph, spec, dict(backend_options or {}))
    figures: dict[str, Any] = {}
    if verify:
        figures.update(_backend_check(executable, backend.name, reference, verify_inputs))
    figures["capture_seconds"] = capture_seconds
    figures["compile_seconds"] = round(time.perf_counter() - t0, 2)
    figures["peak_rss_mb"] = _peak_rss_mb()
    figures["artifact_bytes"] = executable.nbytes
    manifest = {
        "format": FORMAT_VERSION, "backend": backend.name,
        "backend_options": dict(backend_options or {}), "recipe": rec.to_dict(),
        "model": {"name": captured.name, "kind": captured.kind, "source": captured.source,
                  "input_names": list(captured.input_names),
                  "graph_inputs": list(captured.graph_inputs),
                  "graph_outputs": list(captured.graph_outputs),
                  "cache": captured.cache.to_dict() if captured.cache else None,
                  "max_seq": captured.max_seq,
                  "architecture": (captured.config.get("architectures") or [None])[0]},
        "layers": _layer_table(captured.graph),
        "passes": [_record_dict(r) for r in ctx.records],
        "generation": _generation_config(captured),
        "figures": figures, "lowering": getattr(executable, "lowering", None),
        "versions": _versions(),
        "plugins": registry.plugins,
    }
    return CompiledModel(executable, manifest, captured.tokenizer)


def relower(cm: CompiledModel, target: str,
            backend_options: Mapping[str, Any] | None = None) -> CompiledModel:
    """The graph a ``target="torch"`` :class:`CompiledModel` holds, lowered for ``target``
    without capturing or quantizing again: one compile (calibration, GPTQ...) for several
    backends, with the same quantized weights on each.

    The new backend is checked against the torch graph on the captured example inputs (their
    first row where shapes are dynamic) (``figures["backend_max_rel_error_vs_torch"]``), as
    :func:`compile` does. The figures keep the torch compile's ``compile_seconds`` and
    ``peak_rss_mb`` and add ``lowering_seconds`` and the new ``artifact_bytes``.

        >>> import lowbit
        >>> from lowbit.testing import tiny_llama
        >>> ref = lowbit.compile(tiny_llama(), recipe="w8a16", target="torch", progress=False)
        >>> ort = relower(ref, "onnxruntime")                          # doctest: +SKIP
    """
    from lowbit.compiler.fx_graph import FxGraph

    module = getattr(cm.executable, "module", None)
    if cm.backend != "torch" or module is None:
        raise UsageError(f"relower needs a model compiled with target='torch' (it holds the "
                         f"graph); this one is on '{cm.backend}': compile it for 'torch' "
                         "first, or compile again for the new target")
    t0 = time.perf_counter()
    registry = get_registry()
    backend = resolve_backend(target, registry)
    spec = cm.executable.spec
    if spec.cache is not None and not backend.kv_cache:
        raise UsageError(f"this model is compiled with a KV cache and backend "
                         f"'{backend.name}' does not lower one: compile it for 'torch' with "
                         "kv_cache=False first")
    graph = FxGraph(module)
    probe = dict(spec.example_inputs)
    if spec.dynamic:    # one row (ONNX Runtime's fused attention takes one on a cache)
        probe = {k: v[:1] for k, v in probe.items()}
    reference = graph.run(probe)
    executable = backend.lower(graph, spec, dict(backend_options or {}))
    figures = _backend_check(executable, backend.name, reference, probe)
    figures["lowering_seconds"] = round(time.perf_counter() - t0, 2)
    figures["artifact_bytes"] = executable.nbytes
    manifest = {**cm.manifest, "backend": backend.name,
                "backend_options": dict(backend_options or {}),
                "figures": {**{k: v for k, v in cm.figures.items()
                               if k in ("compile_seconds", "peak_rss_mb")}, **figures},
                "lowering": getattr(executable, "lowering", None)}
    return CompiledModel(executable, manifest, cm.tokenizer)


def _backend_check(executable, backend: str, reference: list[torch.Tensor],
                   inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The lowered model against the torch graph's ``reference`` outputs on ``inputs``."""
    if not getattr(executable, "can_run", lambda: True)():
        # e.g. target="cuda" on a machine without a GPU: the library is built and can be
        # saved; the comparison with the torch graph happens where it runs
        return {"backend_verification": f"skipped: {backend} cannot run on this machine"}
    got = executable(inputs)
    return {"backend_max_rel_error_vs_torch": max(max_relative_error(r, g)
                                                  for r, g in zip(reference, got))}


def _generation_config(captured: Captured) -> dict:
    """What a standalone decoding loop needs besides the graph (``generate.py`` reads it)."""
    if captured.kind != "causal_lm":
        return {}
    eos = getattr(captured.tokenizer, "eos_token_id", None)
    return {"eos_token_id": eos if isinstance(eos, int) else None,
            "kv_cache": captured.cache is not None}


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (MB), where the OS reports it."""
    try:
        import resource
    except ImportError:   # not on Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def _verify_inputs(batches, captured: Captured) -> dict[str, torch.Tensor]:
    if captured.kind == "module":  # captured with static shapes: feed them unchanged
        return dict(batches[0]) if batches else dict(captured.example_inputs)
    if batches:
        return {k: v[:1, :64] for k, v in batches[0].items()}
    return {k: v[:1] for k, v in captured.example_inputs.items()}


def _record_dict(r) -> dict:
    return {"name": r.name, "plugin": r.plugin, "numerics": r.numerics, "options": r.options,
            "seconds": round(r.seconds, 3), "changed": r.changed,
            "transformed": len(r.transformed),
            "skipped": [{"target": t, "reason": why} for t, why in r.skipped],
            "metrics": r.metrics, "verification": r.verification}
