"""The memory estimate: a step's peak memory from the layer shapes, compared with what the
device has free, and the execution that fits: plain, activation checkpointing, exact tiles,
or a clear refusal that names the largest size that fits. ``estimate_memory`` is the entry
point; the plan of a render (engine/plan.py) takes its choice.

The estimate (bytes) for one optimisation step on an H x W image, activation element
size ``b`` (4 for fp32, 2 for bf16/fp16 convolutions):

    weights   = conv parameters (fp32), plus a half copy under autocast
    saved     = sum over layers up to the cut of what autograd keeps for the backward:
                each conv's output (its in-place ReLU shares it), each pooling output and,
                for max pooling, its int64 indices; with half precision, a float32 copy of
                every tap the losses read
    transient = 2 x the largest activation (a gradient flowing back next to its input)
    image     = the image, its gradient, two Adam moments and the content/style targets

With checkpointing, ``saved`` keeps only each block's input and the taps, and the largest
block's activations come back once, during its recomputation. The test suite measures the
real peak on the CPU and states the error of this estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .layers import deepest, layer_by_name, layers_upto, tile_halo
from .sizes import wxh
from .tiling import TILE_SIZES, tile_interior, tiles_for

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimates of one size, and the execution chosen from them."""

    size: tuple[int, int]
    estimate_bytes: int  # plain execution
    checkpointed_bytes: int  # with activation checkpointing over the VGG blocks
    available_bytes: int | None
    checkpoint: bool
    device: str
    tile: int | None = None  # exact tiled steps with tiles of this many px (engine/tiles.py)
    tiled_bytes: int = 0  # the estimate with those tiles
    tile_work: tuple[int, float] = (0, 0.0)  # (tiles, pixels a step computes per image pixel): ``tile_work``

    @property
    def bytes(self) -> int:
        """The estimate of the execution chosen."""
        return self.tiled_bytes if self.tile else (self.checkpointed_bytes if self.checkpoint else self.estimate_bytes)

    def describe(self) -> str:
        avail = "unknown" if self.available_bytes is None else f"{self.available_bytes / GiB:.2f} GiB"
        mode = "activation checkpointing" if self.checkpoint else "plain"
        if self.tile:
            n, work = self.tile_work
            cost = f"; {n} tiles, each step computes {work:.1f}x the image's pixels (their halos)" if n else ""
            mode = f"exact tiled steps, {self.tile} px tiles ({self.tiled_bytes / GiB:.2f} GiB{cost})"
        return (f"memory estimate for {wxh(self.size)}: estimated peak {self.estimate_bytes / GiB:.2f} GiB "
                f"plain, {self.checkpointed_bytes / GiB:.2f} GiB checkpointed; available {avail}; using {mode}")


def tile_work(h: int, w: int, tile: int, taps, network: str = "vgg19") -> tuple[int, float]:
    """(number of tiles, pixels a tiled step computes per image pixel): each tile's crop
    carries its halo, so small tiles cost many times the untiled step (two passes each)."""
    tiles = tiles_for((h, w), tile, tuple(taps), network)
    return len(tiles), sum((t.cy1 - t.cy0) * (t.cx1 - t.cx0) for t in tiles) / (h * w)


def estimate_breakdown(h: int, w: int, taps: tuple[str, ...], network: str = "vgg19", act_bytes: int = 4,
                       pool: str = "max", checkpoint: bool = False, n_content: int = 1) -> dict[str, int]:
    """The estimate in parts: ``resident`` (weights, image, Adam moments, targets: allocated
    before the first step) and ``step`` (what one step allocates at its peak)."""
    table = layer_by_name(network)
    layers = layers_upto(taps, network)
    weights = sum(l.in_channels * l.out_channels * 9 + l.out_channels for l in layers if l.kind == "conv") * 4
    if act_bytes < 4:
        weights = int(weights * 1.5)  # autocast keeps a half copy of each weight

    def elems(layer):
        return layer.out_channels * (h // layer.stride) * (w // layer.stride)

    per_layer = {}  # bytes kept for the backward, per layer
    for l in layers:
        if l.kind == "conv":
            per_layer[l.index] = elems(l) * act_bytes
        elif l.kind == "pool":
            per_layer[l.index] = elems(l) * (act_bytes + (8 if pool == "max" else 0))
        else:
            per_layer[l.index] = 0  # in-place ReLU: shares its conv's output
    tap_idx = {table[t].index for t in taps}
    f32_copies = sum(elems(table[t]) * 4 for t in taps) if act_bytes < 4 else 0
    largest = max(elems(l) for l in layers) * 4  # gradients are float32 at the image end
    image = 3 * h * w * 4 * 5  # image, gradient, 2 Adam moments, the normalised input
    targets = sum(elems(table[t]) * 4 for t in taps[:n_content]) + sum(table[t].out_channels ** 2 * 4 for t in taps)
    if not checkpoint:
        saved = sum(per_layer.values())
    else:
        # Kept: each block's input and every tap; during the backward, one block's other
        # activations come back at a time (the largest block bounds it).
        taps_bytes = sum(per_layer.get(i - 1, 0) if layers[i].kind == "relu" else per_layer[i] for i in tap_idx)
        blocks: dict[int, int] = {}
        inputs = 3 * h * w * act_bytes
        for l in layers:
            is_tap = l.index in tap_idx or (l.kind == "conv" and l.index + 1 in tap_idx)
            blocks[l.block] = blocks.get(l.block, 0) + (0 if is_tap else per_layer[l.index])
            if l.kind == "pool":
                inputs += elems(l) * act_bytes
        saved = inputs + taps_bytes + max(blocks.values())
    return {"resident": int(weights + image + targets), "step": int(saved + f32_copies + 2 * largest)}


def estimate_step_bytes(h: int, w: int, taps: tuple[str, ...], network: str = "vgg19", act_bytes: int = 4,
                        pool: str = "max", checkpoint: bool = False, n_content: int = 1) -> int:
    """Estimated peak bytes of a render at (h, w): resident tensors plus one step's peak."""
    b = estimate_breakdown(h, w, taps, network, act_bytes, pool, checkpoint, n_content)
    return b["resident"] + b["step"]


def estimate_tiled_bytes(h: int, w: int, tile: int, taps: tuple[str, ...], network: str = "vgg19",
                         act_bytes: int = 4, pool: str = "max", n_content: int = 1) -> int:
    """A tiled step (engine/tiles.py): what stays whole (weights, image, Adam state, content
    target; plus the gradient being summed and TV's copy of the image) and one crop's step."""
    halo, stride = tile_halo(taps, network), deepest(taps, network).stride
    t = tile_interior(tile, stride)
    ch, cw = min(h, t + 2 * halo), min(w, t + 2 * halo)
    whole = estimate_breakdown(h, w, taps, network, act_bytes, pool, False, n_content)["resident"]
    crop = estimate_breakdown(ch, cw, taps, network, act_bytes, pool, False, n_content)["step"]
    return int(whole + crop + 3 * h * w * 4 * 2)


def forward_bytes(h: int, w: int, taps: tuple[str, ...], network: str = "vgg19", act_bytes: int = 4) -> int:
    """Peak bytes of one forward pass without gradients (a style image's targets): the
    input, the largest activation and the next one beside it, and the taps kept."""
    table = layer_by_name(network)
    layers = layers_upto(taps, network)
    elems = [l.out_channels * (h // l.stride) * (w // l.stride) for l in layers]
    kept = sum(table[t].out_channels * (h // table[t].stride) * (w // table[t].stride) for t in taps)
    return int((3 * h * w + 2 * max(elems) + kept) * max(act_bytes, 4))


def available_bytes(device: str) -> int | None:
    """Free memory on the device: CUDA's free memory, or MemAvailable on Linux."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(h: int, w: int, taps, network: str, act_bytes: int, pool: str, device: str, mode: str = "auto",
                    limit_gib: float | None = None, can_checkpoint: bool = True, style_hws=(),
                    tile: int | None = None) -> MemoryEstimate:
    """Decide plain, checkpointed or tiled execution, or refuse with the largest size that fits.

    ``mode``: auto (checkpoint only when the plain step would not fit), on, off.
    ``limit_gib`` replaces the measured free memory (for tests and shared machines).
    ``style_hws``: the style images' sizes, whose features are computed once; one larger
    than the output whose forward pass would not fit is refused here, before it is resized.
    ``tile``: tiled steps asked for (--tile); without it, tiles are chosen (the largest of
    TILE_SIZES that fits) when neither the plain nor (where allowed) the checkpointed step fits.
    """
    plain = estimate_step_bytes(h, w, taps, network, act_bytes, pool, checkpoint=False)
    ckpt = estimate_step_bytes(h, w, taps, network, act_bytes, pool, checkpoint=True)
    avail = int(limit_gib * GiB) if limit_gib is not None else available_bytes(device)
    budget = None if avail is None else int(avail * 0.9)  # keep 10% for the allocator and the rest
    def tiled(t: int) -> MemoryEstimate:
        return MemoryEstimate((h, w), plain, ckpt, avail, False, device, t,
                              estimate_tiled_bytes(h, w, t, taps, network, act_bytes, pool),
                              tile_work(h, w, t, taps, network))

    if tile is not None:
        planned = tiled(tile)
        if budget is not None and planned.tiled_bytes > budget:
            raise InputError(f"{wxh((h, w))} with --tile {tile} needs about {planned.tiled_bytes / GiB:.2f} GiB, more "
                             f"than the {budget / GiB:.2f} GiB available on {device}: try a smaller --tile")
        return planned
    checkpoint = mode == "on"
    if budget is not None and mode != "on" and plain > budget:
        checkpoint = mode == "auto" and can_checkpoint
    need = ckpt if checkpoint else plain
    if budget is not None and need > budget and mode != "on":
        for t in TILE_SIZES:
            if t < max(h, w) and estimate_tiled_bytes(h, w, t, taps, network, act_bytes, pool) <= budget:
                return tiled(t)
    if budget is not None and need > budget:
        fits = largest_fitting(h, w, taps, network, act_bytes, pool, budget,
                               checkpoint or (mode == "auto" and can_checkpoint), tiles=mode != "on")
        how = " even with activation checkpointing" if checkpoint else ""
        if mode != "on":
            how += " or exact tiles" if checkpoint else " even with exact tiles"
            need = min(need, estimate_tiled_bytes(h, w, TILE_SIZES[-1], taps, network, act_bytes, pool))
        hint = f"; the largest that fits is about {wxh(fits)} (--size {max(fits)})" if fits else ""
        raise InputError(
            f"{wxh((h, w))} needs about {need / GiB:.2f} GiB per step{how}, more than the {budget / GiB:.2f} GiB "
            f"available on {device}{hint}"
        )
    for sh, sw in style_hws:
        if sh * sw <= h * w:
            continue  # no larger than a step's own forward pass, which the plan above covers
        need = forward_bytes(sh, sw, taps, network) + 3 * h * w * 4 * 2
        if budget is not None and need > budget:
            raise InputError(f"a style image at {wxh((sh, sw))} needs about {need / GiB:.2f} GiB for its features, more "
                             f"than the {budget / GiB:.2f} GiB available on {device}: lower --style-scale")
    return MemoryEstimate((h, w), plain, ckpt, avail, checkpoint, device)


def largest_fitting(h, w, taps, network, act_bytes, pool, budget, checkpoint, tiles: bool = False
                    ) -> tuple[int, int] | None:
    """The largest size with the same aspect ratio whose estimate fits ``budget`` (with
    ``tiles``, the smallest tiles count too)."""
    def need(hh, ww):
        plain = estimate_step_bytes(hh, ww, taps, network, act_bytes, pool, checkpoint)
        return min(plain, estimate_tiled_bytes(hh, ww, TILE_SIZES[-1], taps, network, act_bytes, pool)) if tiles \
            else plain

    lo, hi = 0.0, 1.0
    if need(max(1, round(h * 0.01)), max(1, round(w * 0.01))) > budget:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        hh, ww = max(1, round(h * mid)), max(1, round(w * mid))
        if need(hh, ww) <= budget:
            lo = mid
        else:
            hi = mid
    return max(1, round(h * lo)), max(1, round(w * lo))


