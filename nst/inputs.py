"""Reading a job's image files (content, styles, init), checked before any work."""

from __future__ import annotations

from pathlib import Path

from nst.engine.api import INIT_KEYWORDS, required_min_side
from nst.engine.errors import InputError
from nst.engine.imageio import load_image
from nst.engine.targets import check_style_weight, style_blend


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
    keyword (content, noise, style) or the init image."""
    need = required_min_side(job.settings)
    specs = [parse_style_spec(spec) for spec in job.style]
    style_blend(w for _, w in specs)  # the API's check, before any image is read
    content = load_image(job.content, job.max_pixels, "content image", need)
    styles = [(load_image(path, job.max_pixels, "style image", need), weight) for path, weight in specs]
    init = job.settings.init
    if init not in INIT_KEYWORDS:
        init = load_image(init, job.max_pixels, "init image", need)
    return content, styles, init
