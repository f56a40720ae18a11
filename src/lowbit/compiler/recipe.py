"""Recipes: which passes run, in which order, with which options.

A recipe is a preset name (``"w4a16"``), a YAML file, a dict, or a :class:`Recipe`::

    name: my-w4
    passes:
      - rtn: {bits: 4, group_size: 128, symmetric: false}
      - pack

Unknown keys are rejected with the valid ones named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from lowbit.compiler.manager import ScheduledPass
from lowbit.compiler.passes import build_options
from lowbit.errors import RecipeError

__all__ = ["Recipe", "PassSpec", "load_recipe", "schedule", "override"]

_TOP_KEYS = ("name", "description", "passes")
_STEP_KEYS = ("pass", "options")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def to_dict(self) -> dict:
        return {"pass": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[PassSpec, ...]
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "passes": [p.to_dict() for p in self.passes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; valid keys: {list(_TOP_KEYS)}")
        steps = data.get("passes")
        if not isinstance(steps, list) or not steps:
            raise RecipeError("a recipe needs 'passes': a non-empty list (for an uncompressed "
                          "baseline use the preset 'fp32')")
        return cls(name=str(data.get("name", "custom")),
                   description=str(data.get("description", "")),
                   passes=tuple(_step(s, i) for i, s in enumerate(steps)))


def _step(step: Any, index: int) -> PassSpec:
    if isinstance(step, str):
        return PassSpec(step)
    if isinstance(step, Mapping):
        if "pass" in step:
            unknown = sorted(set(step) - set(_STEP_KEYS))
            if unknown:
                raise RecipeError(f"pass step #{index + 1}: unknown key(s) {unknown}; valid "
                                  f"keys: {list(_STEP_KEYS)}")
            opts = step.get("options") or {}
            name = step["pass"]
        elif len(step) == 1:
            (name, opts), = step.items()
            opts = opts or {}
        else:
            raise RecipeError(f"pass step #{index + 1} must be a pass name, "
                              "{name: {options}} or {pass: name, options: {...}}")
        if not isinstance(opts, Mapping):
            raise RecipeError(f"options of pass step #{index + 1} must be a mapping")
        return PassSpec(str(name), opts)
    raise RecipeError(f"pass step #{index + 1} has unsupported type {type(step).__name__}")


def load_recipe(recipe: str | os.PathLike | Mapping | Recipe, presets: Mapping[str, Recipe]
                ) -> Recipe:
    """Resolve a preset name, YAML path, dict or Recipe into a :class:`Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text in presets:
        return presets[text]
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from e
        return Recipe.from_dict(data)
    raise RecipeError(f"unknown recipe '{text}': not a preset ({sorted(presets)}) nor a file")


def override(recipe: Recipe, options: Mapping[str, Mapping[str, Any]] | None) -> Recipe:
    """``recipe`` with some passes' options replaced: ``{"mixed": {"budget": 3.0}}``.

    Every named pass must be in the recipe (its options are then validated as usual).

    >>> r = Recipe("x", (PassSpec("rtn", {"bits": 4}), PassSpec("pack")))
    >>> dict(override(r, {"rtn": {"group_size": 64}}).passes[0].options)
    {'bits': 4, 'group_size': 64}
    """
    if not options:
        return recipe
    names = [p.name for p in recipe.passes]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise RecipeError(f"cannot set options of {unknown}: recipe '{recipe.name}' runs only "
                          f"{names}")
    passes = tuple(PassSpec(p.name, {**p.options, **options.get(p.name, {})})
                   for p in recipe.passes)
    return Recipe(recipe.name, passes, recipe.description)


def schedule(recipe: Recipe, registry) -> list[ScheduledPass]:
    """Look up each pass and validate its options (all errors name the pass)."""
    return [ScheduledPass(registry.pass_info(p.name), build_options(
        registry.pass_info(p.name), p.options)) for p in recipe.passes]
