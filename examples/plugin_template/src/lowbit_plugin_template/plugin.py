"""The hooks lowbit calls on this plugin (the entry point's value names this module).

Every hook is declared in :mod:`lowbit.plugins.hookspecs`; implement only those you need.
Import heavy modules inside the hooks, so a broken dependency fails with this plugin's name.
"""
from __future__ import annotations

from lowbit.plugins.hookspecs import hookimpl

__all__ = ["lowbit_passes", "lowbit_presets"]


@hookimpl
def lowbit_passes():
    from lowbit_plugin_template.clip_rtn import clip_rtn
    return [clip_rtn]


@hookimpl
def lowbit_presets():
    from lowbit.compiler.recipe import PassSpec, Recipe
    return [
        Recipe("w4a16-clip",
               (PassSpec("clip_rtn", {"bits": 4, "group_size": 128, "symmetric": False}),
                PassSpec("pack")),
               "int4 weights (group 128, asymmetric) with a per-group MSE clip search, "
               "float activations"),
    ]
