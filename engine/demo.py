"""Images the project draws itself, for ``nst demo`` and the benchmarks: no files, no network.

The content and style images are drawn here, from code, with a seeded RNG: a landscape
(sky, sun, mountains, lake, house, trees) and a swirling "night sky" painting. Nothing is
downloaded. ImageNet weights are used when they are already in the torch hub cache;
otherwise seeded random weights, and every output says which.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .weights import IMAGENET_URLS

RANDOM_STYLE_WEIGHT = 1e8


def make_content(width: int = 320, height: int = 240) -> Image.Image:
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):  # sky: deep blue to pale at the horizon
        t = y / height
        d.line([(0, y), (width, y)], fill=(int(60 + 150 * t), int(110 + 120 * t), int(200 + 40 * t)))
    d.ellipse([width * 0.72, height * 0.08, width * 0.86, height * 0.27], fill=(255, 220, 90))
    d.polygon([(0, height * 0.62), (width * 0.25, height * 0.3), (width * 0.5, height * 0.62)], fill=(90, 100, 120))
    d.polygon([(width * 0.3, height * 0.62), (width * 0.62, height * 0.22), (width, height * 0.62)], fill=(70, 85, 105))
    d.polygon([(width * 0.55, height * 0.34), (width * 0.62, height * 0.22), (width * 0.69, height * 0.34)],
              fill=(240, 240, 250))
    d.rectangle([0, height * 0.62, width, height], fill=(70, 140, 60))
    d.ellipse([width * 0.05, height * 0.72, width * 0.45, height * 0.92], fill=(60, 120, 190))
    d.rectangle([width * 0.58, height * 0.6, width * 0.78, height * 0.8], fill=(200, 80, 60))
    d.polygon([(width * 0.55, height * 0.6), (width * 0.68, height * 0.48), (width * 0.81, height * 0.6)],
              fill=(120, 50, 40))
    d.rectangle([width * 0.66, height * 0.7, width * 0.71, height * 0.8], fill=(80, 50, 30))
    for cx in (0.86, 0.93, 0.5):
        d.polygon([(width * (cx - 0.04), height * 0.8), (width * cx, height * 0.58), (width * (cx + 0.04), height * 0.8)],
                  fill=(30, 90, 40))
    return img


def make_style(width: int = 256, height: int = 256, seed: int = 0) -> Image.Image:
    """Thick swirling strokes in blues and yellows on a dark ground."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (20, 30, 70))
    d = ImageDraw.Draw(img)
    palette = [(30, 60, 140), (60, 100, 190), (240, 210, 80), (250, 240, 160), (20, 40, 90), (110, 160, 210)]
    for _ in range(260):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(6, 40)
        a0 = rng.uniform(0, 360)
        colour = rng.choice(palette)
        d.arc([cx - r, cy - r, cx + r, cy + r], a0, a0 + rng.uniform(90, 300), fill=colour, width=rng.randint(2, 6))
    for _ in range(14):  # stars
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height * 0.6), rng.uniform(4, 10)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 235, 120))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def pick_weights(spec: str) -> str:
    """'auto' -> 'imagenet' when the checkpoint is already cached, else 'random:0'."""
    if spec != "auto":
        return spec
    name = IMAGENET_URLS["vgg19"].rsplit("/", 1)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    return "imagenet" if cached.is_file() else "random:0"


def contact_sheet(images: list[Image.Image], captions: list[str], height: int = 256) -> Image.Image:
    """Images side by side at one height, with a caption under each."""
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS) for im in images]
    font = ImageFont.load_default()
    pad, text_h = 8, 18
    lines_max = max(len(c.split("\n")) for c in captions)
    width = sum(im.width for im in scaled) + pad * (len(scaled) + 1)
    sheet = Image.new("RGB", (width, height + 2 * pad + text_h * lines_max), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    x = pad
    for im, cap in zip(scaled, captions):
        sheet.paste(im, (x, pad))
        for k, line in enumerate(cap.split("\n")):
            d.text((x, height + pad + 3 + k * text_h), line, fill=(0, 0, 0), font=font)
        x += im.width + pad
    return sheet
