"""ExportedProgram (``torch.export``, ``.pt2``): PyTorch's recommended successor to
TorchScript, with dynamic height and width.

It runs in Python (``torch.export.load(path).module()``) and through AOTInductor in C++,
but AOTInductor artefacts are inference-only: a C++ host that needs input gradients for the
pixel optimisation still uses the TorchScript file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nst.engine.manifest import EMBEDDED_NAME

from .compare import forward_errors
from .shapes import dynamic_shapes, guard_free_pooling_shapes


def write(module: torch.nn.Module, example: torch.Tensor, path: Path, min_side: int, describe: dict) -> None:
    """Export with dynamic batch, height and width; the description travels inside the file
    (``torch.export.load(path, extra_files={"nst.json": ""})``)."""
    with guard_free_pooling_shapes():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes(min_side))
    torch.export.save(program, str(path), extra_files={EMBEDDED_NAME: json.dumps(describe)})


def check(path: Path, eager: torch.nn.Module, xs: list[torch.Tensor]) -> dict:
    """Forward error of the saved program against ``eager`` at every input of ``xs``."""
    return {"forward": forward_errors(torch.export.load(str(path)).module(), eager, xs)}
