"""Image sizes: long-edge fitting and ``WIDTHxHEIGHT`` parsing. Plain arithmetic, no torch.

Sizes inside the engine are (H, W) tuples, as tensors are laid out; the command line
writes them WIDTHxHEIGHT, as image viewers do.
"""

from __future__ import annotations

from .errors import InputError

# Refuse images over this many pixels before decoding them (decompression bombs): a
# 16384 x 16384 image is far beyond what the optimisation can use.
MAX_PIXELS = 16384 * 16384


def fit_long_edge(hw: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(H, W) scaled so that max(H, W) == long_edge, aspect ratio kept (rounded)."""
    h, w = hw
    scale = long_edge / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def wxh(hw: tuple[int, int]) -> str:
    """(H, W) as a user reads it: 'WIDTHxHEIGHT'."""
    return f"{hw[1]}x{hw[0]}"


def parse_wxh(text: str, flag: str) -> tuple[int, int]:
    """'911x512' -> (512, 911): WIDTHxHEIGHT on the command line, (H, W) inside."""
    w, sep, h = str(text).lower().partition("x")
    try:
        if not sep:
            raise ValueError
        hw = (int(h), int(w))
    except ValueError:
        raise InputError(f"{flag} {text}: write WIDTHxHEIGHT in px, e.g. 911x512") from None
    if min(hw) < 1:
        raise InputError(f"{flag} {text}: both sides must be positive")
    return hw
