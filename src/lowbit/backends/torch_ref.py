"""The torch reference backend: runs the FX graph with lowbit's reference kernels.

Saved as JSON graph (torch.export serialization) + safetensors weights: no pickle on disk.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

import lowbit.ops  # noqa: F401
from lowbit.backends import BackendInfo, ModelSpec
from lowbit.backends._export import export_program
from lowbit.compiler.kv_cache import KVCacheSpec
from lowbit.errors import LoweringError

__all__ = ["TorchExecutable", "BACKEND"]

_GRAPH, _WEIGHTS, _CONSTANTS = "graph.json", "weights.safetensors", "constants.safetensors"
_SIGNATURE = "signature.json"


class TorchExecutable:
    backend = "torch"

    def __init__(self, module: torch.nn.Module, spec: ModelSpec):
        self.module = module
        self.spec = spec

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            out = self.module(*[inputs[k] for k in self.spec.input_names])
        flat, _ = torch.utils._pytree.tree_flatten(out)
        return [t for t in flat if isinstance(t, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.module.parameters(), *self.module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def save(self, directory: Path) -> list[str]:
        from torch._export.serde.serialize import serialize
        ep = export_program(self.module, self.spec)
        art = serialize(ep)
        (directory / _GRAPH).write_bytes(art.exported_program)
        state = {k: v.detach().contiguous() for k, v in ep.state_dict.items()}
        save_file(_dedupe(state), str(directory / _WEIGHTS))
        consts = {k: v.contiguous() for k, v in ep.constants.items()
                  if isinstance(v, torch.Tensor)}
        save_file(_dedupe(consts), str(directory / _CONSTANTS))
        inputs = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                  for k, v in self.spec.example_inputs.items()}
        (directory / _SIGNATURE).write_text(json.dumps(
            {"parameters": list(ep.graph_signature.parameters), "inputs": inputs}))
        return [_GRAPH, _WEIGHTS, _CONSTANTS, _SIGNATURE]


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): store independent copies
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()  # in-memory only: torch's deserializer takes this form
    torch.save(obj, buf)
    return buf.getvalue()


def lower(graph, spec: ModelSpec, options: Mapping) -> TorchExecutable:
    if getattr(graph, "form", "fx") != "fx":
        raise LoweringError(f"the torch backend runs graphs captured from PyTorch; this one "
                            f"was captured from {graph.form.upper()}. Fix: "
                            "target='onnxruntime'")
    return TorchExecutable(graph.sync(), spec)


def load(directory: Path, manifest: Mapping) -> TorchExecutable:
    from torch._export.serde.serialize import SerializedArtifact, deserialize
    state = load_file(str(directory / _WEIGHTS))
    signature = json.loads((directory / _SIGNATURE).read_text())
    for name in signature["parameters"]:
        state[name] = torch.nn.Parameter(state[name], requires_grad=False)
    m = manifest["model"]
    names = m.get("graph_inputs") or m["input_names"]
    example = tuple(torch.zeros(shape, dtype=getattr(torch, dtype))
                    for shape, dtype in (signature["inputs"][k] for k in names))
    consts = load_file(str(directory / _CONSTANTS))
    art = SerializedArtifact((directory / _GRAPH).read_bytes(), _torch_bytes(state),
                             _torch_bytes(consts), _torch_bytes((example, {})))
    ep = deserialize(art)
    spec = ModelSpec(kind=m["kind"], input_names=tuple(names),
                     example_inputs=dict(zip(names, example)),
                     output_names=tuple(m.get("graph_outputs") or ()),
                     cache=KVCacheSpec.from_dict(m.get("cache")))
    return TorchExecutable(ep.module(), spec)


BACKEND = BackendInfo(name="torch", lower=lower, load=load, aliases=("reference",),
                      description="torch reference kernels (runs everything; eval, debugging)")
