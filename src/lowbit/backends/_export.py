"""Re-exporting a (transformed) FX graph module with the model's dynamic dimensions."""
from __future__ import annotations

import torch

from lowbit.backends import ModelSpec
from lowbit.compiler.capture import dynamic_shapes
from lowbit.errors import LoweringError

__all__ = ["export_program", "spec_dynamic_shapes"]


def spec_dynamic_shapes(spec: ModelSpec):
    if not spec.dynamic:
        return None
    return dynamic_shapes(spec.input_names, spec.max_seq, spec.cache)


def export_program(gm: torch.fx.GraphModule, spec: ModelSpec) -> torch.export.ExportedProgram:
    args = tuple(spec.example_inputs[k] for k in spec.input_names)
    try:
        return torch.export.export(gm, args, dynamic_shapes=spec_dynamic_shapes(spec),
                                   strict=False)
    except Exception as e:
        raise LoweringError(f"re-exporting the compiled graph failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:400]}") from e
