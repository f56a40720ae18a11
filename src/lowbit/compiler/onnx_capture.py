"""Capture of a ``.onnx`` file: read (onnx-ir), check, normalise, describe.

Checks, each failing with a :class:`~lowbit.errors.CaptureError` that names the file and,
where one is at fault, the node, its op and the opset, with a fix:

* the file parses and its external data files exist and are large enough;
* the default domain's opset is at least :data:`MIN_OPSET`;
* every node's op is one ONNX Runtime implements at the model's opset;
* ONNX Runtime can build a session from it (types, shapes, attributes).

Normalisation (no change to what the model computes): ``Constant`` nodes become
initializers, unnamed or clashing nodes get unique names, and small constants shared by
several nodes (exporters deduplicate equal norm weights and zero biases) are untied so a
pass can change one reader's copy. Nothing is written to disk.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.errors import CaptureError

__all__ = ["capture_onnx", "load_onnx", "MIN_OPSET"]

#: oldest default-domain opset accepted (Squeeze/Unsqueeze take axes as inputs from 13)
MIN_OPSET = 13
_WRAPPERS = ("lowbit.compiler.capture._CausalLM", "lowbit.compiler.capture._Encoder")
_UNTIE_MAX_ELEMENTS = 1 << 20


def _fail(path, what: str, fix: str) -> CaptureError:
    return CaptureError(f"cannot capture ONNX model '{path}': {what}. Fix: {fix}")


def _ort_ops() -> dict[tuple[str, str], int]:
    """``(domain, op) -> lowest since_version`` of every op ONNX Runtime implements."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C
    out: dict[tuple[str, str], int] = {}
    for s in C.get_all_operator_schema():
        key = (s.domain or "", s.name)
        out[key] = min(out.get(key, s.since_version), s.since_version)
    return out


def _check_external(path: Path, model: ir.Model) -> None:
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            f = Path(t.base_dir) / t.location
            if not f.exists():
                raise _fail(path, f"initializer '{v.name}' keeps its data in '{t.location}', "
                            "which is not there", "put the external data file next to the "
                            ".onnx file (as it was saved)")
            if t.offset is not None and t.length is not None \
                    and t.offset + t.length > f.stat().st_size:
                raise _fail(path, f"external data file '{t.location}' is shorter than "
                            f"initializer '{v.name}' needs (truncated?)",
                            "copy the external data file again")


def _check_ops(path: Path, model: ir.Model) -> None:
    opsets = dict(model.opset_imports)
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise _fail(path, "it imports no default ONNX opset", "re-export the model")
    if default < MIN_OPSET:
        raise _fail(path, f"opset {default} is older than the oldest supported ({MIN_OPSET})",
                    "upgrade it: onnx.version_converter.convert_version(model, 18), or "
                    "re-export with opset_version>=18")
    known = _ort_ops()
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for n in model.graph.all_nodes():
        domain = "" if n.domain == "ai.onnx" else n.domain
        if (domain, n.op_type) in functions:
            continue
        version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
        where = f"node '{n.name}' (op '{(domain + '::') if domain else ''}{n.op_type}')"
        if version is None:
            raise _fail(path, f"{where} uses domain '{domain}', which the model does not "
                        "import", "add the domain to the model's opset_import")
        since = known.get((domain, n.op_type))
        if since is None or since > version:
            what = "is not an op ONNX Runtime implements" if since is None else \
                f"exists only from opset {since}"
            raise _fail(path, f"{where} {what} (model opset {version} for domain "
                        f"'{domain or 'ai.onnx'}')", "re-export the model with standard ops "
                        "(or a newer opset), or replace the custom op")


def _check_session(path: Path) -> None:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several pybind types; its message names the node
        first = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
        raise _fail(path, f"ONNX Runtime cannot load it: {first}",
                    "check the node named above (types, shapes, attributes); "
                    "onnx.checker.check_model(path, full_check=True) gives details") from e


def _normalise(model: ir.Model) -> None:
    from onnx_ir.passes.common import LiftConstantsToInitializersPass
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    g = model.graph
    taken = {v.name for v in g.inputs} | set(g.initializers)
    seen: set[str] = set()
    for i, n in enumerate(g):
        if not n.name or n.name in seen or n.name in taken or n.name == "output":
            n.name = f"{n.op_type}_{i}"
            while n.name in seen or n.name in taken:
                n.name += "_"
        seen.add(n.name)
    for name, v in list(g.initializers.items()):
        t = v.const_value
        uses = list(v.uses())
        if len(uses) < 2 or t is None or v.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16,
                                                         ir.DataType.BFLOAT16) \
                or t.size > _UNTIE_MAX_ELEMENTS or len(t.shape) > 1:
            continue
        for j, use in enumerate(uses[1:], 1):
            arr = np.array(t.numpy())
            copy = ir.Value(name=f"{name}__{j}", shape=ir.Shape(arr.shape),
                            type=ir.TensorType(v.dtype), const_value=ir.Tensor(arr))
            g.register_initializer(copy)
            use.node.replace_input_with(use.idx, copy)


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Read and check ``path`` (see module doc); returns the normalised model."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"ONNX model '{path}' not found")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf DecodeError and friends: the file is not ONNX
        raise _fail(path, f"the file is not a readable ONNX model ({type(e).__name__}: "
                    f"{str(e)[:200]})", "re-export it; check the download is complete") from e
    if not model.graph.outputs:
        raise _fail(path, "the graph has no outputs", "re-export the model")
    _check_external(path, model)
    _check_ops(path, model)
    _check_session(path)
    _normalise(model)
    return model


def _vocab(model: ir.Model, ids: ir.Value) -> int | None:
    for use in ids.uses():
        n = use.node
        if n.op_type == "Gather" and use.idx == 1 and n.inputs[0].const_value is not None:
            return int(n.inputs[0].const_value.shape[0])
    return None


def _kind(model: ir.Model) -> tuple[str, int | None]:
    g = model.graph
    names = [v.name for v in g.inputs]
    ids = next((v for v in g.inputs if v.name == "input_ids"), None)
    if ids is None:
        return "module", None
    vocab = _vocab(model, ids)
    out = g.outputs[0]
    last = out.shape[-1] if out.shape is not None and len(out.shape) == 3 else None
    if set(names) <= {"input_ids", "attention_mask"} and vocab and last == vocab:
        return "causal_lm", vocab
    if "attention_mask" in names and set(names) <= {"input_ids", "attention_mask",
                                                    "token_type_ids"} and last is not None:
        return "encoder", vocab
    return "module", vocab


def _example(v: ir.Value, kind: str, vocab: int | None) -> torch.Tensor:
    dims = [d if isinstance(d, int) else (2 if i == 0 else 16)
            for i, d in enumerate(v.shape or ())] if kind == "module" else [2, 16]
    dtype = torch.from_numpy(np.zeros(0, dtype=v.dtype.numpy())).dtype
    gen = torch.Generator().manual_seed(0)
    if v.name == "input_ids":
        return torch.randint(3, max(vocab or 100, 4), dims, generator=gen, dtype=dtype)
    if v.name == "attention_mask":
        return torch.ones(dims, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.zeros(dims, dtype=dtype)
    return torch.randn(dims, generator=gen).to(dtype)


def _tokenizer(path: Path, tokenizer: Any):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    candidates = [Path(tokenizer)] if tokenizer is not None else \
        [path.parent, path.parent / "tokenizer"]
    for d in candidates:
        if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer
            try:
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                raise CaptureError(f"tokenizer in '{d}' could not be loaded: {e}") from e
    if tokenizer is not None:
        raise CaptureError(f"no tokenizer found in '{tokenizer}'")
    return None


def capture_onnx(path: str | os.PathLike, tokenizer: Any = None):
    """Capture a ``.onnx`` file into an :class:`OnnxGraph` (see module doc).

    The model kind is inferred from its signature: ``causal_lm`` for ``input_ids`` (and
    optionally ``attention_mask``) -> logits ``[batch, seq, vocab]``; ``encoder`` for
    ``input_ids`` + ``attention_mask`` -> hidden states; else ``module``. The tokenizer is
    ``tokenizer`` (an object or a directory) or one saved next to the file.
    """
    from lowbit.compiler.capture import Captured
    from lowbit.compiler.onnx_graph import OnnxGraph
    path = Path(path)
    model = load_onnx(path)
    kind, vocab = _kind(model)
    # exported through lowbit's own wrapper: its attribute "model." prefixes every layer
    wrapped = any(w in n.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
                  for n in model.graph for w in _WRAPPERS)
    graph = OnnxGraph(model, strip_prefix="model." if wrapped else "")
    example = {v.name: _example(v, kind, vocab) for v in model.graph.inputs}
    return Captured(graph=graph, kind=kind, name=path.stem, input_names=list(example),
                    example_inputs=example, tokenizer=_tokenizer(path, tokenizer),
                    config={}, source=str(path), max_seq=0 if kind == "module" else 8192)
