"""Exact tiled steps (``--tile PX``, issue #15): the objective (engine/objective.py's
protocol) computed one tile of the image at a time, equal to the untiled one up to float
rounding; ``Tiles`` for one process, ``SharedTiles`` for tiles shared across ranks.

Why it is exact. Every loss term is a sum over feature positions: a layer's Gram is
sum_positions f f^T, the content term a sum of squared differences. So the feature grid of
every tap is split into tile *interiors* that cover each position exactly once, and each
interior is computed from an image crop: the interior plus a *halo*, the context a block
of the deepest tap's cells needs on each side (engine/tiling.py: where the tiles lie).
(A 2x2 pooling rounds a band of wrong border values up to its own output stride; the halo's
rounding to the deepest stride covers that: checked layer by layer for every tap of VGG19
and VGG16.) Crops are clipped at the image edge, never padded: at the border the crop's
zero padding is the image's.

One evaluation is two passes over the tiles:

1. without gradients: each layer's global Gram (the sum of the interiors' F^T F, float32)
   and the content sums of squares; then the losses and, from the loss module
   (engine/losses.py), dL/dG of every style layer, fixed;
2. per tile: forward again with gradients, the explicit gradient of the interior features
   (dL/dF = (S + S^T) F for the style layers with S = dL/dG from pass 1, and the content
   layers' own) back-propagated through the network to the *whole crop* (halo pixels feed
   interior features) and added into the image gradient.

Memory: one crop's activations at a time, plus what stays whole (the image, its
gradient, the optimiser state, the content target). Cost: about the area of the crops
over the image's, times (two forwards + one backward) against (one + one).

The total-variation term is a sum over neighbouring pixel pairs of the whole image and is
computed untiled, with its explicit gradient (it is cheap).
"""

from __future__ import annotations

import torch

from .gram_op import gram_mc
from .layers import layer_by_name
from .losses import (content_grad, content_sq_sum, content_value_sum, gram_backward, gram_raw, style_grad_raw,
                     style_value_raw, tv_grad, tv_value)
from .objective import Problem
from .ranks import Evaluate, Ranks
from .signals import deferred
from .tiling import Tile, tiles_for


def _mc(f: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) -> (h*w, C), a view for channels-last features."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


class Tiles:
    """The objective of the whole image, computed tile by tile in one process."""

    def __init__(self, problem: Problem, tile: int, network: str, loss_scale: float | None = None):
        self.problem = problem
        self.math = problem.math
        # fp16: pass 2's backward runs on the gradients times this, so that small ones do
        # not underflow in the fp16 convolutions' backward.
        self.loss_scale = loss_scale or 1.0
        self.taps, self.network, self.tile = tuple(problem.net.taps), network, tile
        self.strides = [layer_by_name(network)[t].stride for t in self.taps]

    # -- the protocol ------------------------------------------------------------------
    def losses(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x, with_grad=False)[0]

    def losses_and_grad(self, x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        parts, grad = self.evaluate(x, with_grad=True)
        x.grad = grad if grad_scale == 1.0 else grad * grad_scale
        return parts

    def evaluate(self, x: torch.Tensor, with_grad: bool):
        """(parts (4,), image gradient of parts[0] or None)."""
        return self.share(x, with_grad)

    # -- the two passes ----------------------------------------------------------------
    def tiles(self, hw) -> list[Tile]:
        """This process's tiles (all of them here)."""
        return tiles_for(hw, self.tile, self.taps, self.network)

    def _maps(self, hw) -> list[tuple[int, int, int]]:
        """(C, h, w) of every tap's full map at an image of ``hw`` px."""
        table = layer_by_name(self.network)
        return [(table[t].out_channels, hw[0] // s, hw[1] // s) for t, s in zip(self.taps, self.strides)]

    def _tile_sums(self, t: Tile, feats, hw) -> tuple[list, list]:
        """One tile's part of the sums: per style layer its interior's F^T F (float32), per
        content layer its interior's sum of squared differences from the target."""
        p = self.problem
        grams = [gram_raw(t.interior(feats[i], self.strides[i], hw)) for i, _ in p.spec.style]  # (C, C) each
        csums = []
        for k, (i, _) in enumerate(p.spec.content):
            rows, cols = t.region(self.strides[i], hw)
            csums.append(content_sq_sum(t.interior(feats[i], self.strides[i], hw), p.targets.content[k][:, :, rows, cols]))
        return grams, csums

    def _sums(self, x: torch.Tensor):
        """Pass 1: the global Grams (unnormalised, float32) and content sums, no gradients."""
        hw = tuple(x.shape[-2:])
        p = self.problem
        grams = [torch.zeros_like(g[0]) for g in p.targets.grams]  # (C, C) each
        csums = [x.new_zeros((), dtype=torch.float32) for _ in p.spec.content]
        with torch.no_grad():
            for t in self.tiles(hw):
                g, c = self._tile_sums(t, p.features(x[:, :, t.cy0:t.cy1, t.cx0:t.cx1]), hw)
                grams = [a + d for a, d in zip(grams, g)]
                csums = [a + d for a, d in zip(csums, c)]
        return grams, csums

    def _terms(self, x: torch.Tensor, grams, csums):
        """From pass 1's sums (engine/losses.py's functions): the content and style losses,
        each content layer's coefficient, and each style layer's dL/dG of the total."""
        p = self.problem
        maps = self._maps(tuple(x.shape[-2:]))
        c_maps = [maps[i] for i, _ in p.spec.content]
        s_maps = [maps[i] for i, _ in p.spec.style]
        c_coefs, s_coefs = p.spec.content_coefs(c_maps), p.spec.style_coefs(s_maps)
        c = sum(k * content_value_sum(v, *shape) for k, v, shape in zip(c_coefs, csums, c_maps))
        s = sum(k * style_value_raw(g, a, ch, h * w)
                for k, g, a, (ch, h, w) in zip(s_coefs, grams, p.targets.grams, s_maps))
        dgs = [style_grad_raw(g, a, ch, h * w, k * p.spec.style_weight)
               for k, g, a, (ch, h, w) in zip(s_coefs, grams, p.targets.grams, s_maps)]  # (C, C) each
        c = c if isinstance(c, torch.Tensor) else x.new_zeros(())
        s = s if isinstance(s, torch.Tensor) else x.new_zeros(())
        return c, s, c_coefs, dgs

    def _feature_grads(self, t: Tile, feats, hw, c_coefs, dgs) -> dict[int, torch.Tensor]:
        """The explicit loss gradient of one crop's interior features, per tap index
        (float32): the style layers' (S + S^T) F and the content layers' own."""
        p, maps = self.problem, self._maps(hw)
        out: dict[int, torch.Tensor] = {}
        for (i, _), s in zip(p.spec.style, dgs):
            f = t.interior(feats[i], self.strides[i], hw).detach()
            out[i] = out.get(i, 0) + gram_backward(f, s)
        for k, ((i, _), coef) in enumerate(zip(p.spec.content, c_coefs)):
            rows, cols = t.region(self.strides[i], hw)
            f = t.interior(feats[i], self.strides[i], hw).detach()
            ch, h, w = maps[i]  # the mean runs over the full map, not the tile's interior
            out[i] = out.get(i, 0) + content_grad(f, p.targets.content[k][:, :, rows, cols],
                                                  coef * p.spec.content_weight, numel=ch * h * w)
        return out

    def _image_grad(self, x: torch.Tensor, c_coefs, dgs) -> torch.Tensor:
        """Pass 2: the image gradient of the content and style terms, tile by tile."""
        hw = tuple(x.shape[-2:])
        grad = torch.zeros_like(x)
        for t in self.tiles(hw):
            crop = x[:, :, t.cy0:t.cy1, t.cx0:t.cx1].detach().requires_grad_(True)
            with torch.enable_grad():
                feats = self.problem.features(crop)
                dfs = self._feature_grads(t, feats, hw, c_coefs, dgs)
                outs = [t.interior(feats[i], self.strides[i], hw) for i in dfs]
                ins = [(d * self.loss_scale).to(o.dtype) for d, o in zip(dfs.values(), outs)]
                if not outs:
                    continue
                (g_crop,) = torch.autograd.grad(outs, crop, ins)
            grad[:, :, t.cy0:t.cy1, t.cx0:t.cx1] += g_crop / self.loss_scale
        return grad

    def share(self, x: torch.Tensor, with_grad: bool):
        """This process's part of an evaluation (all of it here): (parts (4,), gradient or None)."""
        p = self.problem
        xd = x.detach()
        grams, csums = self._sums(xd)
        c, s, c_coefs, dgs = self._terms(xd, grams, csums)
        grad = None
        if with_grad:
            grad = self._image_grad(xd, c_coefs, dgs)
            grad += p.spec.tv_weight * tv_grad(xd)
        return p.spec.total(c, s, tv_value(xd)).float(), grad


class SharedTiles(Tiles):
    """Tiles shared across ranks (engine/ranks.py): each rank computes every world-th tile,
    pass 1's sums are all-reduced and pass 2's gradients reduced to the lead (rank 0). The
    lead evaluates through the protocol and first tells the workers to evaluate the same
    image; a worker follows with ``share``, whose losses are the whole image's too and whose
    gradient is only its tiles'."""

    def __init__(self, problem: Problem, tile: int, network: str, loss_scale: float | None, ranks: Ranks):
        super().__init__(problem, tile, network, loss_scale)
        self.ranks = ranks

    def evaluate(self, x: torch.Tensor, with_grad: bool):
        if not self.ranks.lead:
            return self.share(x, with_grad)
        # A stop signal waits for the end of the evaluation: leaving between two of its
        # collectives would leave the workers in the other one.
        with deferred():
            self.ranks.send(Evaluate(with_grad, tuple(x.shape[-2:])))
            self.ranks.share_image(x, tuple(x.shape[-2:]), x.device)
            return self.share(x, with_grad)

    def tiles(self, hw) -> list[Tile]:
        return self.ranks.mine(super().tiles(hw))

    def _sums(self, x: torch.Tensor):
        grams, csums = super()._sums(x)
        summed = self.ranks.sum(grams + csums)  # over the ranks' tiles: the whole image's
        return summed[:len(grams)], summed[len(grams):]

    def _image_grad(self, x: torch.Tensor, c_coefs, dgs) -> torch.Tensor:
        return self.ranks.sum_to_lead(super()._image_grad(x, c_coefs, dgs))  # the workers' tiles' gradients too


@torch.no_grad()
def tiled_features(extractor, img: torch.Tensor, tile: int, network: str, maps=(), grams=(), ranks=None):
    """Features of a whole image computed tile by tile, for the targets: ({tap: (1, C, h, w)
    float32 map assembled from the interiors} for ``maps``, {tap: (1, C, C) Gram normalised
    by C*h*w, as engine/losses.py's ``gram``} for ``grams``). With ``ranks`` (engine/ranks.py)
    each rank computes its share of the tiles and every rank gets the sum."""
    taps = list(extractor.taps)
    table = layer_by_name(network)
    strides = {t: table[t].stride for t in taps}
    hw = tuple(img.shape[-2:])
    out_maps = {n: img.new_zeros((1, table[n].out_channels, hw[0] // strides[n], hw[1] // strides[n]))
                for n in maps}  # float32, (1, C, H/s, W/s)
    sums = {n: img.new_zeros((table[n].out_channels,) * 2) for n in grams}  # (C, C)
    tiles = tiles_for(hw, tile, taps, network)
    for t in (tiles if ranks is None else ranks.mine(tiles)):
        feats = dict(zip(taps, extractor(img[:, :, t.cy0:t.cy1, t.cx0:t.cx1])))
        for name in maps:
            s = strides[name]
            rows, cols = t.region(s, hw)
            out_maps[name][:, :, rows, cols] = t.interior(feats[name], s, hw).float()
        for name in grams:
            sums[name] += gram_mc(_mc(t.interior(feats[name], strides[name], hw)))
    if ranks is not None:  # the interiors are disjoint: summing the maps assembles them
        summed = ranks.sum(list(out_maps.values()) + list(sums.values()))
        out_maps = dict(zip(out_maps, summed[:len(out_maps)]))
        sums = dict(zip(sums, summed[len(out_maps):]))
    out_grams = {}
    for name, g in sums.items():
        s = strides[name]
        out_grams[name] = (g / (g.shape[0] * (hw[0] // s) * (hw[1] // s))).unsqueeze(0)
    return out_maps, out_grams
