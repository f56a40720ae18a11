"""The built-in plugin: lowbit's own passes, backends and presets, via the public hooks."""
from __future__ import annotations

from lowbit.plugins.hookspecs import hookimpl


@hookimpl
def lowbit_passes():
    from lowbit.passes.act_clip import act_clip
    from lowbit.passes.act_quant import act_quant
    from lowbit.passes.awq import awq
    from lowbit.passes.calibrate import calibrate
    from lowbit.passes.clip import clip
    from lowbit.passes.embed_quant import embed_quant
    from lowbit.passes.gptq import gptq
    from lowbit.passes.mixed import mixed
    from lowbit.passes.ocs import ocs
    from lowbit.passes.pack import pack
    from lowbit.passes.rotate import rotate
    from lowbit.passes.rtn import rtn
    from lowbit.passes.smooth import smooth
    return [calibrate, rtn, clip, gptq, awq, smooth, rotate, ocs, mixed, act_quant, act_clip, pack,
            embed_quant]


@hookimpl
def lowbit_backends():
    from lowbit.backends import onnxruntime, torch_ref, tvm
    return [torch_ref.BACKEND, onnxruntime.BACKEND, tvm.LLVM_BACKEND, tvm.CUDA_BACKEND]


_W4 = {"bits": 4, "group_size": 128, "symmetric": False}
#: after a rotation, GPTQ in natural column order (groups fitted to the updated weights)
#: measured better than act-order with static groups: 28.091 against 28.411; two rounds of
#: scale refitting: 27.716 (one: 27.900, four: 27.878; docs/results.md)
_GPTQ = {**_W4, "act_order": False, "refine_rounds": 2}


@hookimpl
def lowbit_presets():
    from lowbit.compiler.recipe import PassSpec, Recipe
    return [
        Recipe("fp32", (), "no compression: the captured graph as is (baseline for comparisons)"),
        Recipe("w8a16", (PassSpec("rtn", {"bits": 8, "group_size": 128, "symmetric": True}),
                         PassSpec("pack")),
               "int8 weights (group 128, symmetric), float activations"),
        Recipe("w8a8", (PassSpec("rotate"),
                        PassSpec("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
                        PassSpec("act_quant", {"bits": 8}), PassSpec("pack")),
               "int8 weights per output channel, int8 activations per token (dynamic): "
               "Hadamard rotation first (exact; no calibration data), the best W8A8 recipe "
               "measured (docs/results.md)"),
        Recipe("w8a8-rtn", (PassSpec("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
                            PassSpec("act_quant", {"bits": 8}), PassSpec("pack")),
               "int8 weights per output channel, int8 activations per token, no outlier pass"),
        Recipe("w4a16", (PassSpec("rotate"), PassSpec("gptq", _GPTQ), PassSpec("pack")),
               "int4 weights (group 128, asymmetric), float activations: Hadamard rotation "
               "folded into the residual stream, then GPTQ with clipping search and two rounds "
               "of scale refitting (needs calibration data; the best W4A16 recipe measured, "
               "see docs/results.md)"),
        Recipe("w4a16-edge", (PassSpec("rotate"),
                              PassSpec("gptq", {**_GPTQ, "include_head": True}),
                              PassSpec("pack"), PassSpec("embed_quant")),
               "w4a16 with the output head quantized too and the embedding table as int8 "
               "rows: the smallest and fastest decoding file for ONNX Runtime on edge CPUs "
               "(docs/howto/deploy-to-edge-cpu.md; about 0.3 perplexity above w4a16)"),
        Recipe("w4a8", (PassSpec("rotate"), PassSpec("gptq", _GPTQ),
                        PassSpec("act_quant", {"bits": 8, "integer_only": False}),
                        PassSpec("pack")),
               "int4 weights (group 128, asymmetric) by rotation + GPTQ, int8 activations "
               "per token (dynamic; fake-quantized before the weight-only kernel)"),
        # group 64: 39.764 against 39.989 at group 128, and smaller on SmolLM2 (576 is 9
        # groups of 64 but 4.5 of 128, padded to 5); asymmetric activations: see
        # docs/results.md (W4A4 table)
        # scale refitting measured 38.254 here against 37.939 without (within GPTQ's ~1 %
        # spread; the int4 activations dominate the error), so W4A4 keeps plain GPTQ
        Recipe("w4a4", (PassSpec("rotate"),
                        PassSpec("gptq", {**_GPTQ, "group_size": 64, "refine_rounds": 0}),
                        PassSpec("act_quant", {"bits": 4, "integer_only": False,
                                               "symmetric": False}),
                        PassSpec("act_clip"), PassSpec("pack")),
               "int4 weights (group 64, asymmetric) by rotation + GPTQ, int4 asymmetric "
               "activations per token (dynamic; fake-quantized before the weight-only kernel) "
               "with a clip ratio per layer searched on calibration data (act_clip)"),
        Recipe("w4a16-rtn", (PassSpec("rtn", _W4), PassSpec("pack")),
               "int4 weights (group 128, asymmetric) by round-to-nearest: no calibration data"),
        Recipe("w3a16", (PassSpec("rotate"), PassSpec("gptq", {**_GPTQ, "bits": 3}),
                         PassSpec("pack")),
               "int3 weights (group 128, asymmetric): rotation + GPTQ"),
        Recipe("w2a16", (PassSpec("rotate"),
                         PassSpec("gptq", {**_GPTQ, "bits": 2, "group_size": 64}),
                         PassSpec("pack")),
               "int2 weights (group 64, asymmetric): rotation + GPTQ"),
        Recipe("mixed", (PassSpec("rotate"), PassSpec("mixed", {"budget": 3.5}),
                         PassSpec("gptq", _GPTQ), PassSpec("pack")),
               "bits per layer (2g64/3g64/3g128/4g64/4g128/8g128) by HAWQ-V2 under a budget of average "
               "bits per weight in packed bytes (option mixed.budget, default 3.5): rotation, "
               "then GPTQ at the assigned widths"),
    ]
