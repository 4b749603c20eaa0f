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

from engine.layers import layer_by_name, vgg_layers


def conv_forward_flops(h: int, w: int, deepest: str = "relu5_1", network: str = "vgg19") -> int:
    """FLOPs of the conv layers up to ``deepest`` for an (h, w) input, forward only."""
    table = layer_by_name(network)
    stop = table[deepest].index
    total = 0
    for layer in vgg_layers(network):
        if layer.index > stop:
            break
        if layer.kind == "conv":
            oh, ow = h // layer.stride, w // layer.stride
            total += 2 * layer.in_channels * layer.out_channels * 9 * oh * ow
    return total


def gram_flops(h: int, w: int, style_layers, network: str = "vgg19") -> int:
    """Forward + backward FLOPs of the Gram matrices at ``style_layers``."""
    table = layer_by_name(network)
    total = 0
    for name in style_layers:
        layer = table[name]
        m = (h // layer.stride) * (w // layer.stride)
        total += 2 * (2 * layer.out_channels**2 * m)
    return total


STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def step_flops(h: int, w: int, extra_forwards: int = 0, deepest: str = "relu5_1",
               style_layers=STYLE_LAYERS, network: str = "vgg19") -> int:
    """FLOPs of one step; ``extra_forwards`` counts additional forward passes (naive loop)."""
    f = conv_forward_flops(h, w, deepest, network)
    return 2 * f + gram_flops(h, w, style_layers, network) + extra_forwards * f
