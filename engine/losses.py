"""Losses of the pixel optimisation, normalised so that weights mean the same at every
resolution (this matters for multi-scale work).

For a feature map F of shape (N, C, H, W) at one tap, with M = H * W:

    gram(F)        = F F^T / (C * M)                       (N, C, C), float32
    content(F, P)  = mean((F - P)^2)                       over N*C*H*W elements
    style(F, A)    = mean((gram(F) - A)^2)                 over N*C*C elements
    tv(x)          = mean((x[i+1, j] - x[i, j])^2) + mean((x[i, j+1] - x[i, j])^2)
    total          = w_c * sum_l a_l content_l + w_s * sum_l b_l style_l + w_tv * tv

This is the normalisation of the PyTorch tutorial (Gram / (a*b*c*d), MSE), not the
paper's: Gatys et al. sum squared errors and divide the style term by 4 N^2 M^2, which
makes the right style weight depend on the image size. Every term here is a mean, so a
weight chosen at 256 px holds at 2048 px. (TV is a mean too: it penalises per-pixel
noise equally at any size.)

Other normalisations (``--gram-norm``, ``--content-norm``; the recipes in docs/recipes.md
need them) are these losses times a constant per layer and size: engine/norms.py.

Contract: Grams and losses are float32 whatever the convolutions ran in; fp16 Grams
overflow. Autocast is switched off inside these functions.
"""

from __future__ import annotations

import torch

from .gram_op import gram_mc


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def gram(f: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrix, float32 (float64 for float64 features, one image).
    f: (N, C, H, W) -> (N, C, C)."""
    n, c, h, w = f.shape
    with _no_autocast(f):
        if n == 1:
            # One image (the engine's case): a (M, C) view of the features and one matmul each
            # way. Channels-last memory is (N, H, W, C), so the view is free; for NCHW it is a
            # transposed view, which the matmul reads without a copy. (A batched bmm, or
            # indexing [0], measured slower in the backward on the CPU.)
            # The product runs in nst::gram_mc (engine/gram_op.py): bf16 operands with float32
            # accumulation on CUDA, an upcast elsewhere; its backward is one matmul.
            t = f.permute(0, 2, 3, 1).reshape(h * w, c)  # (M, C), the features' own dtype
            g = gram_mc(t).unsqueeze(0)  # (1, C, C) float32
        else:
            fm = f.reshape(n, c, h * w).float()  # (N, C, M)
            g = torch.bmm(fm, fm.transpose(1, 2))  # (N, C, C)
        return g / (c * h * w)


def content_loss(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with _no_autocast(f):
        return (f.float() - target).square().mean()


def style_loss(f: torch.Tensor, target_gram: torch.Tensor) -> torch.Tensor:
    with _no_autocast(f):
        return (gram(f) - target_gram).square().mean()


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Squared total variation of an image batch (N, 3, H, W), as a mean per pixel pair."""
    with _no_autocast(x):
        x = x.float()
        dh = (x[..., 1:, :] - x[..., :-1, :]).square().mean()
        dw = (x[..., :, 1:] - x[..., :, :-1]).square().mean()
        return dh + dw
