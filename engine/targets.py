"""Targets computed once per size: content features and blended style Grams, float32.

Nothing here runs inside the optimisation loop: the loop only compares the current
image's features with these tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .layers import layer_by_name
from .losses import gram
from .tiles import tiled_features
from .norms import content_norm_factor, style_norm_factor


def check_style_weight(w, what: str = "") -> float:
    """One style image's relative weight: a finite number >= 0."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        w = float("nan")
    if not (w >= 0 and math.isfinite(w)):
        raise InputError(f"bad style weight {what or w!r}: must be a finite number >= 0")
    return w


def style_blend(weights) -> tuple[float, ...]:
    """The style images' relative weights, normalised to sum to 1. Each must be a finite
    number >= 0, and not all 0: the one check of the API, the command line and the loop."""
    weights = [check_style_weight(w) for w in weights]
    if not weights:
        raise InputError("at least one style image is needed")
    total = sum(weights)
    if not total > 0:
        raise InputError("style weights must not all be zero")
    return tuple(w / total for w in weights)


@dataclass
class Targets:
    """What the loop compares against. Tensors live on the loop's device, float32."""

    content_layers: tuple[tuple[str, float], ...]
    style_layers: tuple[tuple[str, float], ...]
    content: list[torch.Tensor]  # per content layer: (1, C, H/s, W/s)
    grams: list[torch.Tensor]  # per style layer: (1, C, C), the weighted blend over styles
    style_blend: tuple[float, ...]  # normalised weight of each style image
    # Per layer: the layer weight times the normalisation factor of --content-norm /
    # --gram-norm at this size (engine/norms.py); what the loop multiplies each term by.
    content_factors: tuple[float, ...]
    style_factors: tuple[float, ...]


@torch.no_grad()
def compute_targets(
    extractor: torch.nn.Module,
    content: torch.Tensor,
    styles: list[tuple[torch.Tensor, float]],
    content_layers: tuple[tuple[str, float], ...],
    style_layers: tuple[tuple[str, float], ...],
    gram_norm: str = "chw",
    content_norm: str = "mean",
    tile: int | None = None,
    network: str = "vgg19",
    ranks=None,
) -> Targets:
    """Run the extractor once on the content image and once per style image.

    content: (1, 3, H, W); styles: [(image (1, 3, h, w), weight)], weights >= 0, not all 0.
    Style Grams blend as sum_k (w_k / sum w) * G_k, so weights are relative. The
    normalisation factors use the feature shapes at the content image's size, which is
    the size the loop optimises. With ``tile`` the features are computed tile by tile
    (engine/tiles.py), the same values in a crop's memory; with ``ranks`` too, the tiles are
    shared out over the ranks (engine/ranks.py; every rank must make this call).
    """
    taps = list(extractor.taps)
    missing = [n for n, _ in content_layers + style_layers if n not in taps]
    if missing:
        raise InputError(f"the extractor does not output layer {missing[0]} (it has {', '.join(taps)})")
    blend = style_blend(w for _, w in styles)

    if tile is None:
        feats = extractor(content.float())
        content_feats = [feats[taps.index(n)].float().clone() for n, _ in content_layers]
        shapes = {n: tuple(feats[taps.index(n)].shape[1:]) for n, _ in content_layers + style_layers}  # (C, H, W)
    else:
        maps, _ = tiled_features(extractor, content.float(), tile, network, maps=[n for n, _ in content_layers],
                                 ranks=ranks)
        content_feats = [maps[n] for n, _ in content_layers]
        table = layer_by_name(network)
        shapes = {n: (table[n].out_channels, content.shape[-2] // table[n].stride,
                      content.shape[-1] // table[n].stride) for n, _ in content_layers + style_layers}
    content_factors = tuple(w * content_norm_factor(content_norm, shapes[n][0], shapes[n][1] * shapes[n][2])
                            for n, w in content_layers)
    style_factors = tuple(w * style_norm_factor(gram_norm, shapes[n][0], shapes[n][1] * shapes[n][2])
                          for n, w in style_layers)
    grams = [None] * len(style_layers)
    for (img, _), share in zip(styles, blend):
        if tile is None:
            feats = extractor(img.float())
            image_grams = [gram(feats[taps.index(name)]) for name, _ in style_layers]
        else:
            _, by_name = tiled_features(extractor, img.float(), tile, network, grams=[n for n, _ in style_layers],
                                        ranks=ranks)
            image_grams = [by_name[name] for name, _ in style_layers]
        for i, g in enumerate(image_grams):
            g = g * share  # (1, C, C)
            grams[i] = g if grams[i] is None else grams[i] + g
    return Targets(content_layers, style_layers, content_feats, grams, blend, content_factors, style_factors)
