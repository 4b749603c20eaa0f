"""Shapes for the exporters: the dynamic-shape spec they share, and the pooling-size fix
that keeps torch.export from specialising the parity of the input size."""

from __future__ import annotations

import contextlib

from torch.export import Dim


def dynamic_shapes(min_side: int) -> dict:
    """``dynamic_shapes`` for a module whose forward takes one input named ``x``.

    Dim.DYNAMIC rather than named Dims: with channels-last weights torch.export emits
    stride guards that its solver cannot prove for named Dims (seen with torch 2.14), and
    DYNAMIC records them instead of failing. Trace with an example of batch 2: torch.export
    specialises sizes that are 1 in the example.
    """
    batch = Dim.DYNAMIC(min=1, max=1024)
    height = Dim.DYNAMIC(min=min_side)
    width = Dim.DYNAMIC(min=min_side)
    return {"x": {0: batch, 2: height, 3: width}}


@contextlib.contextmanager
def guard_free_pooling_shapes():
    """While exporting, compute pooling output sizes with plain floor division.

    torch 2.11's shape function for pooling (``div_rtn`` in torch/_meta_registrations.py)
    branches on the remainder of (side - 2) / 2, which torch.export records as a guard on
    the parity of every pooled side: the program then refuses half of all heights
    (``Guard failed: (-2 + x.size()[2] // 8) % 2 == 0`` at 56 px). The sides are never
    negative, so floor division is exact, and later torch releases define ``div_rtn`` as
    ``x // y`` themselves; this does the same for the duration of an export, and the
    self-check then proves the program at sides with odd halvings (export/compare.py).
    """
    import torch._meta_registrations as meta

    original = getattr(meta, "div_rtn", None)
    if original is None:
        yield
        return
    meta.div_rtn = lambda x, y: x // y
    try:
        yield
    finally:
        meta.div_rtn = original
