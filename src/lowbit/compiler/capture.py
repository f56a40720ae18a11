"""Capture: nn.Module / Hugging Face model / local directory / .gguf / known alias -> FxGraph;
a ``.onnx`` file -> OnnxGraph (:mod:`lowbit.compiler.onnx_capture`)."""
from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lowbit.compiler.fx_graph import FxGraph
from lowbit.compiler.kv_cache import SEQ_AXIS, KVCacheSpec
from lowbit.errors import CaptureError, UsageError

__all__ = ["Captured", "capture", "load_hf_model", "probe_cache", "dynamic_shapes"]

_WRAPPER_PREFIX = "model."


@dataclass
class Captured:
    """A captured model: its graph plus what is needed to feed and describe it."""
    graph: Any                         # FxGraph | OnnxGraph
    kind: str                          # "causal_lm" | "encoder" | "module"
    name: str
    input_names: list[str]
    example_inputs: dict[str, torch.Tensor]
    tokenizer: Any = None
    config: dict = field(default_factory=dict)
    source: str | None = None          # how to find the model again (alias/path), if known
    max_seq: int = 8192                # bound of the dynamic sequence dimension
    cache: KVCacheSpec | None = None   # causal LMs captured in cache form (see kv_cache.py)

    @property
    def graph_inputs(self) -> list[str]:
        """Every input of the graph: the model's, then the cache's."""
        return [*self.input_names, *(self.cache.input_names if self.cache else ())]

    @property
    def graph_outputs(self) -> list[str]:
        if self.cache is not None:
            return ["logits", *self.cache.output_names]
        return ["logits"] if self.kind == "causal_lm" else []


class _CausalLM(torch.nn.Module):
    """input_ids -> logits, no KV cache (a fixed-signature view of a HF causal LM)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class _CachedCausalLM(torch.nn.Module):
    """``(input_ids, past_key_0, past_value_0, ...) -> (logits, present_key_0, ...)``.

    The flat cache tensors are fed to the model as a ``DynamicCache``; the model appends the
    new tokens' keys and values and derives positions and the causal mask from the cache
    length, so a zero-length cache is a plain prefill.
    """

    def __init__(self, model, cache: KVCacheSpec):
        super().__init__()
        self.model = model
        # torch.export names graph inputs after forward()'s parameters: one name per tensor
        p = inspect.Parameter
        names = ["input_ids", *cache.input_names]

        def forward(*args):
            return self._step(*args)
        forward.__signature__ = inspect.Signature(
            [p(n, p.POSITIONAL_OR_KEYWORD) for n in names])
        self.forward = forward

    def _step(self, input_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def probe_cache(model) -> KVCacheSpec:
    """The cache layout of a Hugging Face causal LM, read from one 2-token forward."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 4]]), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(
            f"{type(model).__name__} returned no per-layer key/value cache "
            f"({type(out.past_key_values).__name__}); compile it with kv_cache=False")
    shapes = []
    for layer in layers:
        for t in (layer.keys, layer.values):
            if t.dim() != 4 or t.shape[SEQ_AXIS] != 2:
                raise CaptureError(
                    f"{type(model).__name__}: cache tensor of shape {tuple(t.shape)} is not "
                    "[batch, heads, seq, head_dim]; compile it with kv_cache=False")
            shapes.append((int(t.shape[1]), int(t.shape[3])))
    return KVCacheSpec(shapes=tuple(shapes), dtype=str(layers[0].keys.dtype).removeprefix("torch."))


class _Encoder(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_hf_model(source: str | os.PathLike):
    """Load ``(model, tokenizer, source_string)`` from an alias, a directory or a .gguf file."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from lowbit.data.models import KNOWN_MODELS, model_path
    src = str(source)
    gguf = None
    if src in KNOWN_MODELS:
        path, gguf = model_path(src)
    else:
        path = Path(src)
        if path.suffix == ".onnx":
            raise UsageError(f"'{src}' is an ONNX model, not a transformers one: capture it "
                             "with lowbit.compiler.capture.capture (or lowbit.compile)")
        if path.suffix == ".gguf":
            path, gguf = path.parent, path.name
        if not path.exists():
            raise CaptureError(f"model '{src}' not found: give an nn.Module, a local "
                               f"Hugging Face directory, a .gguf file or one of "
                               f"{sorted(KNOWN_MODELS)}")
    if gguf:
        path, gguf = _converted_gguf(Path(path), gguf), None
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        arch = (getattr(config, "architectures", None) or [""])[0]
        causal = arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise CaptureError(f"could not load '{src}' with transformers: {e}") from e
    return model.eval(), tokenizer, src


def _converted_gguf(directory: Path, gguf: str) -> Path:
    """A cached safetensors copy of a GGUF model (dequantizing GGUF takes ~20 s per load)."""
    import hashlib
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.data.models import cache_dir
    f = directory / gguf
    if not f.exists():
        raise CaptureError(f"GGUF file {f} not found")
    st = f.stat()
    key = hashlib.sha1(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{f.stem}-{key}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf,
                                                     dtype=torch.float32)
        # the weights are already dequantized to float32: save them as a plain checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_causal_lm(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel) and model.get_output_embeddings() is not None \
        and hasattr(model, "generate") and model.can_generate()


def _is_hf(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _hf_example(model, kind: str) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(3, max(vocab, 4), (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids} if kind == "causal_lm" else \
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dynamic_shapes(input_names: Sequence[str], max_seq: int, cache: KVCacheSpec | None = None):
    """torch.export dims: ``[batch, seq]`` token inputs; ``[batch, heads, past, head_dim]``
    cache inputs.

    Without a cache, ``seq >= 2`` (as first captured). With one, a single new token
    (``seq = 1``, decode) and an empty cache (``past = 0``, prefill) are both in range.
    """
    batch = torch.export.Dim("batch", min=1, max=1024)
    if cache is None:
        seq = torch.export.Dim("seq", min=2, max=max_seq)
        return tuple({0: batch, 1: seq} for _ in input_names)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    past = torch.export.Dim("past", min=0, max=max_seq - 1)
    cached = set(cache.input_names)
    return tuple({0: batch, SEQ_AXIS: past} if n in cached else {0: batch, 1: seq}
                 for n in input_names)


def _export(module: torch.nn.Module, example: Mapping[str, torch.Tensor], dynamic: bool,
            name: str, max_seq: int = 8192, cache: KVCacheSpec | None = None):
    shapes = None
    if dynamic:
        shapes = dynamic_shapes(list(example), max_seq, cache)
    try:
        return torch.export.export(module, args=tuple(example.values()),
                                   dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many unrelated types; we re-raise with advice
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture '{name}': {type(e).__name__}: {first}\n"
            "What to try: make forward() take and return tensors only; remove data-dependent "
            "Python control flow (use torch.cond) or .item()/.tolist() calls; pass "
            "example_inputs=... that match forward()'s signature; for Hugging Face models "
            "use attn_implementation='sdpa' or 'eager'.") from e


def _drop_empty_concats(gm: torch.fx.GraphModule) -> None:
    """Drop the 1-D empty tensors that Hugging Face caches concatenate the past onto.

    ``torch.cat([tensor([]), past])`` is legal in torch (a legacy rule) but not in other
    importers (TVM's Relax requires equal ranks); dropping the empty operand is exact.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        parts = node.args[0]
        keep = [a for a in parts if not (isinstance(a, torch.fx.Node)
                                         and isinstance(a.meta.get("val"), torch.Tensor)
                                         and tuple(a.meta["val"].shape) == (0,))]
        if len(keep) == len(parts) or not keep:
            continue
        if len(keep) == 1:
            node.replace_all_uses_with(keep[0])
        else:
            node.args = (keep, *node.args[1:])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def capture(model: Any, example_inputs: Mapping[str, torch.Tensor] | tuple | None = None,
            tokenizer: Any = None, kv_cache: bool | None = False) -> Captured:
    """Capture ``model`` into an :class:`FxGraph` (an ``.onnx`` file: an ``OnnxGraph``).

    ``model``: an ``nn.Module`` (then ``example_inputs`` are required), a ``transformers``
    model, a local model directory, a ``.gguf`` file, a ``.onnx`` file, or a known alias
    (``"smollm2"``).
    ``kv_cache=True`` captures a causal LM in cache form (:mod:`lowbit.compiler.kv_cache`):
    the graph also takes and returns the per-layer keys and values; left out, they default
    to an empty cache, so ``graph.run({"input_ids": ids})`` still gives the logits.
    ``kv_cache=None``: cache form for causal LMs, none for other models. An ``.onnx`` file is
    taken as exported (its inputs and outputs, cache or not, are kept); ``kv_cache=True`` is
    refused for it.
    """
    source = None
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        if example_inputs is not None:
            raise UsageError("an ONNX model declares its inputs: drop example_inputs=")
        if kv_cache:
            raise UsageError("kv_cache=True needs a PyTorch model: an ONNX file keeps the "
                             "inputs it was exported with (export it with past key/values to "
                             "get a cache form)")
        from lowbit.compiler.onnx_capture import capture_onnx
        return capture_onnx(model, tokenizer)
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tok, source = load_hf_model(model)
        tokenizer = tokenizer or loaded_tok
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"cannot capture a {type(model).__name__}: give an nn.Module, a "
                         "Hugging Face model, a model directory, a .gguf file or an alias")
    model.eval()
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    config = model.config.to_dict() if _is_hf(model) else {}
    max_seq, cache, example_cache = 8192, None, {}
    if _is_hf(model) and example_inputs is None:
        kind = "causal_lm" if _is_causal_lm(model) else "encoder"
        if kv_cache is None:
            kv_cache = kind == "causal_lm"
        if kv_cache and kind != "causal_lm":
            raise UsageError(f"kv_cache=True needs a causal LM; '{name}' is an {kind}")
        example = _hf_example(model, kind)
        max_seq = min(8192, int(getattr(model.config, "max_position_embeddings", 8192) or 8192))
        if kv_cache:
            cache = probe_cache(model)
            wrapper = _CachedCausalLM(model, cache)
            # a non-empty example cache: torch.export would specialise a 0-length one
            example_cache = {k: torch.randn(v.shape[0], v.shape[1], 4, v.shape[3],
                                            generator=torch.Generator().manual_seed(1))
                             .to(v.dtype)
                             for k, v in cache.empty(example["input_ids"].shape[0]).items()}
        else:
            wrapper = _CausalLM(model) if kind == "causal_lm" else _Encoder(model)
        ep = _export(wrapper, {**example, **example_cache}, dynamic=True, name=name,
                     max_seq=max_seq, cache=cache)
        prefix = _WRAPPER_PREFIX
    else:
        if example_inputs is None:
            raise UsageError(f"capturing a plain nn.Module ({type(model).__name__}) needs "
                             "example_inputs=(tensor, ...) or {'name': tensor}")
        if kv_cache:
            raise UsageError(f"kv_cache=True needs a Hugging Face causal LM; "
                             f"{type(model).__name__} with example_inputs is captured as is")
        kind = "module"
        if isinstance(example_inputs, Mapping):
            example = dict(example_inputs)
        else:
            import inspect
            params = [p for p in inspect.signature(model.forward).parameters]
            example = dict(zip(params, example_inputs))
        ep = _export(model, example, dynamic=False, name=name)
        prefix = ""
    gm = ep.module()
    if cache is not None:
        _drop_empty_concats(gm)
    graph = FxGraph(gm, prefix=prefix,
                    optional_inputs=cache.empty if cache is not None else None)
    return Captured(graph=graph, kind=kind, name=name, input_names=list(example),
                    example_inputs={**example, **example_cache},
                    tokenizer=tokenizer, config=config, source=source,
                    max_seq=max_seq if kind != "module" else 0, cache=cache)
