"""Colour helpers: luminance-only transfer ("preserving colour", Gatys et al. 2016)."""

from __future__ import annotations

import torch

# RGB -> YIQ (NTSC). Y is luminance; I and Q carry the colour.
_RGB2YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
])


def rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> YIQ."""
    m = _RGB2YIQ.to(x.device, x.dtype)
    return torch.einsum("ij,...jhw->...ihw", m, x)


def yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(_RGB2YIQ.double()).to(x.device, x.dtype)
    return torch.einsum("ij,...jhw->...ihw", m, x)


def original_colors(stylised: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The stylised image's luminance with the content's chroma (I, Q), clamped to [0, 1]."""
    s = rgb_to_yiq(stylised.float())
    c = rgb_to_yiq(content.float())
    out = torch.cat([s[..., :1, :, :], c[..., 1:, :, :]], dim=-3)
    return yiq_to_rgb(out).clamp(0, 1)
