"""Built-in passes, one per file. They register through :mod:`lowbit.plugins.builtin`."""
