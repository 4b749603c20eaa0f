"""Reading a job's image files (content, styles, init), checked before any work."""

from __future__ import annotations

from pathlib import Path

from nst.engine.errors import InputError
from nst.engine.inputs import gather
from nst.engine.targets import check_style_weight


def parse_style_spec(spec: str) -> tuple[str, float]:
    """'a.jpg:0.3' -> ('a.jpg', 0.3); 'a.jpg' -> ('a.jpg', 1.0). A path may contain ':'."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            if not Path(spec).exists() and Path(path).is_file():
                raise InputError(f"bad style weight in {spec!r}: write FILE:WEIGHT with a number, e.g. "
                                 f"{path}:0.3") from None
            return spec, 1.0
        return path, check_style_weight(weight, f"in {spec!r}")
    return spec, 1.0


def load_inputs(job):
    """(content, [(style, weight)], init) of a job: tensors (3, H, W) in [0, 1]; init is a
    keyword (content, noise, style) or the init image (engine/inputs.py)."""
    return gather(job.content, [parse_style_spec(spec) for spec in job.style], job.settings, job.max_pixels)
