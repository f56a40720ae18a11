"""Re-exporting a (transformed) FX graph module with the model's dynamic dimensions."""
from __future__ import annotations

import torch

from lowbit.backends import ModelSpec
from lowbit.errors import LoweringError

__all__ = ["export_program", "dynamic_shapes"]


def dynamic_shapes(spec: ModelSpec):
    if not spec.dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=spec.max_seq)
    return tuple({0: batch, 1: seq} for _ in spec.input_names)


def export_program(gm: torch.fx.GraphModule, spec: ModelSpec) -> torch.export.ExportedProgram:
    args = tuple(spec.example_inputs[k] for k in spec.input_names)
    try:
        return torch.export.export(gm, args, dynamic_shapes=dynamic_shapes(spec), strict=False)
    except Exception as e:
        raise LoweringError(f"re-exporting the compiled graph failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:400]}") from e
