"""lowbit: a plugin-based model-compression compiler.

    >>> import lowbit                                                   # doctest: +SKIP
    >>> cm = lowbit.compile("smollm2", recipe="w4a16", target="onnxruntime")
    >>> logits = cm(input_ids)
    >>> cm.save("smollm2-w4a16"); cm2 = lowbit.load("smollm2-w4a16")
    >>> ref = lowbit.compile("smollm2", recipe="w4a16", target="torch")  # compile once,
    >>> tvm = lowbit.relower(ref, "llvm")                               # lower for another
"""
from lowbit.compiler.artifact import CompiledModel, load
from lowbit.compiler.pipeline import compile, relower
from lowbit.errors import (CaptureError, ContractError, DataError, LoweringError, LowbitError,
                           NumericMismatchError, PassError, PluginError, RecipeError,
                           UsageError)

__all__ = ["compile", "relower", "load", "CompiledModel", "LowbitError", "UsageError",
           "RecipeError", "CaptureError", "DataError", "PluginError", "PassError", "ContractError",
           "NumericMismatchError", "LoweringError"]
__version__ = "0.1.0"
