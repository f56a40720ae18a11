"""A lowbit plugin template: the ``clip_rtn`` pass and the ``w4a16-clip`` preset.

Importing this package registers nothing. lowbit loads :mod:`lowbit_plugin_template.plugin`
through the ``lowbit.plugins`` entry point declared in ``pyproject.toml``.
"""

__all__: list[str] = []
__version__ = "0.1.0"
