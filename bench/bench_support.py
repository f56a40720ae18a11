"""Helpers shared by the TVM benchmarks (bench/ is on sys.path when a script runs)."""
from __future__ import annotations


def lower_again(ref, target: str, options: dict):
    """The graph ``ref`` (a torch-backend CompiledModel) holds, lowered for ``target``: the
    same quantized weights on both backends, captured and quantized once."""
    from lowbit.compiler.artifact import CompiledModel
    from lowbit.compiler.fx_graph import FxGraph
    from lowbit.compiler.pipeline import resolve_backend
    from lowbit.plugins.manager import get_registry
    backend = resolve_backend(target, get_registry())
    graph = FxGraph(ref.executable.module)
    exe = backend.lower(graph, ref.executable.spec, options)
    manifest = {**ref.manifest, "backend": backend.name, "backend_options": options}
    return CompiledModel(exe, manifest, ref.tokenizer)
