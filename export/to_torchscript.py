"""TorchScript: a traced extractor, loadable by ``torch.jit.load`` and libtorch.

TorchScript is deprecated in recent PyTorch (torch 2.14 warns on trace/save/load) but it
is still the one format that C++ hosts can both run *and differentiate* through, which
the pixel optimisation needs. ``.pt2`` (see to_program.py) is the recommended successor
for inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nst.engine.manifest import EMBEDDED_NAME

from .compare import forward_errors, max_errors


def trace(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    # check_trace=False: our own self-check runs at another size, which is stronger.
    return torch.jit.trace(module, (example,), check_trace=False)


def write(module: torch.nn.Module, example: torch.Tensor, path: Path, describe: dict) -> None:
    """Trace ``module`` at ``example``'s size and save it, with its description embedded.

    The description travels inside the file (``extra_files['nst.json']``), so a host that
    has lost the manifest can still read the tap order.
    """
    traced = trace(module, example)
    torch.jit.save(traced, str(path), _extra_files={EMBEDDED_NAME: json.dumps(describe)})


def check(path: Path, eager: torch.nn.Module, xs: list[torch.Tensor], seed: int) -> dict:
    """Forward error of the saved file against ``eager`` at every input of ``xs``, and the
    input-gradient error at the first."""
    loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    fwd = forward_errors(loaded, eager, xs)
    x = xs[0]
    with torch.no_grad():
        ref = eager(x)
    # Input gradient of a random linear functional of every tap: exercises each tap's
    # backward, like the style and content losses do.
    gen = torch.Generator().manual_seed(seed + 1)
    probes = [torch.randn(r.shape, generator=gen).to(r.dtype) for r in ref]

    def grad(fn):
        xi = x.detach().clone().requires_grad_(True)
        outs = fn(xi)
        total = sum((o.float() * p.float()).sum() for o, p in zip(outs, probes))
        (g,) = torch.autograd.grad(total, xi)
        return g

    grad_err = max_errors([grad(loaded)], [grad(eager)])
    return {"forward": fwd, "input_grad": grad_err}
