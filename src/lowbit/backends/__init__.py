"""Backends: lower a compiled graph into something that runs (and saves, and loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from lowbit.compiler.kv_cache import KVCacheSpec

__all__ = ["BackendInfo", "Executable", "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """What a backend needs to know about the model besides its graph."""
    kind: str                                   # causal_lm | encoder | module
    input_names: tuple[str, ...]                # every graph input, cache inputs included
    example_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    dynamic: bool = True                        # batch and sequence dims are dynamic
    max_seq: int = 8192                         # upper bound of the dynamic sequence dim
    output_names: tuple[str, ...] = ()          # names for the graph outputs (if known)
    cache: KVCacheSpec | None = None            # a causal LM in cache form (kv_cache.py)


class Executable(Protocol):
    """A lowered model: callable on named inputs, saveable, sized.

    Optionally ``save_extras(directory) -> list[str]`` writes files shipped next to the model
    that are not part of it (ONNX Runtime: a standalone ``generate.py``); they are listed in
    the manifest but not counted in ``artifact_bytes``.
    """
    backend: str

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]: ...

    def save(self, directory: Path) -> list[str]:
        """Write the model files into ``directory``; return their names."""

    @property
    def nbytes(self) -> int:
        """Size of the model files this executable saves."""


@dataclass(frozen=True)
class BackendInfo:
    """A backend as plugins register it.

    ``lower(graph, spec, options) -> Executable``; ``load(directory, manifest) -> Executable``.
    """
    name: str
    lower: Callable[[Any, ModelSpec, Mapping[str, Any]], Executable]
    load: Callable[[Path, Mapping[str, Any]], Executable]
    aliases: tuple[str, ...] = ()
    description: str = ""
    options: tuple[str, ...] = ()
    kv_cache: bool = True          # lowers graphs in KV-cache form (kv_cache.py)
