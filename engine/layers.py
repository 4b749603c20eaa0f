"""Names of the VGG layers, as in the paper, mapped to torchvision's indices.

torchvision's ``vgg19().features`` is a flat ``nn.Sequential``; the style-transfer
literature names its layers ``conv<block>_<n>``, ``relu<block>_<n>`` and ``pool<block>``.
This module is the single place where one is turned into the other. A test checks the
table against torchvision's own layer list.
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


def min_side(taps: tuple[str, ...], network: str = "vgg19") -> int:
    """Smallest input height/width for which every tap is at least 2x2.

    Each 2x2 pooling halves (floors) the map. We ask for 2 pixels, not 1, at the deepest
    tap: a 1x1 map makes the style Gram a single outer product and lets ``torch.export``
    specialise the size-1 case, so the same minimum holds for every artefact.
    """
    deepest = max(layer_by_name(network)[t].stride for t in taps)
    return 2 * deepest
