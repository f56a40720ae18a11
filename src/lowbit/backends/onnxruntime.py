"""ONNX Runtime backend: a standard .onnx with ``com.microsoft`` quantized operators.

Lowering of ``lowbit.quant_linear``:

* float activations -> ``MatMulNBits`` reading the packed bytes as they are (the packed
  layout *is* MatMulNBits' layout: ``B [N, K/block, block*bits/8]``, low bits first);
* int8 per-token activations (per-channel 8-bit weights) -> per-token symmetric int8
  quantization with standard ops, ``MatMulInteger`` on uint8 x uint8 (both codes offset by
  a zero point of 128), then the two scales. Measured on this AVX2 CPU (K=576, N=1536, one
  token): u8 x u8 42 us and exact; int8 x uint8 700 us (no fast kernel); uint8 x int8 42 us
  but its int16 pair sums saturate (``vpmaddubsw``) on full-range weights.
  The weight is stored ``[N, K]`` and transposed by a ``Transpose`` that ONNX Runtime
  constant-folds when the session is created.
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

__all__ = ["OrtExecutable", "BACKEND", "optimized_op_types", "export_onnx"]

_MODEL = "model.onnx"
_SCRIPT = "generate.py"     # standalone generation (numpy + onnxruntime), for cache-form LMs
_DEFAULT_OPTIONS = {"accuracy_level": 0, "threads": 0, "fuse": True}
_FUSION_RTOL = 1e-4


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the onnxruntime backend needs the [onnx] extra ({e.name} missing): "
                         "pip install 'lowbit[onnx]'") from e


def _register_msft_schemas() -> None:
    import onnx
    from onnx.defs import OpSchema
    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    fp = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"),
                fp("zero_points", "T3", param_option=opt)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                    for a in ("K", "N", "bits", "block_size", "accuracy_level")])
    onnx.defs.register_schema(schema)


def _translation(accuracy_level: int):
    import onnxscript
    from onnxscript import opset18 as op
    _register_msft_schemas()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def quant_linear(x, qweight, scales, zero_points, bias, in_features, bits, group_size,
                     act_bits, act_clip=1.0):
        n = qweight.shape[0]
        integer = act_bits == 8 and bits == 8 and scales.shape[1] == 1
        if act_bits and not integer:
            # no integer kernel for this pairing: quantize-dequantize x per token (as the
            # torch reference does), then the weight-only kernel
            qmax = float(2 ** (act_bits - 1) - 1)
            absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
            a = op.Max(absmax, op.Constant(value_float=1e-8))
            if act_clip != 1.0:
                a = op.Mul(a, op.Constant(value_float=float(act_clip)))
            s = op.Div(a, op.Constant(value_float=qmax))
            x = op.Mul(op.Clip(op.Round(op.Div(x, s)), op.Constant(value_float=-qmax),
                               op.Constant(value_float=qmax)), s)
        if not integer and bits == 3:
            y = op.MatMul(x, op.Transpose(_dequantize_3bit(op, qweight, scales, zero_points,
                                                           in_features, group_size),
                                          perm=[1, 0]))
        elif not integer:
            args = [x, qweight, scales] + ([zero_points] if zero_points is not None else [])
            y = msft.MatMulNBits(*args, K=in_features, N=n, bits=bits, block_size=group_size,
                                 accuracy_level=accuracy_level)
        else:
            absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
            a = op.Max(absmax, op.Constant(value_float=1e-8))
            if act_clip != 1.0:
                a = op.Mul(a, op.Constant(value_float=float(act_clip)))
            s = op.Div(a, op.Constant(value_float=127.0))
            q = op.Clip(op.Round(op.Div(x, s)), op.Constant(value_float=-127.0),
                        op.Constant(value_float=127.0))
            # uint8 codes with zero point 128 (= the int8 codes): MLAS's u8 x u8 kernel is
            # exact (16-bit products, no saturation) and ~17x faster at one token than the
            # int8-activation path, which has no AVX2 kernel (bench notes in the module doc)
            xq = op.Cast(op.Add(q, op.Constant(value_float=128.0)), to=2)   # uint8
            w = op.Reshape(qweight, op.Constant(value_ints=[n, -1]))
            if qweight.shape[1] * qweight.shape[2] != in_features:  # drop last-group padding
                w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                             op.Constant(value_ints=[1]))
            w = op.Transpose(w, perm=[1, 0])
            wzp = (op.Constant(value=_u8_scalar(128)) if zero_points is None
                   else op.Reshape(zero_points, op.Constant(value_ints=[n])))
            acc = _matmul_integer(op, xq, w, wzp)
            y = op.Mul(op.Mul(op.Cast(acc, to=1), s),
                       op.Reshape(scales, op.Constant(value_ints=[n])))
        if bias is not None:
            y = op.Add(y, bias)
        return y
    return quant_linear


def _unpack_3bit(op, packed, n_codes: int, lead):
    """uint8 bytes ``[..., 3m]`` of a 3-bit little-endian stream -> float codes ``[lead, n]``.

    Three bytes make one 24-bit word holding 8 codes (code j at bits 3j..3j+2); standard
    integer ops only: ``code_j = (word / 8^j) mod 8``.
    """
    words = op.Reshape(op.Cast(packed, to=6), op.Constant(value_ints=[-1, 3]))   # int32
    b0, b1, b2 = (op.Slice(words, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]),
                           op.Constant(value_ints=[1])) for i in range(3))
    word = op.Add(op.Add(b0, op.Mul(b1, op.Constant(value=_i32(256)))),
                  op.Mul(b2, op.Constant(value=_i32(65536))))
    div = op.Constant(value=_i32([8 ** j for j in range(8)]))
    codes = op.Mod(op.Div(word, div), op.Constant(value=_i32(8)))                  # [-1, 8]
    codes = op.Reshape(codes, op.Constant(value_ints=[lead, -1]))
    codes = op.Slice(codes, op.Constant(value_ints=[0]), op.Constant(value_ints=[n_codes]),
                     op.Constant(value_ints=[1]))
    return op.Cast(codes, to=1)


def _dequantize_3bit(op, qweight, scales, zero_points, in_features: int, group_size: int):
    """``W [N, K] = (q - z) * s`` from 3-bit packed bytes, in standard ops.

    Only initializers feed it, so ONNX Runtime folds it into a float32 weight when the session
    is created: the file keeps 3 bits per weight, memory and speed are those of float32.
    """
    n, n_groups = scales.shape[0], scales.shape[1]
    codes = op.Reshape(_unpack_3bit(op, qweight, n_groups * group_size, n),
                       op.Constant(value_ints=[n, n_groups, group_size]))
    if zero_points is None:
        z = op.Constant(value_float=4.0)
    else:
        z = op.Unsqueeze(_unpack_3bit(op, zero_points, n_groups, n),
                         op.Constant(value_ints=[2]))
    w = op.Mul(op.Sub(codes, z), op.Unsqueeze(scales, op.Constant(value_ints=[2])))
    w = op.Reshape(w, op.Constant(value_ints=[n, -1]))
    return op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                    op.Constant(value_ints=[1]))


def _i32(values):
    import onnx
    return onnx.numpy_helper.from_array(np.array(values, dtype=np.int32))


def _hadamard_translation():
    from onnxscript import opset18 as op

    def hadamard(x, left, right):
        """``y = A^T X B`` on the last dim viewed as ``[a, b]`` (two small MatMuls)."""
        a, b = left.shape[0], right.shape[0]
        rank = len(x.shape) if getattr(x, "shape", None) is not None else None
        if rank:
            # constant shapes (0 copies a leading dim): no Shape/Slice/Concat per call, which
            # at one token per step cost as much as the two MatMuls
            xr = op.Reshape(x, op.Constant(value_ints=[0] * (rank - 1) + [a, b]))
            y = op.MatMul(op.Transpose(left, perm=[1, 0]), op.MatMul(xr, right))
            return op.Reshape(y, op.Constant(value_ints=[0] * (rank - 1) + [a * b]))
        shape = op.Shape(x)
        lead = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
        xr = op.Reshape(x, op.Concat(lead, op.Constant(value_ints=[a, b]), axis=0))
        y = op.MatMul(op.Transpose(left, perm=[1, 0]), op.MatMul(xr, right))
        return op.Reshape(y, shape)
    return hadamard


def _u8_scalar(v: int):
    import onnx
    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint8))


def _matmul_integer(op, xq, w, wzp):
    return op.MatMulInteger(xq, w, op.Constant(value=_u8_scalar(128)), wzp)


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
    table = {torch.ops.lowbit.quant_linear.default: _translation(accuracy_level),
             torch.ops.lowbit.hadamard.default: _hadamard_translation()}
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


def _check_gqa_step(inputs: Mapping[str, torch.Tensor], spec: ModelSpec) -> None:
    ids = inputs["input_ids"]
    past = inputs[spec.cache.input_names[0]].shape[2]
    if ids.shape[0] > 1 and ids.shape[1] > 1 and past > 0:
        raise UsageError(
            f"this artifact's attention is ONNX Runtime's GroupQueryAttention, which takes "
            f"several new tokens on a non-empty cache for batch size 1 only (got batch "
            f"{ids.shape[0]}, {ids.shape[1]} new tokens, {past} cached). Fix: feed the rows one "
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

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if self._gqa and self.spec.cache is not None:
            _check_gqa_step(inputs, self.spec)
        feeds = {k: np.ascontiguousarray(inputs[k].numpy()) for k in self.spec.input_names}
        return [torch.from_numpy(o) for o in self.session.run(None, feeds)]

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
        """Files shipped next to the model that are not part of it: ``generate.py``."""
        if self.spec.cache is None:
            return []
        shutil.copyfile(Path(__file__).with_name("_ort_generate.py"), directory / _SCRIPT)
        return [_SCRIPT]


_NBITS_BLOCKS = (16, 32, 64, 128, 256)


def check_lowerable(graph) -> None:
    """Refuse, naming the layer, any quantized linear ONNX Runtime cannot run."""
    for node, q in graph.quant_linears().items():
        where = f"layer '{q['name']}' (node {node})"
        if q["act_bits"] == 8 and q["bits"] == 8 and -(-q["in_features"] // q["group_size"]) == 1:
            continue            # int8 x int8: MatMulInteger
        # otherwise activations (if any) are fake-quantized in float ops: the weight decides
        if q["bits"] == 3:
            continue            # standard-op lowering (_dequantize_3bit): any group size
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
