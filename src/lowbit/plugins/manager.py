"""The plugin manager: built-ins from an explicit list, third parties from entry points."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterable

import pluggy

from lowbit.errors import PluginError
from lowbit.plugins import hookspecs

__all__ = ["Registry", "get_registry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lowbit.plugins"


@dataclass
class Registry:
    """Everything the plugins contributed: passes, backends, presets (by name)."""
    passes: dict = field(default_factory=dict)
    backends: dict = field(default_factory=dict)      # name and aliases -> BackendInfo
    presets: dict = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)

    def pass_info(self, name: str):
        from lowbit.errors import RecipeError
        try:
            return self.passes[name]
        except KeyError:
            raise RecipeError(f"unknown pass '{name}'; registered passes: "
                              f"{sorted(self.passes)}") from None


def _builtin_plugins():
    from lowbit.plugins import builtin
    return [("lowbit.builtin", builtin)]


def _entry_point_plugins(disabled: set[str]):
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled:
            continue
        try:
            yield ep.name, ep.load()
        except Exception as e:
            raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}. Fix the plugin, or disable it with "
                              f"LOWBIT_DISABLE_PLUGINS={ep.name} / "
                              f"disable_plugins=['{ep.name}']") from e


def _call(pm: pluggy.PluginManager, hook: str) -> list[tuple[str, object]]:
    """Call ``hook`` on each plugin separately so a failure names its plugin."""
    out = []
    for impl in getattr(pm.hook, hook).get_hookimpls():
        name = pm.get_name(impl.plugin)
        try:
            items = impl.function() or []
        except Exception as e:
            raise PluginError(f"plugin '{name}' failed in hook {hook}: "
                              f"{type(e).__name__}: {e}") from e
        out.extend((name, item) for item in items)
    return out


def build_registry(disable: Iterable[str] = ()) -> Registry:
    """Load plugins (minus ``disable`` and ``$LOWBIT_DISABLE_PLUGINS``) and collect hooks."""
    disabled = set(disable) | {s.strip() for s in
                               os.environ.get("LOWBIT_DISABLE_PLUGINS", "").split(",") if s}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    names = []
    for name, plugin in [*_builtin_plugins(), *_entry_point_plugins(disabled)]:
        if name in disabled and name != "lowbit.builtin":
            continue
        try:
            pm.register(plugin, name=name)
        except ValueError as e:  # the same name or module registered twice
            raise PluginError(f"plugin '{name}' cannot be registered: {e}. Two installed "
                              "packages may use this entry-point name; uninstall one or "
                              f"disable it with LOWBIT_DISABLE_PLUGINS={name}") from e
        names.append(name)
    reg = Registry(plugins=names)
    for plugin, fn in _call(pm, "lowbit_passes"):
        info = getattr(fn, "info", None)
        if info is None:
            raise PluginError(f"plugin '{plugin}' returned {fn!r} from lowbit_passes, which is "
                              "not decorated with @graph_pass")
        if info.name in reg.passes:
            raise PluginError(f"pass '{info.name}' registered twice: by plugin "
                              f"'{reg.passes[info.name].plugin}' and by '{plugin}'")
        object.__setattr__(info, "plugin", plugin)
        reg.passes[info.name] = info
    for plugin, be in _call(pm, "lowbit_backends"):
        for key in (be.name, *be.aliases):
            if key in reg.backends:
                raise PluginError(f"backend name '{key}' registered twice (plugin '{plugin}')")
            reg.backends[key] = be
    for plugin, preset in _call(pm, "lowbit_presets"):
        if preset.name in reg.presets:
            raise PluginError(f"preset '{preset.name}' registered twice (plugin '{plugin}')")
        reg.presets[preset.name] = preset
    return reg


_cache: dict[tuple, Registry] = {}


def get_registry(disable: Iterable[str] = (), refresh: bool = False) -> Registry:
    """The registry for this set of disabled plugins (built once, then cached)."""
    key = tuple(sorted(set(disable) | {s.strip() for s in os.environ.get(
        "LOWBIT_DISABLE_PLUGINS", "").split(",") if s}))
    if refresh or key not in _cache:
        _cache[key] = build_registry(key)
    return _cache[key]
