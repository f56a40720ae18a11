"""Every lowbit hook, in one place. Built-ins implement them exactly as third parties do.

Third-party plugins are modules (or objects) registered under the ``lowbit.plugins``
entry-point group; they implement any subset of these hooks with ``@hookimpl``.
"""
from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "lowbit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lowbit_passes():
    """Return a list of pass functions decorated with ``@graph_pass``.

    Called once when the registry is built. Results of all plugins are concatenated; two
    passes with one name are an error naming both plugins.
    """


@hookspec
def lowbit_backends():
    """Return a list of :class:`lowbit.backends.BackendInfo`.

    Called once when the registry is built; results are concatenated; names and aliases
    must be unique across plugins.
    """


@hookspec
def lowbit_presets():
    """Return a list of :class:`lowbit.compiler.recipe.Recipe` presets (by name).

    Called once when the registry is built; results are concatenated; names must be unique.
    """
