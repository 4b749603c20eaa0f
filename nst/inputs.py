"""Reading a job's image files (content, styles, init), checked before any work."""

from __future__ import annotations

from nst.engine.api import INIT_KEYWORDS, required_min_side
from nst.engine.errors import NSTError
from nst.engine.imageio import load_image


def parse_style_spec(spec: str) -> tuple[str, float]:
    """'a.jpg:0.3' -> ('a.jpg', 0.3); 'a.jpg' -> ('a.jpg', 1.0). A path may contain ':'."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not (weight >= 0 and weight != float("inf")):
            raise NSTError(f"bad style weight in {spec!r}: must be a finite number >= 0")
        return path, weight
    return spec, 1.0


def load_inputs(job):
    """(content, [(style, weight)], init) of a job: tensors (3, H, W) in [0, 1]; init is a
    keyword (content, noise, style) or the init image."""
    need = required_min_side(job.settings)
    content = load_image(job.content, job.max_pixels, "content image", need)
    styles = []
    for spec in job.style:
        path, weight = parse_style_spec(spec)
        styles.append((load_image(path, job.max_pixels, "style image", need), weight))
    if not sum(w for _, w in styles) > 0:
        raise NSTError("style weights must not all be zero")
    init = job.settings.init
    if init not in INIT_KEYWORDS:
        init = load_image(init, job.max_pixels, "init image", need)
    return content, styles, init
