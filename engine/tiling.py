"""Where the tiles of an exact tiled step lie (``--tile PX``, engine/tiles.py computes on
them): interiors on the deepest tap's stride grid that cover every feature position once,
crops with the halo the deepest tap needs (from the layer table), clipped at the image
edge. Plain arithmetic, no torch: the memory estimate (engine/memory.py) and the plan
(engine/plan.py) size tiles without the numerical core.

Why 80 px for relu5_1: each 3x3 convolution at stride s adds s pixels each side, so relu5_1
needs 2+4+16+32+16 = 70 px (its receptive field is 156 = 16 + 2 x 70); rounded up to the
deepest stride (16) so that crop origins stay on the pooling grid, 80 px (engine/layers.py
``tile_halo``). Tile edges lie on multiples of the deepest stride; the last tile takes the
rest (tiles need not divide the image, and may be smaller than the halo).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import deepest, tile_halo

TILE_SIZES = (2048, 1024, 512, 256, 128, 64)  # tried largest first when only tiles fit


def tile_interior(tile: int, stride: int) -> int:
    """A requested tile size as the tiles use it: rounded up to the deepest tap's stride
    (at least one stride), so that tile edges stay on the pooling grid."""
    return max(stride, -(-tile // stride) * stride)


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

    def interior(self, f, stride: int, hw: tuple[int, int]):
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
    """The largest of TILE_SIZES that gives every one of ``world`` ranks a tile (the
    smallest when none does)."""
    for t in TILE_SIZES:
        if len(tiles_for(hw, t, taps, network)) >= world:
            return t
    return TILE_SIZES[-1]
