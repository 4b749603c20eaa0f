"""A render's input images, from paths, PIL images or tensors, checked before any work:
``gather`` is the entry point, for the Python API (engine/api.py) and the command line
(nst/inputs.py) alike."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .imageio import load_image, pil_to_tensor
from .settings import INIT_KEYWORDS, StylizeSettings
from .sizes import MAX_PIXELS
from .targets import style_blend


def as_image(x, what: str = "image", min_side: int = 1, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A path, PIL image or tensor -> float32 (3, H, W) in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        return load_image(Path(x), max_pixels, what, min_side)
    if isinstance(x, Image.Image):
        return pil_to_tensor(x)
    if isinstance(x, torch.Tensor):
        t = x[0] if x.dim() == 4 else x
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"{what}: expected a tensor of shape (3, H, W), got {tuple(x.shape)}")
        return t.float()
    raise TypeError(f"{what}: expected a path, PIL image or tensor, got {type(x).__name__}")


def gather(content, styles, settings: StylizeSettings, max_pixels: int = MAX_PIXELS):
    """(content (3, H, W), [(style (3, h, w), weight)], init) of a render; ``styles`` is a list
    of (image, weight) pairs. The style weights are checked before any image is read; each
    image must be large enough for the network; ``settings.init`` stays a keyword (content,
    noise, style) or becomes the init image."""
    need = settings.min_side()
    style_blend(w for _, w in styles)
    content_t = as_image(content, "content image", need, max_pixels)
    styles_t = [(as_image(img, "style image", need, max_pixels), float(w)) for img, w in styles]
    init = settings.init
    if not (isinstance(init, str) and init in INIT_KEYWORDS):
        init = as_image(init, "init image", need, max_pixels)
    return content_t, styles_t, init
