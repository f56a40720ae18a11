"""ONNX Runtime backend: a standard .onnx with ``com.microsoft`` quantized operators.

Lowering of the lowbit ops: :mod:`lowbit.backends._ort_translate` (``MatMulNBits``, the
integer path, the online Hadamard); a decoder in cache form is then rewritten into ONNX
Runtime's fused operators (:mod:`lowbit.backends._ort_fuse`) and checked against the unfused
graph.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from lowbit.backends import BackendInfo, ModelSpec
from lowbit.backends._export import spec_dynamic_shapes
from lowbit.compiler.kv_cache import KVCacheSpec, run_in_chunks
from lowbit.errors import LoweringError, UsageError

__all__ = ["OrtExecutable", "StaticCacheDecoder", "BACKEND", "optimized_op_types",
           "export_onnx"]

_MODEL = "model.onnx"
_SCRIPT = "generate.py"     # standalone generation (numpy + onnxruntime), for cache-form LMs
_DEFAULT_OPTIONS = {"accuracy_level": 0, "threads": 0, "fuse": True}
_FUSION_RTOL = 1e-4
#: The input a fused decoder graph gains (:mod:`lowbit.backends._ort_attention`): how many
#: leading positions of the cache tensors are valid.
CACHE_LENGTH = "cache_length"


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the onnxruntime backend needs the [onnx] extra ({e.name} missing): "
                         "pip install 'lowbit[onnx]'") from e


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and unrelated warnings (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(gm: torch.fx.GraphModule, spec: ModelSpec, path: Path,
                accuracy_level: int = 4, fuse: bool = True) -> dict | None:
    """Export ``gm`` (with lowbit nodes) to ``path`` (external data above ~1.8 GB).

    A decoder in cache form is rewritten into ONNX Runtime's fused operators
    (:mod:`lowbit.backends._ort_fuse`) when ``fuse``; returns that rewrite's report.
    """
    _require()
    args = tuple(spec.example_inputs[k] for k in spec.input_names)
    from lowbit.backends._ort_translate import hadamard_translation, quant_linear_translation
    table = {torch.ops.lowbit.quant_linear.default: quant_linear_translation(accuracy_level),
             torch.ops.lowbit.hadamard.default: hadamard_translation()}
    try:
        with _quiet():
            prog = torch.onnx.export(gm, args, input_names=list(spec.input_names),
                                     output_names=list(spec.output_names) or None,
                                     dynamo=True, dynamic_shapes=spec_dynamic_shapes(spec),
                                     optimize=True, custom_translation_table=table,
                                     verbose=False)
    except LoweringError:
        raise
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            if isinstance(cause.__cause__, LoweringError):
                raise cause.__cause__ from e
            cause = cause.__cause__
        raise LoweringError(f"ONNX export failed: {str(e).strip().splitlines()[0][:300]}"
                            f" (root cause: {type(cause).__name__}: {str(cause)[:300]})") from e
    # exporter debug metadata (stack traces per node) is a few MB on a real model: drop it
    for node in prog.model.graph:
        node.metadata_props.clear()
        node.doc_string = None
    external = sum(t.numel() * t.element_size() for t in gm.state_dict().values()) > 1.8e9
    report, model = None, prog.model
    if spec.cache is not None and fuse:
        model, report = _fuse_checked(model, spec, path.parent, external, accuracy_level)
    import onnx_ir as ir
    ir.save(model, str(path), external_data=f"{path.name}.data" if external else None)
    for p in path.parent.iterdir():        # the check's copies (read lazily until saved)
        if p.name.startswith(("unfused.onnx", "fused.onnx")):
            p.unlink()
    return report


def _check_gqa_step(batch: int, new: int, past: int) -> None:
    if batch > 1 and new > 1 and past > 0:
        raise UsageError(
            f"this artifact's attention is ONNX Runtime's GroupQueryAttention, which takes "
            f"several new tokens on a non-empty cache for batch size 1 only (got batch "
            f"{batch}, {new} new tokens, {past} cached). Fix: feed the rows one "
            "at a time, or compile with backend_options={'fuse': False}")


def _probe(run, spec: ModelSpec) -> list[torch.Tensor]:
    """Logits and cache of a prefill of 8 tokens, one decode step, then a chunk of 3."""
    chunks, past = run_in_chunks(run, spec.cache, torch.arange(12).reshape(1, 12) * 7 % 97 + 1)
    return chunks + list(past.values())


def _set_accuracy_level(model, level: int) -> None:
    for node in model.graph:
        if node.op_type == "MatMulNBits" and "accuracy_level" in node.attributes:
            import onnx_ir as ir
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)


def _fuse_checked(model, spec: ModelSpec, workdir: Path, external: bool,
                  accuracy_level: int):
    """``(model fused for ONNX Runtime, report)`` for an ``onnx_ir`` decoder in cache form, if
    the fused graph computes what the exported one does; otherwise the model unfused.

    The check runs both graphs on a probe (prefill, one decode step, a chunk on a cache) with
    the int4 kernels at accuracy_level 0, where they are exact to float rounding: level 4
    quantizes activations to int8, which turns float-rounding differences into rounding flips.
    """
    import onnx_ir as ir

    from lowbit.backends._ort_fuse import fuse_decoder
    _set_accuracy_level(model, 0)
    data = (lambda name: f"{name}.data") if external else (lambda name: None)
    unfused, fused = workdir / "unfused.onnx", workdir / "fused.onnx"
    ir.save(model, str(unfused), external_data=data(unfused.name))
    report = fuse_decoder(model, spec.max_seq)
    ir.save(model, str(fused), external_data=data(fused.name))
    want = _probe(OrtExecutable(workdir, spec, model_name=unfused.name), spec)
    try:
        got = _probe(OrtExecutable(workdir, spec, model_name=fused.name), spec)
        err = max(float((w - g).abs().max() / w.abs().max().clamp_min(1e-30))
                  for w, g in zip(want, got))
        problem = None if err <= _FUSION_RTOL else \
            f"differs from the exported one by {err:.2e} (> {_FUSION_RTOL})"
    except Exception as e:                       # onnxruntime refused the fused graph
        problem = f"failed in onnxruntime: {str(e).strip().splitlines()[-1][:300]}"
    result = {"fused": report.counts, "skipped": report.skipped}
    if problem is None:
        result["max_rel_error_vs_unfused"] = err
    else:
        model = ir.load(str(unfused))
        result = {"fused": {}, "skipped": [f"all fusions undone: the fused graph {problem}"]}
    _set_accuracy_level(model, accuracy_level)
    return model, result


class OrtExecutable:
    backend = "onnxruntime"

    def __init__(self, model_dir: Path, spec: ModelSpec, threads: int = 0,
                 keep: tempfile.TemporaryDirectory | None = None, model_name: str = _MODEL,
                 lowering: dict | None = None):
        import onnxruntime as ort
        self.model_dir, self.spec, self._keep = Path(model_dir), spec, keep
        self.lowering = lowering       # what the lowering rewrote (fusions), for the manifest
        self._gqa = bool(((lowering or {}).get("fused") or {}).get("group_query_attention"))
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.model_dir / model_name), so,
                                            providers=["CPUExecutionProvider"])
        # a fused decoder reads the cache's valid length from an input (static-cache form)
        self.static_cache = CACHE_LENGTH in {i.name for i in self.session.get_inputs()}

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if self._gqa and self.spec.cache is not None:
            _check_gqa_step(*inputs["input_ids"].shape,
                            inputs[self.spec.cache.input_names[0]].shape[2])
        feeds = {k: np.ascontiguousarray(inputs[k].numpy()) for k in self.spec.input_names}
        if self.static_cache:         # exactly-sized past tensors: all of them are valid
            past = feeds[self.spec.cache.input_names[0]].shape[2]
            feeds[CACHE_LENGTH] = np.array([past], np.int64)
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]

    def cached_decoder(self, batch: int, capacity: int) -> "StaticCacheDecoder | None":
        """A decoder holding the cache of ``batch`` rows in buffers of ``capacity`` positions
        that each step extends in place (``None`` unless the graph is in static-cache form)."""
        if not self.static_cache or self.spec.cache is None:
            return None
        return StaticCacheDecoder(self, batch, capacity)

    @property
    def path(self) -> Path:
        return self.model_dir / _MODEL

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_dir.iterdir()
                   if p.is_file() and p.name.startswith(_MODEL))

    def save(self, directory: Path) -> list[str]:
        names = []
        for p in self.model_dir.iterdir():
            if p.is_file() and p.name.startswith(_MODEL):     # the graph and external data
                shutil.copy2(p, directory / p.name)
                names.append(p.name)
        return names

    def save_extras(self, directory: Path) -> list[str]:
        """Files shipped next to the model that are not part of it: ``generate.py`` (for a
        decoder in static-cache form: it extends the cache buffers in place)."""
        if self.spec.cache is None:
            return []
        if not self.static_cache:
            warnings.warn("generate.py is not shipped with this artifact: its graph was not "
                          "fused (backend_options={'fuse': False}), and the script needs the "
                          "fused attention's 'cache_length' input. lowbit.load(dir).generate() "
                          "works; compile with fuse=True for the standalone script",
                          stacklevel=3)
            return []
        shutil.copyfile(Path(__file__).with_name("_ort_generate.py"), directory / _SCRIPT)
        return [_SCRIPT]


class StaticCacheDecoder:
    """Incremental decoding with the KV cache in fixed-capacity buffers, extended in place.

    Each call feeds the new tokens ``[batch, n]`` and returns their logits; the attention
    writes their keys and values into the same buffers it reads the past from (each
    ``present_*`` output is bound to its ``past_*`` input's memory), and ``cache_length`` tells
    it how many positions are valid. A step then costs the same at any context length up to the
    attention itself, instead of copying the whole cache into new tensors (47 MB per step for
    SmolLM2 at 1,024 tokens). The buffers grow (doubling, one copy) if a step would overflow.

    Example::

        >>> import lowbit, torch
        >>> from lowbit.testing import tiny_llama
        >>> cm = lowbit.compile(tiny_llama(), recipe="fp32", target="onnxruntime",
        ...                     progress=False)
        >>> dec = cm.executable.cached_decoder(batch=1, capacity=16)
        >>> ids = torch.tensor([[5, 6, 7, 8]])
        >>> logits = [dec(ids[:, :3]), dec(ids[:, 3:])]          # prefill 3, then one step
        >>> dec.length, torch.allclose(logits[1][0, -1], cm(ids)[0, -1], atol=1e-5)
        (4, True)
    """

    def __init__(self, executable: OrtExecutable, batch: int, capacity: int):
        import onnxruntime as ort
        self._ort, self.session = ort, executable.session
        self.cache, self.batch, self.length = executable.spec.cache, int(batch), 0
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._arrays = {name: np.zeros((self.batch, h, max(int(capacity), 1), d), np.float32)
                        for name, (h, d) in zip(self.cache.input_names, self.cache.shapes)}
        self._wrap()

    @property
    def capacity(self) -> int:
        return next(iter(self._arrays.values())).shape[2]

    def _wrap(self) -> None:
        # the OrtValues share the numpy arrays' memory, which self._arrays keeps alive
        self._values = {k: self._ort.OrtValue.ortvalue_from_numpy(a)
                        for k, a in self._arrays.items()}

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.capacity)
        for k, a in self._arrays.items():
            b = np.zeros((*a.shape[:2], cap, a.shape[3]), a.dtype)
            b[:, :, :self.length] = a[:, :, :self.length]
            self._arrays[k] = b
        self._wrap()

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (the next step writes there)."""
        if not 0 <= length <= self.length:
            raise UsageError(f"can rewind to 0..{self.length} positions, not {length}")
        self.length = int(length)

    def past(self) -> dict[str, torch.Tensor]:
        """The valid cache (copies), as ``past_*`` tensors for the executable's ``__call__``."""
        return {k: torch.from_numpy(a[:, :, :self.length].copy())
                for k, a in self._arrays.items()}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = np.ascontiguousarray(input_ids.numpy(), dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            raise UsageError(f"expected new tokens [batch={self.batch}, n >= 1], got "
                             f"{list(ids.shape)}")
        _check_gqa_step(*ids.shape, self.length)
        if self.length + ids.shape[1] > self.capacity:
            self._grow(self.length + ids.shape[1])
        bind = self.session.io_binding()
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input(CACHE_LENGTH, np.array([self.length], np.int64))
        bind.bind_output(self._outputs[0], "cpu")        # first: get_outputs() keeps this order
        for past, present in zip(self.cache.input_names, self.cache.output_names):
            bind.bind_ortvalue_input(past, self._values[past])
            bind.bind_ortvalue_output(present, self._values[past])
        self.session.run_with_iobinding(bind)
        self.length += ids.shape[1]
        return torch.from_numpy(bind.get_outputs()[0].numpy())


_NBITS_BLOCKS = (16, 32, 64, 128, 256)


def check_lowerable(graph) -> None:
    """Refuse, naming the layer, any quantized linear ONNX Runtime cannot run."""
    for node, q in graph.quant_linears().items():
        where = f"layer '{q['name']}' (node {node})"
        if q["act_bits"] == 8 and q["bits"] == 8 and -(-q["in_features"] // q["group_size"]) == 1:
            continue            # int8 x int8: MatMulInteger
        # otherwise activations (if any) are fake-quantized in float ops: the weight decides
        if q["bits"] == 3:
            continue            # standard-op lowering (_ort_translate._dequantize_3bit): any group size
        elif q["group_size"] not in _NBITS_BLOCKS or q["bits"] not in (2, 4, 8):
            raise LoweringError(
                f"{where}: MatMulNBits needs bits in (2, 4, 8) and block size in "
                f"{_NBITS_BLOCKS}; got bits={q['bits']}, group_size={q['group_size']}. Fix: pick "
                "such a group_size (per-channel 8-bit weights need 8-bit act_quant), or "
                "target='torch'")


def lower(graph, spec: ModelSpec, options: Mapping) -> OrtExecutable:
    _require()
    check_lowerable(graph)
    opts = {**_DEFAULT_OPTIONS, **options}
    unknown = sorted(set(opts) - set(_DEFAULT_OPTIONS))
    if unknown:
        raise UsageError(f"unknown onnxruntime option(s) {unknown}; valid: "
                         f"{sorted(_DEFAULT_OPTIONS)}")
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-ort-")
    lowering = None
    if getattr(graph, "form", "fx") == "onnx":     # already ONNX: set options and save
        graph.set_accuracy_level(int(opts["accuracy_level"]))
        graph.save(Path(tmp.name) / _MODEL)
    else:
        lowering = export_onnx(graph.sync(), spec, Path(tmp.name) / _MODEL,
                               int(opts["accuracy_level"]), fuse=bool(opts["fuse"]))
    return OrtExecutable(Path(tmp.name), spec, int(opts["threads"]), keep=tmp,
                         lowering=lowering)


def load(directory: Path, manifest: Mapping) -> OrtExecutable:
    _require()
    m = manifest["model"]
    spec = ModelSpec(kind=m["kind"], input_names=tuple(m.get("graph_inputs") or m["input_names"]),
                     output_names=tuple(m.get("graph_outputs") or ()),
                     cache=KVCacheSpec.from_dict(m.get("cache")))
    return OrtExecutable(directory, spec, lowering=manifest.get("lowering"))


def optimized_op_types(model_path: str | Path, level: str = "all") -> Counter:
    """Op types of the graph ONNX Runtime actually runs after its own rewrites."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


BACKEND = BackendInfo(name="onnxruntime", lower=lower, load=load, aliases=("cpu", "ort"),
                      description="ONNX Runtime (MatMulNBits / MatMulInteger), edge CPUs",
                      options=tuple(_DEFAULT_OPTIONS))
