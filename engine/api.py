"""The Python API: ``nst.engine.stylize(content, style, ...)`` does what ``nst stylize``
does, without the command line. Inputs may be paths, PIL images or tensors (3, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from PIL import Image

from .imageio import load_image, pil_to_tensor
from .layers import min_side as _min_side
from .loop import Callback, chain
from .multiscale import render
from .progress import progress_bar
from .settings import StylizeSettings
from .stats import Result
from .targets import style_blend

INIT_KEYWORDS = ("content", "noise", "style")


def as_image(x, what: str = "image", min_side: int = 1) -> torch.Tensor:
    """A path, PIL image or tensor -> float32 (3, H, W) in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        return load_image(Path(x), what=what, min_side=min_side)
    if isinstance(x, Image.Image):
        return pil_to_tensor(x)
    if isinstance(x, torch.Tensor):
        t = x[0] if x.dim() == 4 else x
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"{what}: expected a tensor of shape (3, H, W), got {tuple(x.shape)}")
        return t.float()
    raise TypeError(f"{what}: expected a path, PIL image or tensor, got {type(x).__name__}")


def required_min_side(settings: StylizeSettings) -> int:
    return _min_side(settings.taps(), settings.network)


def _style_items(style) -> list:
    """One style (a path, image or tensor, or one ``(image, weight)`` pair) or a list of them."""
    if isinstance(style, tuple) and len(style) == 2 and isinstance(style[1], (int, float)):
        return [style]
    if isinstance(style, (list, tuple)):
        return list(style)
    return [style]


def stylize(content, style, settings: StylizeSettings | None = None, extractor=None, progress: bool = False,
            recipe: str | None = None, callback: Callback | None = None, **overrides) -> Result:
    """Stylise ``content`` with ``style``.

    ``style`` is one image, or a list of images or ``(image, weight)`` pairs (weights are
    relative). ``recipe`` names a configuration of engine/recipes.py, applied over
    ``settings``; ``overrides`` set StylizeSettings fields (``steps=100, size=256``...) last.
    ``progress`` draws a progress bar; ``callback(StepInfo)`` is called after every step.
    Returns a :class:`nst.engine.stats.Result`: ``.image`` (3, H, W) and ``.stats``.
    """
    if recipe is not None:
        from .recipes import settings as recipe_settings

        settings = recipe_settings(recipe, settings, **overrides)
    else:
        settings = dataclasses.replace(settings or StylizeSettings(), **overrides)
    need = required_min_side(settings)
    items = [(item if isinstance(item, tuple) else (item, 1.0)) for item in _style_items(style)]
    style_blend(w for _, w in items)  # checked before any image is read
    content_t = as_image(content, "content image", need)
    styles = [(as_image(img, "style image", need), float(w)) for img, w in items]
    init = settings.init
    if isinstance(init, str) and init not in INIT_KEYWORDS:
        init = as_image(init, "init image", need)
    with progress_bar(progress) as bar:
        return render(content_t, styles, settings, extractor=extractor, init=init, callback=chain(bar, callback))

