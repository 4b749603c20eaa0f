"""Exact tiled steps (``--tile PX``, issue #15): the Gatys losses and their image gradient
computed one tile of the image at a time, equal to the untiled ones up to float rounding.

Why it is exact. Every loss term is a sum over feature positions: a layer's Gram is
sum_positions f f^T, the content term a sum of squared differences. So the feature grid of
every tap is split into tile *interiors* that cover each position exactly once, and each
interior is computed from an image crop: the interior plus a *halo*, the context a block
of the deepest tap's cells needs on each side. From the layer table: each 3x3 convolution
at stride s adds s pixels each side, so relu5_1 needs 2+4+16+32+16 = 70 px (its receptive
field is 156 = 16 + 2 x 70); rounded up to the deepest stride (16) so that crop origins
stay on the pooling grid, 80 px. (A 2x2 pooling rounds a band of wrong border values up
to its own output stride; the final rounding covers that: checked layer by layer for
every tap of VGG19 and VGG16.) Crops are
clipped at the image edge, never padded: at the border the crop's zero padding is the
image's. Tile edges lie on multiples of the deepest stride; the last tile takes the rest
(tiles need not divide the image, and may be smaller than the halo).

One step is two passes over the tiles:

1. without gradients: each layer's global Gram (the sum of the interiors' F^T F, float32)
   and the content sums; then the losses, and dL/dG of every layer, fixed;
2. per tile: forward again with gradients, the surrogate
   sum_l <dL/dG_l, F_int^T F_int> + the content term over the interior, whose gradient
   with respect to the interior features is the true one; back-propagate it to the
   *whole crop* (halo pixels feed interior features) and add it into the image gradient.

Memory: one crop's activations at a time, plus what stays whole (the image, its
gradient, the optimiser state, the content target). Cost: about the area of the crops
over the image's, times (two forwards + one backward) against (one + one).

The total-variation term is a sum over neighbouring pixel pairs of the whole image and is
computed untiled (it is cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gram_op import gram_mc
from .layers import deepest, layer_by_name, tile_halo
from .losses import tv_loss
from .memory import TILE_SIZES, tile_interior


@dataclass(frozen=True)
class Tile:
    """A tile interior [y0, y1) x [x0, x1) and its crop [cy0, cy1) x [cx0, cx1), in pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    def region(self, stride: int, hw: tuple[int, int]) -> tuple[slice, slice]:
        """The interior's rows and columns in the full map at ``stride``; the last tile of a
        row or column reaches the map's end (floor(H / stride) cells)."""
        h, w = hw
        yb = (self.y1 if self.y1 < h else (h // stride) * stride) // stride
        xb = (self.x1 if self.x1 < w else (w // stride) * stride) // stride
        return slice(self.y0 // stride, yb), slice(self.x0 // stride, xb)

    def interior(self, f: torch.Tensor, stride: int, hw: tuple[int, int]) -> torch.Tensor:
        """The interior cells of the crop's features ``f`` (1, C, h, w) at ``stride``: the
        region, shifted by the crop's origin (a multiple of every tap's stride)."""
        rows, cols = self.region(stride, hw)
        dy, dx = self.cy0 // stride, self.cx0 // stride
        return f[:, :, rows.start - dy:rows.stop - dy, cols.start - dx:cols.stop - dx]


def _edges(n: int, tile: int, stride: int) -> list[int]:
    """Tile edges along one side: multiples of ``tile``, then ``n``. A last piece shorter
    than the stride goes to the tile before it: its crop (piece plus one halo) could be
    smaller than the network's smallest input where the halo is only one stride (pool1)."""
    edges = list(range(0, n, tile)) + [n]
    if len(edges) > 2 and n - edges[-2] < stride:
        del edges[-2]
    return edges


def make_tiles(hw: tuple[int, int], tile: int, halo_px: int, stride: int) -> list[Tile]:
    """The tiles of an image of (H, W) px: interiors of ``tile`` px (rounded up to a
    multiple of ``stride``; the last ones take the rest), crops with ``halo_px`` each side."""
    h, w = hw
    tile = tile_interior(tile, stride)
    out = []
    ys, xs = _edges(h, tile, stride), _edges(w, tile, stride)
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            out.append(Tile(y0, y1, x0, x1, max(0, y0 - halo_px), min(h, y1 + halo_px), max(0, x0 - halo_px),
                            min(w, x1 + halo_px)))
    return out


def tiles_for(hw: tuple[int, int], tile: int, taps, network: str) -> list[Tile]:
    """The tiles of an image of (H, W) px for a network cut at ``taps``: halo and stride from
    the layer table (engine/layers.py)."""
    return make_tiles(hw, tile, tile_halo(taps, network), deepest(tuple(taps), network).stride)


def rank_tile(hw: tuple[int, int], world: int, taps, network: str) -> int:
    """The largest of the memory plan's tile sizes that gives every rank a tile (the
    smallest when none does)."""
    for t in TILE_SIZES:
        if len(tiles_for(hw, t, taps, network)) >= world:
            return t
    return TILE_SIZES[-1]


def _mc(f: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) -> (h*w, C), a view for channels-last features."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


class TiledObjective:
    """The objective (engine/objective.py's contract: x -> (4,) [total, content, style, tv])
    computed tile by tile. Called on an image that requires grad, under grad mode, it also
    leaves the exact image gradient to autograd (as one node): the steppers need no change."""

    def __init__(self, objective, tile: int, network: str, loss_scale: float | None = None, ranks=None):
        self.base = objective  # the untiled objective: network, targets, weights, autocast
        # fp16: pass 2's backward runs on the surrogate times this (as the steppers scale the
        # loss), so small gradients do not underflow in the fp16 convolutions' backward.
        self.scale = loss_scale or 1.0
        self.taps, self.network, self.tile = tuple(objective.net.taps), network, tile
        self.strides = [layer_by_name(network)[t].stride for t in self.taps]
        self.math = objective.math  # the steppers run every step under it
        # engine/ranks.py: with ranks, each computes every world-th tile and the sums are
        # reduced; the lead (rank 0) drives the evaluations, the workers follow.
        self.ranks = ranks

    def tiles(self, hw) -> list[Tile]:
        """This rank's tiles (all of them without ranks)."""
        tiles = tiles_for(hw, self.tile, self.taps, self.network)
        return tiles if self.ranks is None else self.ranks.mine(tiles)

    def _tile_terms(self, t: Tile, feats, hw) -> tuple[list, list]:
        """One tile's part of the sums: per style layer its interior's F^T F (float32), per
        content layer its interior's sum of squared differences from the target."""
        b = self.base
        grams = [gram_mc(_mc(t.interior(feats[i], self.strides[i], hw))) for i in b.style_idx]  # (C, C) each
        csums = []
        for k, i in enumerate(b.content_idx):
            rows, cols = t.region(self.strides[i], hw)
            f = t.interior(feats[i], self.strides[i], hw).float()
            csums.append((f - b.targets.content[k][:, :, rows, cols]).square().sum())
        return grams, csums

    def _sums(self, x: torch.Tensor):
        """Pass 1: the global Grams (unnormalised, float32) and content sums, no gradients."""
        hw = tuple(x.shape[-2:])
        b = self.base
        grams = [torch.zeros_like(b.targets.grams[k][0]) for k in range(len(b.style_idx))]  # (C, C) each
        csums = [x.new_zeros((), dtype=torch.float32) for _ in b.content_idx]
        with torch.no_grad():
            for t in self.tiles(hw):
                g, c = self._tile_terms(t, self.base.features(x[:, :, t.cy0:t.cy1, t.cx0:t.cx1]), hw)
                grams = [a + d for a, d in zip(grams, g)]
                csums = [a + d for a, d in zip(csums, c)]
        if self.ranks is not None:
            summed = self.ranks.sum(grams + csums)  # over the ranks' tiles: the whole image's
            grams, csums = summed[:len(grams)], summed[len(grams):]
        return grams, csums

    def _terms(self, x: torch.Tensor, grams, csums):
        """The losses and dL/dG (per style layer) and dL/d(content sum) from pass 1's sums."""
        b = self.base
        c_terms, c_grads = [], []
        for k, i in enumerate(b.content_idx):
            n = b.targets.content[k].numel()  # N*C*h*w of the full map: the mean's divisor
            c_terms.append(b.content_w[k] * csums[k] / n)
            c_grads.append(b.cw * b.content_w[k] / n)
        s_terms, s_grads = [], []
        for k, i in enumerate(b.style_idx):
            ch = grams[k].shape[0]
            h, w = (d // self.strides[i] for d in x.shape[-2:])
            scale = 1.0 / (ch * h * w)
            diff = grams[k] * scale - b.targets.grams[k][0]  # (C, C)
            s_terms.append(b.style_w[k] * diff.square().mean())
            # d/dG of w * mean((G * scale - A)^2), times the style weight
            s_grads.append(b.sw * b.style_w[k] * 2.0 * diff * scale / diff.numel())
        c = torch.stack(c_terms).sum() if c_terms else x.new_zeros(())
        s = torch.stack(s_terms).sum() if s_terms else x.new_zeros(())
        return c, s, c_grads, s_grads

    def _image_grad(self, x: torch.Tensor, c_grads, s_grads) -> torch.Tensor:
        """Pass 2: the image gradient of the content and style terms, tile by tile."""
        hw = tuple(x.shape[-2:])
        grad = torch.zeros_like(x)
        for t in self.tiles(hw):
            crop = x[:, :, t.cy0:t.cy1, t.cx0:t.cx1].detach().requires_grad_(True)
            with torch.enable_grad():
                grams, csums = self._tile_terms(t, self.base.features(crop), hw)
                # Its gradient in the interior features is the true one: F_int (dG + dG^T) for
                # the style terms with dL/dG fixed from pass 1, and the content terms' own.
                sur = sum((s * g).sum() for s, g in zip(s_grads, grams)) + sum(c * v for c, v in zip(c_grads, csums))
                sur = sur + crop.new_zeros(())  # a tensor even with no content or style layer
                (g_crop,) = torch.autograd.grad(sur * self.scale, crop)
            grad[:, :, t.cy0:t.cy1, t.cx0:t.cx1] += g_crop / self.scale
        if self.ranks is not None:
            grad = self.ranks.sum_to_lead(grad)  # the workers' tiles' gradients, added on the lead
        return grad

    def evaluate(self, x: torch.Tensor, with_grad: bool):
        """(parts (4,), image gradient of parts[0] or None). With ranks, the lead first
        tells the workers to evaluate the same image (engine/ranks.py)."""
        if self.ranks is not None and self.ranks.lead:
            from .ranks import EVAL
            from .signals import deferred

            # A stop signal waits for the end of the evaluation: leaving between two of its
            # collectives would leave the workers in the other one.
            with deferred():
                self.ranks.command(EVAL, int(with_grad), *x.shape[-2:])
                self.ranks.share_image(x, tuple(x.shape[-2:]), x.device)
                return self.share(x, with_grad)
        return self.share(x, with_grad)

    def share(self, x: torch.Tensor, with_grad: bool):
        """This rank's part of an evaluation (the whole of it without ranks); on a worker,
        the returned losses are the whole image's too, its gradient only its tiles'."""
        b = self.base
        xd = x.detach()
        grams, csums = self._sums(xd)
        c, s, c_grads, s_grads = self._terms(xd, grams, csums)
        grad = None
        if with_grad:
            grad = self._image_grad(xd, c_grads, s_grads)
            with torch.enable_grad():
                xt = xd.clone().requires_grad_(True)
                tv = tv_loss(xt)
                (g_tv,) = torch.autograd.grad(b.tvw * tv, xt)
            grad += g_tv
            tv = tv.detach()
        else:
            tv = tv_loss(xd)
        total = b.cw * c + b.sw * s + b.tvw * tv
        return torch.stack([total, c, s, tv]).float(), grad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _TiledLoss.apply(x, self)
        return self.evaluate(x, with_grad=False)[0]


class _TiledLoss(torch.autograd.Function):
    """x -> (4,) losses; backward hands back the gradient pass 2 computed (times the
    incoming gradient of the total, e.g. a loss scale)."""

    @staticmethod
    def forward(ctx, x, objective):
        parts, grad = objective.evaluate(x, with_grad=True)
        ctx.save_for_backward(grad)
        return parts

    @staticmethod
    def backward(ctx, g):  # g: (4,); the steppers differentiate the total only
        (grad,) = ctx.saved_tensors
        return g[0] * grad, None


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
