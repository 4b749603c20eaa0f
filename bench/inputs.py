"""The benchmarks' images: the demo's drawings (no files needed), or files named explicitly."""

from __future__ import annotations

import functools
from pathlib import Path

from nst.engine.demo import make_content, make_style
from nst.engine.imageio import load_image, pil_to_tensor, resize_to


@functools.lru_cache(maxsize=None)
def drawn_pair(size: int):
    """The demo's content and style drawings at size x size, (3, size, size) each (drawn
    once per size; no benchmark changes them)."""
    content = resize_to(pil_to_tensor(make_content()), (size, size))
    style = resize_to(pil_to_tensor(make_style(seed=1)), (size, size))
    return content, style


def source_name(path: str) -> str:
    """How a result names an input file: its path relative to the repository when it is in
    it, else its file name alone (a machine's own paths mean nothing in a clone)."""
    p = Path(path).resolve()
    repo = Path(__file__).resolve().parent.parent
    return str(p.relative_to(repo)) if p.is_relative_to(repo) else p.name


def content_and_style(content: str | None, style: str | None):
    """(content, style, content source, style source): the files given, else the drawings."""
    c = (load_image(content), source_name(content)) if content else (pil_to_tensor(make_content()), "demo drawing")
    s = (load_image(style), source_name(style)) if style else (pil_to_tensor(make_style(seed=1)), "demo drawing")
    return c[0], s[0], c[1], s[1]
