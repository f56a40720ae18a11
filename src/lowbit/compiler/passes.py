"""Declaring passes: a plain function plus a contract.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     factor: float = 1.0
    >>> @graph_pass(name="noop", numerics="exact", options=Opts)
    ... def noop(graph, ctx):
    ...     "Does nothing."
    ...     return PassResult(changed=False)
    >>> noop.info.name, noop.info.numerics
    ('noop', 'exact')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lowbit.errors import RecipeError

__all__ = ["graph_pass", "PassInfo", "PassResult", "NUMERICS", "NoOptions", "build_options"]

NUMERICS = ("exact", "approx", "analysis")


@dataclass(frozen=True)
class NoOptions:
    """A pass that takes no options."""


@dataclass(frozen=True)
class PassResult:
    """What a pass reports back: whether it changed the graph, what it did and skipped."""
    changed: bool = True
    transformed: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()     # (node or layer, reason)
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    """A registered pass and its declared contract.

    ``requires``/``provides`` name analysis results kept in the pass context (for example
    ``"activation_stats"`` or ``"quantized_weights"``); the manager checks before running
    anything that each requirement is provided by an earlier pass or by the context.
    ``consumes`` names results the pass uses up (e.g. ``pack`` turns quantized weights into
    graph nodes): later passes cannot rely on them unless a pass provides them again.
    """
    name: str
    fn: Callable[..., PassResult]
    numerics: str
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    preserves: tuple[str, ...] = ()
    options: type = NoOptions
    doc: str = ""
    plugin: str = "?"

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]


def build_options(info: PassInfo, values: Mapping[str, Any] | None) -> Any:
    """Validate ``values`` against the pass's options dataclass, naming valid keys on error."""
    values = dict(values or {})
    valid = info.option_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise RecipeError(f"pass '{info.name}' has no option(s) {unknown}; valid options: "
                          f"{valid or 'none'}")
    try:
        return info.options(**values)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"bad options for pass '{info.name}': {e}") from e


def graph_pass(*, name: str, numerics: str, requires: tuple[str, ...] = (),
               provides: tuple[str, ...] = (), consumes: tuple[str, ...] = (),
               preserves: tuple[str, ...] = (), options: type = NoOptions) -> Callable:
    """Decorate ``fn(graph, ctx) -> PassResult`` with its contract (``fn.info``)."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of pass '{name}' must be a frozen dataclass type")

    def wrap(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        fn.info = PassInfo(name=name, fn=fn, numerics=numerics, requires=tuple(requires),
                           provides=tuple(provides), consumes=tuple(consumes),
                           preserves=tuple(preserves),
                           options=options, doc=doc[0] if doc else "")
        return fn
    return wrap
