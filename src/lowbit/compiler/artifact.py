"""CompiledModel: the compiled artifact, callable, saveable (no pickle), loadable."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lowbit.compiler.kv_cache import KVCacheSpec
from lowbit.errors import UsageError

__all__ = ["CompiledModel", "load", "MANIFEST", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TOKENIZER = "tokenizer"


class CompiledModel:
    """A compiled model on one backend.

    ``cm(input_ids)`` returns logits for causal LMs, the last hidden state for encoders
    (``cm(input_ids, attention_mask)``), and the output(s) of a plain module.
    """

    def __init__(self, executable, manifest: dict, tokenizer: Any = None):
        self.executable = executable
        self.manifest = manifest
        self.tokenizer = tokenizer

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def kind(self) -> str:
        return self.manifest["model"]["kind"]

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest["model"]["input_names"])

    @property
    def cache(self) -> KVCacheSpec | None:
        """The KV-cache layout of a causal LM compiled in cache form (else ``None``)."""
        return KVCacheSpec.from_dict(self.manifest["model"].get("cache"))

    @property
    def figures(self) -> dict:
        """Measured figures (artifact bytes, agreement, perplexity...) kept in the manifest."""
        return self.manifest.setdefault("figures", {})

    def _inputs(self, args, kwargs) -> dict[str, torch.Tensor]:
        names = self.input_names
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            given = dict(args[0])
        else:
            if len(args) > len(names):
                raise UsageError(f"expected at most {len(names)} inputs {names}, got {len(args)}")
            given = {**dict(zip(names, args)), **kwargs}
        if self.kind == "encoder" and "attention_mask" not in given and "input_ids" in given:
            given["attention_mask"] = torch.ones_like(given["input_ids"])
        missing = [n for n in names if n not in given]
        if missing:
            raise UsageError(f"missing input(s) {missing}; this model takes {names}")
        out = {n: torch.as_tensor(given[n]) for n in names}
        cache = self.cache
        if cache is not None:   # the cache inputs default to an empty cache (a prefill)
            unknown = sorted(set(given) - set(names) - set(cache.input_names))
            if unknown:
                raise UsageError(f"unknown input(s) {unknown}; this model takes {names} "
                                 f"and optionally the cache {list(cache.input_names)}")
            empty = cache.empty(out[names[0]].shape[0])
            out.update({k: torch.as_tensor(given.get(k, v)) for k, v in empty.items()})
        return out

    def __call__(self, *args, **kwargs):
        outs = self.executable(self._inputs(args, kwargs))
        return outs[0] if len(outs) == 1 or self.kind != "module" else outs

    @property
    def nbytes(self) -> int:
        return self.executable.nbytes

    def generate(self, prompt_or_ids, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Iterable[int] | None = None,
                 stop_at_eos: bool = True):
        """Continue a prompt (text, or token ids ``[seq]`` / ``[batch, seq]``) on this backend.

        Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k``,
        ``top_p`` (``seed`` makes it repeatable). Stops a row at ``eos_token_id`` (default:
        the tokenizer's) unless ``stop_at_eos=False``. Returns a
        :class:`~lowbit.generation.Generation`: ``ids`` (prompt + new), ``new_ids``, and
        ``text`` of the new tokens when the artifact has a tokenizer.

        Example::

            >>> import lowbit
            >>> from lowbit.testing import tiny_llama
            >>> cm = lowbit.compile(tiny_llama(), recipe="w8a16", target="torch", progress=False)
            >>> cm.generate([1, 2, 3], max_new_tokens=4).new_ids.shape
            torch.Size([1, 4])
        """
        from lowbit.generation import SamplingOptions, generate_ids
        if self.kind != "causal_lm":
            raise UsageError(f"generate() needs a causal LM; this artifact is a '{self.kind}' "
                             "model: call it instead (cm(inputs))")
        sampling = SamplingOptions(do_sample, temperature, top_k, top_p)
        ids = self._prompt_ids(prompt_or_ids)
        limit = self.manifest["model"].get("max_seq") or 0
        if limit and ids.shape[1] + max_new_tokens > limit:
            raise UsageError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceeds the model's {limit} positions")
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        eos = () if not stop_at_eos or eos_token_id is None else \
            ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        out = generate_ids(self.executable, ids, max_new_tokens, self.cache, sampling, eos, seed)
        if self.tokenizer is not None:
            out.text = self.tokenizer.batch_decode(out.new_ids, skip_special_tokens=True)
        return out

    def _prompt_ids(self, prompt) -> torch.Tensor:
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                       and isinstance(prompt[0], str)):
            if self.tokenizer is None:
                raise UsageError("this artifact has no tokenizer: pass token ids "
                                 "(a list of ints or a LongTensor [batch, seq])")
            rows = [prompt] if isinstance(prompt, str) else list(prompt)
            encoded = [self.tokenizer(r)["input_ids"] for r in rows]
            if len({len(e) for e in encoded}) != 1:
                raise UsageError(f"prompts of different token lengths "
                                 f"{[len(e) for e in encoded]}: generate them one at a time "
                                 "(batches need equal lengths; there is no padding mask)")
            return torch.tensor(encoded, dtype=torch.long)
        ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UsageError(f"token ids must be [seq] or [batch, seq] with seq >= 1, got "
                             f"shape {tuple(ids.shape)}")
        return ids

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the artifact atomically: a half-written directory is never left behind."""
        target = Path(directory)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise UsageError(f"{target} exists and is not empty; pass overwrite=True "
                             "(CLI: --overwrite) or choose another directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            files = self.executable.save(tmp)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(str(tmp / _TOKENIZER))
            self.figures["artifact_bytes"] = sum((tmp / f).stat().st_size for f in files)
            # helpers next to the model (a standalone generation script): not model bytes
            files = [*files, *getattr(self.executable, "save_extras", lambda d: [])(tmp)]
            from lowbit.report import plot_bits
            if plot_bits(self.manifest, tmp / "bits.png"):
                files = [*files, "bits.png"]
            self.manifest["files"] = sorted(files)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, default=str),
                                        encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def report(self) -> str:
        from lowbit.report import format_report
        return format_report(self.manifest)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"CompiledModel({m['model']['name']!r}, recipe={m['recipe']['name']!r}, "
                f"backend={m['backend']!r})")


def load(directory: str | os.PathLike, disable_plugins=()) -> CompiledModel:
    """Load a saved artifact (no pickle, no re-compilation)."""
    from lowbit.plugins.manager import get_registry
    d = Path(directory)
    path = d / MANIFEST
    if not path.exists():
        raise UsageError(f"{d} is not a lowbit artifact (no {MANIFEST})")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        raise UsageError(f"{d}: artifact format {manifest.get('format')} is not supported "
                         f"(this lowbit reads format {FORMAT_VERSION})")
    reg = get_registry(disable_plugins)
    backend = reg.backends.get(manifest["backend"])
    if backend is None:
        raise UsageError(f"{d} needs backend '{manifest['backend']}', which no loaded plugin "
                         f"provides (have {sorted(reg.backends)})")
    tokenizer = None
    if (d / _TOKENIZER).exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(d / _TOKENIZER), local_files_only=True)
    return CompiledModel(backend.load(d, manifest), manifest, tokenizer)
