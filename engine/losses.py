"""The losses, each written once with its value and its explicit gradient.

For a feature map F of shape (N, C, H, W) at one tap, with M = H * W, G = F F^T (the
unnormalised Gram, float32) and A a target Gram normalised as below:

    gram(F)        = G / (C * M)                           (N, C, C), float32
    content(F, P)  = mean((F - P)^2)                       over N*C*H*W elements
    style(F, A)    = mean((gram(F) - A)^2)                 over N*C*C elements
    tv(x)          = mean((x[i+1, j] - x[i, j])^2) + mean((x[i, j+1] - x[i, j])^2)
    total          = w_c * sum_l a_l k_l content_l + w_s * sum_l b_l k_l style_l + w_tv * tv

with a_l, b_l the layer weights and k_l the normalisation factor of ``--content-norm`` /
``--gram-norm`` (engine/norms.py), a function of the layer's C and M. This is the
normalisation of the PyTorch tutorial (Gram / (a*b*c*d), MSE), not the paper's: Gatys et
al. sum squared errors and divide the style term by 4 N^2 M^2, which makes the right style
weight depend on the image size. Every default term here is a mean, so a weight chosen at
256 px holds at 2048 px. (TV is a mean too: it penalises per-pixel noise equally at any size.)

The explicit gradients, for the evaluators that do not run autograd through the whole
objective (engine/tiles.py's tiled objective and the ranks; the fused GPU kernels and the
exported step graph build on the same functions):

    d content_l / dF = 2 a_l k_l (F - P) / (N C M)
    d style_l / dG   = 2 b_l k_l (G / (C M) - A) / (C^2 * C M)     (dL/dG of the raw Gram)
    d style_l / dF   = (S + S^T) F          with S = d style_l / dG (F as (C, M))
    d tv / dx        = the adjoint of the two differences, over their element counts

The size-dependent factors are computed from the shapes at every call (``content_coef``,
``style_coef``): with Python ints they are the same constants at one size, and written
with plain arithmetic they also take symbolic sizes (an exported graph with dynamic
height and width). tests/test_losses.py checks every gradient against autograd in float64.

Contract: Grams and losses are float32 whatever the convolutions ran in (float64 stays
float64: the gradient tests); fp16 Grams overflow. Autocast is switched off inside these
functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gram_op import gram_mc
from .norms import content_norm_factor, style_norm_factor


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision features as float32 (float32 and float64 stay as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# -- the Gram ------------------------------------------------------------------------

def gram_raw(f: torch.Tensor) -> torch.Tensor:
    """The unnormalised Gram G = F F^T of one image, float32 (float64 for float64 input):
    f (1, C, H, W) -> (C, C). Channels-last memory is (1, H, W, C), so the (M, C) view is
    free; for NCHW it is a transposed view, which the matmul reads without a copy. The
    product runs in nst::gram_mc (engine/gram_op.py): bf16 operands with float32
    accumulation on CUDA, an upcast elsewhere; its backward is one matmul."""
    t = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (M, C), the features' own dtype
    return gram_mc(t)  # (C, C)


def gram(f: torch.Tensor) -> torch.Tensor:
    """Normalised Gram matrix, float32 (float64 for float64 features, one image).
    f: (N, C, H, W) -> (N, C, C)."""
    n, c, h, w = f.shape
    with _no_autocast(f):
        if n == 1:
            # (A batched bmm, or indexing [0], measured slower in the backward on the CPU.)
            g = gram_raw(f).unsqueeze(0)  # (1, C, C)
        else:
            fm = _f32(f.reshape(n, c, h * w))  # (N, C, M)
            g = torch.bmm(fm, fm.transpose(1, 2))  # (N, C, C)
        return g / (c * h * w)


# -- the factors ---------------------------------------------------------------------

def content_coef(norm: str, layer_weight: float, c, m):
    """What a content layer's mean squared error is multiplied by: its layer weight times
    ``norm``'s factor for C channels and M positions (ints, or symbolic sizes)."""
    return layer_weight * content_norm_factor(norm, c, m)


def style_coef(norm: str, layer_weight: float, c, m):
    """What a style layer's mean squared Gram error is multiplied by (see content_coef)."""
    return layer_weight * style_norm_factor(norm, c, m)


# -- the terms: values ---------------------------------------------------------------

# Values are the plain means; each caller multiplies by its coefficient (content_coef,
# style_coef) and loss weight, so the whole-image objective's ops are exactly these.

def content_value(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((F - P)^2), float32. f: (N, C, H, W); target the same shape, float32."""
    with _no_autocast(f):
        return (_f32(f) - target).square().mean()


def content_sq_sum(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum((F - P)^2), float32: a part of content_value's numerator (a tile's interior)."""
    with _no_autocast(f):
        return (_f32(f) - target).square().sum()


def content_value_sum(sq_sum: torch.Tensor, c, h, w) -> torch.Tensor:
    """content_value from the sum of squares over one image's whole (C, h, w) map."""
    return sq_sum / (c * h * w)


def style_value(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((gram(F) - A)^2) for features F (1, C, H, W) and the target Gram A (1, C, C)."""
    with _no_autocast(f):
        return (gram(f) - target).square().mean()


def style_value_raw(g_raw: torch.Tensor, target: torch.Tensor, c, m) -> torch.Tensor:
    """The same from the unnormalised Gram G (C, C) of C channels over M positions (the
    tiled objective sums G over tiles)."""
    return (g_raw * (1.0 / (c * m)) - target.reshape(g_raw.shape)).square().mean()


def tv_value(x: torch.Tensor) -> torch.Tensor:
    """Squared total variation of an image batch (N, 3, H, W), as a mean per pixel pair."""
    with _no_autocast(x):
        x = _f32(x)
        dh = (x[..., 1:, :] - x[..., :-1, :]).square().mean()
        dw = (x[..., :, 1:] - x[..., :, :-1]).square().mean()
        return dh + dw


content_loss, style_loss, tv_loss = content_value, style_value, tv_value  # the names the tests know


# -- the terms: gradients ------------------------------------------------------------

def content_grad(f: torch.Tensor, target: torch.Tensor, coef=1.0, numel=None) -> torch.Tensor:
    """d (coef * content_value) / dF = 2 coef (F - P) / numel, float32, F's shape. ``numel``:
    the elements the mean runs over, when F is a part of the map (a tile's interior)."""
    d = _f32(f) - target
    return d * (2.0 * coef / (d.numel() if numel is None else numel))


def style_grad_raw(g_raw: torch.Tensor, target: torch.Tensor, c, m, coef=1.0) -> torch.Tensor:
    """d style_value_raw / dG for the unnormalised Gram G (C, C): 2 coef (G/(C M) - A) / (C^2 C M).
    ``target`` (C, C) or (1, C, C); returns (C, C), float32."""
    inv = 1.0 / (c * m)
    d = g_raw * inv - target.reshape(g_raw.shape)
    return d * (2.0 * coef * inv / d.numel())


def gram_backward(f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dL/dF from S = dL/dG (C, C) for G = F F^T: (S + S^T) F, float32, F's shape (1, C, H, W)."""
    t = _f32(f).permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (M, C)
    return (t @ (s + s.t())).reshape(f.shape[0], f.shape[2], f.shape[3], f.shape[1]).permute(0, 3, 1, 2)


def tv_grad(x: torch.Tensor) -> torch.Tensor:
    """d tv_value / dx, float32 (float64 for float64), x's shape."""
    x = _f32(x)
    dh = x[..., 1:, :] - x[..., :-1, :]  # (N, 3, H-1, W)
    dw = x[..., :, 1:] - x[..., :, :-1]  # (N, 3, H, W-1)
    gh = dh * (2.0 / dh.numel())
    gw = dw * (2.0 / dw.numel())
    g = torch.zeros_like(x)
    g[..., 1:, :] += gh
    g[..., :-1, :] -= gh
    g[..., :, 1:] += gw
    g[..., :, :-1] -= gw
    return g


# -- the objective's terms together --------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    """What the loss reads: which taps (indices into the network's outputs) with which layer
    weights, the normalisations, and the three loss weights. Built once per render
    (engine/objective.py); every evaluator of the objective uses this one spec."""

    content: tuple[tuple[int, float], ...]  # (tap index, layer weight)
    style: tuple[tuple[int, float], ...]
    content_norm: str
    gram_norm: str
    content_weight: float
    style_weight: float
    tv_weight: float

    def content_coefs(self, shapes) -> list:
        """Each content layer's coefficient; ``shapes``: (C, h, w) of each content layer's map."""
        return [content_coef(self.content_norm, w, c, h * ww) for (_, w), (c, h, ww) in zip(self.content, shapes)]

    def style_coefs(self, shapes) -> list:
        """Each style layer's coefficient; ``shapes``: (C, h, w) per style layer."""
        return [style_coef(self.gram_norm, w, c, h * ww) for (_, w), (c, h, ww) in zip(self.style, shapes)]

    def total(self, c: torch.Tensor, s: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
        """The parts as the (4,) vector every evaluator returns: [total, content, style, tv]."""
        total = self.content_weight * c + self.style_weight * s + self.tv_weight * tv
        return torch.stack([total, c, s, tv])

    def parts(self, x: torch.Tensor, feats, content_targets, gram_targets) -> torch.Tensor:
        """The (4,) losses of image ``x`` (1, 3, H, W) from its features; differentiable
        (the whole-image objective's autograd path runs through it)."""
        # float32 whatever the network ran in (autocast is off inside each value function)
        c_coefs = self.content_coefs([tuple(feats[i].shape[1:]) for i, _ in self.content])
        s_coefs = self.style_coefs([tuple(feats[i].shape[1:]) for i, _ in self.style])
        c = sum(k * content_value(feats[i], t) for (i, _), k, t in zip(self.content, c_coefs, content_targets))
        s = sum(k * style_value(feats[i], g) for (i, _), k, g in zip(self.style, s_coefs, gram_targets))
        tv = tv_value(x)
        c = c if isinstance(c, torch.Tensor) else x.new_zeros(())
        s = s if isinstance(s, torch.Tensor) else x.new_zeros(())
        return self.total(c, s, tv)
