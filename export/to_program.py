"""ExportedProgram (``torch.export``, ``.pt2``): PyTorch's recommended successor to
TorchScript, with dynamic height and width.

It runs in Python (``torch.export.load(path).module()``) and through AOTInductor in C++,
but AOTInductor artefacts are inference-only: a C++ host that needs input gradients for the
pixel optimisation still uses the TorchScript file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .compare import max_errors
from .shapes import dynamic_shapes


def write(module: torch.nn.Module, example: torch.Tensor, path: Path, min_side: int) -> None:
    program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes(min_side))
    torch.export.save(program, str(path))


def check(path: Path, eager: torch.nn.Module, x: torch.Tensor) -> dict:
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        ref = eager(x)
        got = loaded(x)
    return {"forward": max_errors(got, ref)}
