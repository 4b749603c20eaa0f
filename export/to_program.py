"""ExportedProgram (``torch.export``, ``.pt2``): PyTorch's recommended successor to
TorchScript, with dynamic height and width.

It runs in Python (``torch.export.load(path).module()``) and through AOTInductor in C++,
but AOTInductor artefacts are inference-only: a C++ host that needs input gradients for the
pixel optimisation still uses the TorchScript file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from .compare import max_errors


def write(module: torch.nn.Module, example: torch.Tensor, path: Path, min_side: int) -> None:
    # Batch, height and width are dynamic. Dim.DYNAMIC rather than named Dims: with
    # channels-last weights torch.export emits stride guards that its solver cannot prove
    # for named Dims (seen with torch 2.14), and DYNAMIC records them instead of failing.
    # The example has N=2 because torch.export specialises sizes that are 1 in the example.
    batch = Dim.DYNAMIC(min=1, max=1024)
    height = Dim.DYNAMIC(min=min_side)
    width = Dim.DYNAMIC(min=min_side)
    program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    torch.export.save(program, str(path))


def check(path: Path, eager: torch.nn.Module, x: torch.Tensor) -> dict:
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        ref = eager(x)
        got = loaded(x)
    return {"forward": max_errors(got, ref)}
