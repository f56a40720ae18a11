"""Running an :class:`~lowbit.compiler.onnx_graph.OnnxGraph` on ONNX Runtime.

Whole-graph sessions (for ``run``) and staged evaluation: :class:`StagedRun` cuts the node
list into segments, each run as its own small session built from the weights of that moment,
so a pass may change later weights between stages (sequential GPTQ) and memory holds one
stage's live values per batch.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

__all__ = ["session_for", "save_model", "StagedRun", "EXTERNAL_BYTES"]

#: above this many bytes of weights a model is written with external data (protobuf: 2 GB)
EXTERNAL_BYTES = 1_800_000_000


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def _options():
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return so


def _session_from_proto(proto):
    import onnxruntime as ort
    return ort.InferenceSession(proto.SerializeToString(), _options(),
                                providers=["CPUExecutionProvider"])


def session_for(model: ir.Model):
    """An ONNX Runtime CPU session of ``model`` as it is now."""
    import onnxruntime as ort
    if _weight_bytes(model) < EXTERNAL_BYTES:
        return _session_from_proto(ir.serde.serialize_model(model))
    with tempfile.TemporaryDirectory(prefix="lowbit-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])


def save_model(model: ir.Model, path, external: bool | None = None) -> None:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` beside it when large.

    The exporter's debug metadata on nodes (stack traces, FX nodes: megabytes on a real
    model) is left out of the file; lowbit's own (``lowbit.*``) is kept.
    """
    path = Path(path)
    if external is None:
        external = _weight_bytes(model) >= EXTERNAL_BYTES
    dropped = []
    for n in model.graph.all_nodes():
        extra = {k: v for k, v in n.metadata_props.items() if not k.startswith("lowbit.")}
        if extra:
            dropped.append((n, extra))
            for k in extra:
                del n.metadata_props[k]
    try:
        ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    finally:
        for n, extra in dropped:
            n.metadata_props.update(extra)


def _typed(v: ir.Value, arr: np.ndarray | None = None) -> None:
    if v.type is None and arr is not None:
        v.dtype = ir.DataType.from_numpy(arr.dtype)


class StagedRun:
    """Evaluate a graph over many input batches in node order, stopping where asked.

    ``advance(node)`` runs every batch up to the ONNX node producing ``node``'s value and
    returns that value per batch (see :class:`lowbit.compiler.fx_graph.StagedRun`).
    """

    def __init__(self, graph, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.graph = graph
        self.order = list(graph.graph)
        self._index = {n: i for i, n in enumerate(self.order)}
        end = len(self.order)
        self._last: dict[ir.Value, int] = {v: end for v in graph.graph.outputs}
        for i, n in enumerate(self.order):
            for v in n.inputs:
                if v is not None:
                    self._last[v] = max(self._last.get(v, -1), i)
        by_name = {v.name: v for v in graph.graph.inputs}
        self.envs = [{by_name[k]: a for k, a in f.items()} for f in feeds]
        self.pos = 0

    def advance(self, node: str) -> list[torch.Tensor]:
        """Run all batches up to ``node`` (inclusive); returns its value per batch."""
        e = self.graph._entry(node)
        if e.kind == "constant":
            return [self.graph.attr(node) for _ in self.envs]
        target = e.value
        if e.kind != "input":
            stop = self._index[target.producer()]
            if stop >= self.pos:
                self._run(self.order[self.pos:stop + 1], target, stop)
                self.pos = stop + 1
        if any(target not in env for env in self.envs):
            raise ValueError(f"node '{node}' was already passed (stages must go forward)")
        return [torch.from_numpy(env[target]) for env in self.envs]

    def _run(self, todo: list[ir.Node], target: ir.Value, stop: int) -> None:
        produced = {v for n in todo for v in n.outputs}
        needed = list(dict.fromkeys(v for n in todo for v in n.inputs if v is not None
                                    and v not in produced and not v.is_initializer()))
        keep = [v for n in todo for v in n.outputs
                if v is target or self._last.get(v, -1) > stop]
        if not self.envs:
            return
        for v in needed:
            _typed(v, self.envs[0].get(v))
        sess = self._session(todo, needed, keep)
        names = [v.name for v in keep]
        for env in self.envs:
            outs = sess.run(names, {v.name: env[v] for v in needed})
            env.update(zip(keep, outs))
            for k in [k for k in env if self._last.get(k, -1) <= stop and k is not target]:
                del env[k]

    def _session(self, todo, needed, keep):
        import onnx
        inits = list(dict.fromkeys(v for n in todo for v in n.inputs
                                   if v is not None and v.is_initializer()))
        model = self.graph.model
        view = ir.GraphView(needed, keep, nodes=todo, initializers=inits,
                            opset_imports=dict(model.opset_imports))
        proto = onnx.helper.make_model(
            ir.serde.serialize_graph(view),
            opset_imports=[onnx.helper.make_opsetid(d, v)
                           for d, v in model.opset_imports.items()],
            ir_version=model.ir_version)
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        return _session_from_proto(proto)
