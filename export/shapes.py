"""The dynamic-shape spec the exporters share: batch, height and width are dynamic."""

from __future__ import annotations

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
