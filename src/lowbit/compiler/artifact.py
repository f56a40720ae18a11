"""CompiledModel: the compiled artifact, callable, saveable (no pickle), loadable."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

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
        return {n: torch.as_tensor(given[n]) for n in names}

    def __call__(self, *args, **kwargs):
        outs = self.executable(self._inputs(args, kwargs))
        return outs[0] if len(outs) == 1 or self.kind != "module" else outs

    @property
    def nbytes(self) -> int:
        return self.executable.nbytes

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
