"""FLOPs of one optimisation step, counted from the layer shapes.

For a 3x3 convolution with C_in input and C_out output channels on an H x W output map
(stride 1, padding 1), one forward pass costs

    F_conv = 2 * C_in * C_out * 9 * H * W            (a multiply-add counts as 2 FLOPs)

The optimisation needs only the gradient with respect to the *input* (the weights are
frozen), which is one transposed convolution of the same cost, so

    step = sum_conv 2 * F_conv                         (forward + input-gradient backward)
         + sum_style_layer 2 * (2 * C^2 * M)           (Gram F F^T, and its backward (dG + dG^T) F)

with M = H * W at that layer. The first convolution's input gradient is needed too (it is
the image gradient). ReLU, pooling, normalisation, the losses and Adam are elementwise and
left out: they are bandwidth, not FLOPs. A naive loop that also runs the network forward
on the content and style images every step does sum_conv F_conv more per extra image.
"""

from __future__ import annotations

from nst.engine.layers import deepest, layer_by_name, layers_upto
from nst.engine.settings import StylizeSettings

_DEFAULTS = StylizeSettings()
STYLE_LAYERS = tuple(n for n, _ in _DEFAULTS.layer_weights()[1])  # the engine's default style taps
DEEPEST = deepest(_DEFAULTS.taps()).name  # relu5_1 by default


def conv_forward_flops(h: int, w: int, deepest: str = DEEPEST, network: str = "vgg19") -> int:
    """FLOPs of the conv layers up to ``deepest`` for an (h, w) input, forward only."""
    total = 0
    for layer in layers_upto((deepest,), network):
        if layer.kind == "conv":
            oh, ow = h // layer.stride, w // layer.stride
            total += 2 * layer.in_channels * layer.out_channels * 9 * oh * ow
    return total


def gram_flops(h: int, w: int, style_layers=STYLE_LAYERS, network: str = "vgg19") -> int:
    """Forward + backward FLOPs of the Gram matrices at ``style_layers``."""
    table = layer_by_name(network)
    total = 0
    for name in style_layers:
        layer = table[name]
        m = (h // layer.stride) * (w // layer.stride)
        total += 2 * (2 * layer.out_channels**2 * m)
    return total


def step_flops(h: int, w: int, extra_forwards: int = 0, deepest: str = DEEPEST,
               style_layers=STYLE_LAYERS, network: str = "vgg19") -> int:
    """FLOPs of one step; ``extra_forwards`` counts additional forward passes (naive loop)."""
    f = conv_forward_flops(h, w, deepest, network)
    return 2 * f + gram_flops(h, w, style_layers, network) + extra_forwards * f
