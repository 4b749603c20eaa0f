"""Make docs/tiles-no-seams.png: a render with exact tiles, a 100% crop around a corner where
four tiles meet, and its difference from the same render without tiles, with the tile grid
drawn on both. A seam would show as lines in the difference map along the tile edges.

The images are the demo's drawings (no files), the weights are seeded random weights (NOT
a trained network: this shows the machinery, not a style); the two renders start from the
same image and run the same Adam steps. Run from the repository root:

    .venv/bin/python docs/make_tiles_picture.py [SIZE] [TILE] [STEPS]   (default 512 128 40)
"""

from __future__ import annotations

import sys
import time

import torch
from PIL import Image, ImageDraw

from nst.engine.demo import RANDOM_STYLE_WEIGHT, make_content, make_style
from nst.engine.imageio import pil_to_tensor
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings


def render(content, style, size: int, steps: int, tile: int | None, memory_format: str = "auto"):
    s = StylizeSettings(size=size, weights="random:0", device="cpu", style_weight=RANDOM_STYLE_WEIGHT, tile=tile,
                        checkpointing="off", memory_format=memory_format)
    p = prepare(content, [(style, 1.0)], s)
    t0 = time.perf_counter()
    for _ in range(steps):
        p.stepper.step()
    dt = (time.perf_counter() - t0) / steps
    return p.x.detach().clamp(0, 1)[0], dt, p


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def edge_band(tiles, hw, px: int) -> torch.Tensor:
    """(H, W) bool: within ``px`` of an edge between two tile interiors."""
    band = torch.zeros(hw, dtype=torch.bool)
    for t in tiles:
        if t.y0 > 0:
            band[max(0, t.y0 - px):t.y0 + px, :] = True
        if t.x0 > 0:
            band[:, max(0, t.x0 - px):t.x0 + px] = True
    return band


def main(size: int = 512, tile: int = 128, steps: int = 40) -> None:
    content, style = pil_to_tensor(make_content(640, 640)), pil_to_tensor(make_style(512, 512, seed=1))
    plain, plain_s, _ = render(content, style, size, steps, None)
    tiled, tiled_s, p = render(content, style, size, steps, tile)
    # The scale of float rounding: the untiled render in the other memory layout (its
    # convolutions round differently), from the same start, the same steps.
    nchw, _, _ = render(content, style, size, steps, None, "contiguous")
    layout = (nchw - plain).abs().amax(0)
    hw = tuple(plain.shape[-2:])
    tiles = p.objective.tiles(hw)
    diff = (tiled - plain).abs().amax(0)  # (H, W), the largest channel difference
    band = edge_band(tiles, hw, 8)
    near, far = float(diff[band].mean()), float(diff[~band].mean())
    print(f"{len(tiles)} tiles; |tiled - untiled|: max {float(diff.max()):.2e}, mean {float(diff.mean()):.2e}; "
          f"mean within 8 px of a tile edge {near:.2e}, elsewhere {far:.2e}; untiled NCHW against channels-last: max "
          f"{float(layout.max()):.2e}, mean {float(layout.mean()):.2e}; {plain_s:.1f} s/step untiled, "
          f"{tiled_s:.1f} s/step tiled")

    crop_px = 192
    cy = cx = tile * (len({t.y0 for t in tiles}) // 2)  # a corner where four tiles meet, near the middle
    box = (cx - crop_px // 2, cy - crop_px // 2, cx + crop_px // 2, cy + crop_px // 2)
    big = 384
    f = big / size
    overview = to_pil(tiled).resize((big, big), Image.LANCZOS)
    d = ImageDraw.Draw(overview)
    for t in tiles:  # interiors' edges
        d.rectangle([t.x0 * f, t.y0 * f, t.x1 * f - 1, t.y1 * f - 1], outline=(255, 255, 255))
    d.rectangle([c * f for c in box], outline=(255, 0, 0), width=2)
    crop = to_pil(tiled).crop(box).resize((big, big), Image.NEAREST)
    dc = ImageDraw.Draw(crop)
    m = big // 2
    for a, b in (((m, 0), (m, 10)), ((m, big - 10), (m, big)), ((0, m), (10, m)), ((big - 10, m), (big, m))):
        dc.line([a, b], fill=(255, 0, 0), width=2)  # where the tile edges cross the crop
    heat = (diff / diff.max()).sqrt()  # square root: small differences stay visible
    dmap = to_pil(heat.expand(3, -1, -1)).resize((big, big), Image.LANCZOS)
    dd = ImageDraw.Draw(dmap)
    for t in tiles:
        dd.rectangle([t.x0 * f, t.y0 * f, t.x1 * f - 1, t.y1 * f - 1], outline=(200, 0, 0))
    pad, text_h = 8, 74
    sheet = Image.new("RGB", (3 * big + 4 * pad, big + text_h + 2 * pad), "white")
    for i, im in enumerate([overview, crop, dmap]):
        sheet.paste(im, (pad + i * (big + pad), text_h + pad))
    dt = ImageDraw.Draw(sheet)
    dt.text((pad, 4), f"{size}x{size}, {steps} Adam steps, {len(tiles)} tiles of {tile} px (white: tile interiors; red "
            f"box: the crop). Seeded random weights, NOT a trained network.", fill="black")
    dt.text((pad, 20), f"Left: tiled render. Middle: {crop_px}x{crop_px} px of it at 100% (shown 2x) around a corner "
            f"where four tiles meet (red ticks). Right: |tiled - untiled| (sqrt scale, white = max), tile edges in red.",
            fill="black")
    dt.text((pad, 36), f"Tiled - untiled: max {float(diff.max()):.1e}, mean {float(diff.mean()):.1e}; within 8 px of a tile "
            f"edge {near:.1e}, elsewhere {far:.1e} (pixel values in [0, 1]). The untiled render in two memory layouts: "
            f"max {float(layout.max()):.1e}, mean {float(layout.mean()):.1e}.", fill="black")
    dt.text((pad, 52), f"Each loss and gradient is the untiled one to 1e-5; {steps} Adam steps amplify float rounding "
            f"anywhere, not at the edges. {tiled_s:.1f} s/step tiled, {plain_s:.1f} untiled (2-core CPU).",
            fill="black")
    sheet.save("docs/tiles-no-seams.png", optimize=True)
    print("wrote docs/tiles-no-seams.png")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
