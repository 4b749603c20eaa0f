"""THE table of the VGG networks: layer names as in the paper, torchvision indices,
channels, strides, blocks, and the input convention (ImageNet mean and std).

torchvision's ``vgg19().features`` is a flat ``nn.Sequential``; the style-transfer
literature names its layers ``conv<block>_<n>``, ``relu<block>_<n>`` and ``pool<block>``.
This module is the single place where one is turned into the other, and everything that
depends on the network's shape (the extractor, weights checks, the memory plan, FLOP
counts, benchmarks, exports) derives from it. A test checks the table against
torchvision's own layer list. No torch import: the settings and the CLI read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, NSTError

# Convolutions per block (torchvision configs "E" for VGG19 and "D" for VGG16).
_CONVS_PER_BLOCK = {
    "vgg19": (2, 2, 4, 4, 4),
    "vgg16": (2, 2, 3, 3, 3),
}
_BLOCK_CHANNELS = (64, 128, 256, 512, 512)

NETWORKS = tuple(_CONVS_PER_BLOCK)
POOLS = ("max", "avg")  # torchvision's max pooling, or Gatys et al.'s average pooling

# torchvision's ImageNet input normalisation (RGB, values in [0, 1]): every VGG checkpoint
# it publishes was trained on (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The taps the engine uses by default: content at relu4_2, style at relu1_1..relu5_1
# (Gatys et al. 2016). Output order is always network depth order.
DEFAULT_TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")


@dataclass(frozen=True)
class Layer:
    """One entry of torchvision's ``features`` Sequential."""

    name: str  # "conv3_2"
    kind: str  # "conv" | "relu" | "pool"
    index: int  # position in torchvision's vgg.features
    block: int  # 1..5
    in_channels: int
    out_channels: int
    stride: int  # spatial downsampling of this layer's output relative to the input


def vgg_layers(network: str = "vgg19") -> tuple[Layer, ...]:
    """All layers of ``network``'s feature stack, in order."""
    if network not in _CONVS_PER_BLOCK:
        raise NSTError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    layers: list[Layer] = []
    in_ch, stride = 3, 1
    for block, (n_convs, ch) in enumerate(zip(_CONVS_PER_BLOCK[network], _BLOCK_CHANNELS), 1):
        for n in range(1, n_convs + 1):
            layers.append(Layer(f"conv{block}_{n}", "conv", len(layers), block, in_ch, ch, stride))
            layers.append(Layer(f"relu{block}_{n}", "relu", len(layers), block, ch, ch, stride))
            in_ch = ch
        stride *= 2
        layers.append(Layer(f"pool{block}", "pool", len(layers), block, ch, ch, stride))
    return tuple(layers)


def layer_by_name(network: str = "vgg19") -> dict[str, Layer]:
    return {layer.name: layer for layer in vgg_layers(network)}


def parse_taps(taps: str | tuple[str, ...] | list[str], network: str = "vgg19") -> tuple[str, ...]:
    """Validate tap names and return them unique, in network depth order.

    Accepts a sequence of names or one comma-separated string.
    """
    if isinstance(taps, str):
        names = [t for t in (s.strip() for s in taps.split(",")) if t]
    else:
        names = [t for item in taps for t in (s.strip() for s in str(item).split(",")) if t]
    if not names:
        raise InputError("no taps given; name at least one layer such as relu4_2")
    table = layer_by_name(network)
    unknown = [n for n in names if n not in table]
    if unknown:
        convs = [l.name for l in table.values() if l.kind == "conv"]
        raise InputError(
            f"unknown tap {unknown[0]!r} for {network}; taps are conv/relu/pool names "
            f"like {convs[0]}, relu{convs[-1][4:]}, pool4 (from {convs[0]} to pool5)"
        )
    return tuple(sorted(set(names), key=lambda n: table[n].index))


def parse_layer_weights(spec, network: str = "vgg19") -> tuple[tuple[str, float], ...]:
    """'relu1_1:1,relu2_1:0.75,relu3_1' -> (('relu1_1', 1.0), ('relu2_1', 0.75), ('relu3_1', 1.0)).

    A layer without ``:WEIGHT`` weighs 1. Layers are returned in network depth order.
    """
    items = spec.split(",") if isinstance(spec, str) else [s for item in spec for s in str(item).split(",")]
    weights: dict[str, float] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, w = item.partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise InputError(f"bad layer weight in {item!r}: write LAYER or LAYER:WEIGHT, e.g. relu2_1:0.75") from None
        if not weight >= 0 or weight == float("inf"):
            raise InputError(f"bad layer weight in {item!r}: must be a finite number >= 0")
        weights[name.strip()] = weight
    ordered = parse_taps(tuple(weights), network)  # validates names, sorts by depth
    return tuple((name, weights[name]) for name in ordered)


def deepest(taps, network: str = "vgg19") -> Layer:
    """The deepest of ``taps``: where the network is cut."""
    table = layer_by_name(network)
    return max((table[t] for t in taps), key=lambda layer: layer.index)


def layers_upto(taps, network: str = "vgg19") -> tuple[Layer, ...]:
    """The layers up to and including the deepest of ``taps``: what the extractor runs."""
    return vgg_layers(network)[: deepest(taps, network).index + 1]


def min_side(taps: tuple[str, ...], network: str = "vgg19") -> int:
    """Smallest input height/width for which every tap is at least 2x2.

    Each 2x2 pooling halves (floors) the map. We ask for 2 pixels, not 1, at the deepest
    tap: a 1x1 map makes the style Gram a single outer product and lets ``torch.export``
    specialise the size-1 case, so the same minimum holds for every artefact.
    """
    return 2 * max(layer_by_name(network)[t].stride for t in taps)


def tile_halo(taps, network: str = "vgg19") -> int:
    """Pixels of context a tile interior needs each side for exact features at ``taps``
    (engine/tiles.py): each 3x3 convolution at stride s adds s; rounded up to the deepest
    tap's stride, so that crops stay on the pooling grid. relu5_1: 70 -> 80. (A 2x2 pooling
    rounds a band of wrong border values up to its output stride; the final rounding
    covers that, checked layer by layer for every tap of VGG19 and VGG16.)"""
    context = sum(layer.stride for layer in layers_upto(tuple(taps), network) if layer.kind == "conv")
    stride = deepest(tuple(taps), network).stride
    return -(-context // stride) * stride
