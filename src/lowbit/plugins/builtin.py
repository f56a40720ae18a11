"""The built-in plugin: lowbit's own passes, backends and presets, via the public hooks."""
from __future__ import annotations

from lowbit.plugins.hookspecs import hookimpl


@hookimpl
def lowbit_passes():
    from lowbit.passes.act_quant import act_quant
    from lowbit.passes.awq import awq
    from lowbit.passes.calibrate import calibrate
    from lowbit.passes.clip import clip
    from lowbit.passes.gptq import gptq
    from lowbit.passes.mixed import mixed
    from lowbit.passes.pack import pack
    from lowbit.passes.rotate import rotate
    from lowbit.passes.rtn import rtn
    from lowbit.passes.smooth import smooth
    return [calibrate, rtn, clip, gptq, awq, smooth, rotate, mixed, act_quant, pack]


@hookimpl
def lowbit_backends():
    from lowbit.backends import onnxruntime, torch_ref
    return [torch_ref.BACKEND, onnxruntime.BACKEND]


@hookimpl
def lowbit_presets():
    from lowbit.compiler.recipe import PassSpec, Recipe
    return [
        Recipe("fp32", (), "no compression: the captured graph as is (baseline for comparisons)"),
        Recipe("w8a16", (PassSpec("rtn", {"bits": 8, "group_size": 128, "symmetric": True}),
                         PassSpec("pack")),
               "int8 weights (group 128, symmetric), float activations"),
        Recipe("w8a8", (PassSpec("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
                        PassSpec("act_quant", {"bits": 8}), PassSpec("pack")),
               "int8 weights per output channel, int8 activations per token (dynamic)"),
        Recipe("w4a16", (PassSpec("rtn", {"bits": 4, "group_size": 128, "symmetric": False}),
                         PassSpec("pack")),
               "int4 weights (group 128, asymmetric), float activations"),
    ]
