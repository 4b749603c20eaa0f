"""The Gatys step written with forward operators only, for ONNX (``objective.onnx``,
``step.onnx``, ``targets.onnx``).

ONNX Runtime has no autograd, and torch.onnx cannot export ``torch.autograd.grad`` nor
``aten.convolution_backward``; so the image gradient is written out as the adjoint of the
VGG stack, layer by layer, with ordinary forward operators:

- a 3x3, stride-1, padding-1 convolution's input gradient is the convolution of the output
  gradient with the weights transposed (in/out channels swapped) and flipped in both
  spatial axes (the same as ConvTranspose, which measured slower in ONNX Runtime's CPU
  provider: bench/results/onnx-step-cpu-512.md);
- ReLU's gradient is a mask of where its output was positive;
- a 2x2 max pool's gradient goes back through the pool's own indices (max_unpool2d), never
  an equality mask: ties are common in ReLU outputs, and autograd gives the gradient to
  the first maximum only;
- a 2x2 average pool's adjoint spreads a quarter of each gradient over its window (a zero
  row/column where the floor dropped one);
- the input normalisation's adjoint is a division by the std.

The losses' gradients are the explicit ones of engine/losses.py, with the size-dependent
coefficients computed in the graph from the dynamic shape, in float64 (C^2 M^2 of
``--gram-norm raw`` overflows int64 at large sizes) and cast to float32 where they meet the
features, as the engine's Python-float coefficients are.

Shapes: one image, (1, 3, H, W), H and W dynamic; every tensor float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nst.engine.features import VGGFeatures
from nst.engine.layers import deepest, layer_by_name
from nst.engine.losses import (content_coef, content_grad, content_value, gram_backward, style_coef, style_grad_raw,
                               style_value_raw, tv_grad, tv_value)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the engine uses
ADAM_EPS = 1e-8


def avg_pool_adjoint(g: torch.Tensor, size) -> torch.Tensor:
    """The adjoint of a 2x2, stride-2 average pool: each output's gradient spread as a
    quarter over its window. g: (N, C, h, w) -> (N, C, H, W) with ``size`` = (H, W); the
    last row / column is zero where H or W is odd (the floor dropped it)."""
    up = F.interpolate(g * 0.25, scale_factor=2.0, mode="nearest")  # (N, C, 2h, 2w)
    return F.pad(up, (0, size[1] - up.shape[-1], 0, size[0] - up.shape[-2]))


class VGGAdjoint(nn.Module):
    """The VGG stack of an extractor cut after the deepest of ``layers``: ``run`` gives those
    layers' features and what the adjoint needs; ``adjoint`` maps per-layer feature
    gradients to the image gradient."""

    def __init__(self, extractor: VGGFeatures, layers: tuple[str, ...]):
        super().__init__()
        missing = [n for n in layers if n not in extractor.taps]
        if missing:
            raise ValueError(f"layer {missing[0]} is not a tap of the extractor ({', '.join(extractor.taps)})")
        table = layer_by_name(extractor.network)
        names = list(extractor.body._modules)
        self.names = tuple(names[: names.index(deepest(layers, extractor.network).name) + 1])
        self.kinds = tuple(table[n].kind for n in self.names)
        self.layers = tuple(layers)
        self.pool = extractor.pool
        # float32, NCHW weights whatever the extractor was converted to
        self.convs = nn.ModuleDict({n: copy.deepcopy(extractor.body[i]).float().to(memory_format=torch.contiguous_format)
                                    for i, n in enumerate(self.names) if self.kinds[i] == "conv"})
        self.register_buffer("mean", extractor.mean.detach().float().clone())
        self.register_buffer("std", extractor.std.detach().float().clone())
        self.requires_grad_(False)
        self.eval()

    def run(self, x: torch.Tensor, keep: bool = True):
        """x (1, 3, H, W) in [0, 1] -> ({layer: features}, saved); ``saved`` holds, per
        layer, what its adjoint reads (ReLU masks, pooling indices and input sizes)."""
        h = (x - self.mean) / self.std
        feats, saved = {}, []
        for name, kind in zip(self.names, self.kinds):
            if kind == "conv":
                h = self.convs[name](h)
                saved.append(None)
            elif kind == "relu":
                h = F.relu(h)
                saved.append(h > 0 if keep else None)  # bool, h's shape
            elif self.pool == "max":
                size = (h.shape[-2], h.shape[-1])
                h, idx = F.max_pool2d(h, 2, 2, return_indices=True)  # idx: (1, C, H/2, W/2) per-plane
                saved.append((idx, size))
            else:
                saved.append((None, (h.shape[-2], h.shape[-1])))
                h = F.avg_pool2d(h, 2, 2)
            if name in self.layers:
                feats[name] = h
        return feats, saved

    def adjoint(self, grads: dict, saved) -> torch.Tensor:
        """Per-layer feature gradients -> the gradient of the image in [0, 1], (1, 3, H, W)."""
        g = None
        for i in reversed(range(len(self.names))):
            name, kind = self.names[i], self.kinds[i]
            if name in grads:
                g = grads[name] if g is None else g + grads[name]
            if g is None:
                continue
            if kind == "conv":
                w = self.convs[name].weight  # (out, in, 3, 3)
                g = F.conv2d(g, w.flip(2, 3).transpose(0, 1), padding=1)
            elif kind == "relu":
                g = g * saved[i]
            elif self.pool == "max":
                idx, size = saved[i]
                g = F.max_unpool2d(g, idx, 2, 2, output_size=size)
            else:
                g = avg_pool_adjoint(g, saved[i][1])
        return g / self.std


def positions(f: torch.Tensor) -> torch.Tensor:
    """M = H * W of a feature map (1, C, H, W) as a float64 0-d tensor: exact, where the
    int64 product C^2 M^2 of the size factors would overflow at large sizes."""
    return torch.ones((), dtype=torch.float64) * f.shape[-2] * f.shape[-1]


def gram_raw(f: torch.Tensor) -> torch.Tensor:
    """G = F F^T (C, C) of one image's features (1, C, H, W), float32. (The engine's
    gram_raw goes through its own operator, nst::gram_mc, which has no ONNX translation.)"""
    t = f.reshape(f.shape[1], -1)  # (C, M)
    return t @ t.t()


class ObjectiveGraph(nn.Module):
    """image, targets, layer and loss weights -> ((4,) losses [total, content, style, tv],
    the image gradient d total / d image (1, 3, H, W)).

    Baked in: the network and its weights, pooling, which layers are content and style
    layers, ``content_norm`` and ``gram_norm``. Inputs: the image, one content target per
    content layer (1, C, h, w), one Gram per style layer (1, C, C) normalised by C*M as
    engine/losses.py's gram, the layer weights (one per content / style layer) and the
    three loss weights [content, style, tv]."""

    def __init__(self, extractor: VGGFeatures, content_layers, style_layers, content_norm: str = "mean",
                 gram_norm: str = "chw"):
        super().__init__()
        self.content_layers, self.style_layers = tuple(content_layers), tuple(style_layers)
        self.content_norm, self.gram_norm = content_norm, gram_norm
        self.net = VGGAdjoint(extractor, tuple(dict.fromkeys(self.content_layers + self.style_layers)))

    def evaluate(self, image, contents, grams, content_layer_weights, style_layer_weights, loss_weights):
        feats, saved = self.net.run(image)
        lw = loss_weights.double()  # (3,) [content, style, tv]
        cw, sw = content_layer_weights.double(), style_layer_weights.double()  # (Lc,), (Ls,)
        grads: dict = {}
        c_sum = image.new_zeros(())
        for i, (name, target) in enumerate(zip(self.content_layers, contents)):
            f = feats[name]  # (1, C, h, w)
            k = content_coef(self.content_norm, cw[i], f.shape[1], positions(f))  # float64
            c_sum = c_sum + k.float() * content_value(f, target)
            _add(grads, name, content_grad(f, target, lw[0] * k))
        s_sum = image.new_zeros(())
        for i, (name, target) in enumerate(zip(self.style_layers, grams)):
            f = feats[name]
            c, m = f.shape[1], positions(f)
            k = style_coef(self.gram_norm, sw[i], c, m)
            g = gram_raw(f)  # (C, C)
            s_sum = s_sum + k.float() * style_value_raw(g, target, c, m)
            _add(grads, name, gram_backward(f, style_grad_raw(g, target, c, m, lw[1] * k)))
        tv = tv_value(image)
        lwf = loss_weights
        total = lwf[0] * c_sum + lwf[1] * s_sum + lwf[2] * tv
        grad = self.net.adjoint(grads, saved) + lwf[2] * tv_grad(image)
        return torch.stack([total, c_sum, s_sum, tv]), grad

    def forward(self, image, contents, grams, content_layer_weights, style_layer_weights, loss_weights):
        return self.evaluate(image, contents, grams, content_layer_weights, style_layer_weights, loss_weights)


def _add(grads: dict, name: str, g: torch.Tensor) -> None:
    grads[name] = g if name not in grads else grads[name] + g


class StepGraph(nn.Module):
    """One Adam step, as torch.optim.Adam's single-tensor step (betas 0.9/0.999, eps 1e-8,
    no weight decay) followed by the engine's clamp to [0, 1].

    In: image, exp_avg, exp_avg_sq (1, 3, H, W), step () the steps taken so far, lr (),
    then the objective's targets and weights. Out: the next image, moments and step count,
    and the (4,) losses of the image given (before the update)."""

    def __init__(self, objective: ObjectiveGraph):
        super().__init__()
        self.objective = objective

    def forward(self, image, exp_avg, exp_avg_sq, step, lr, contents, grams, content_layer_weights,
                style_layer_weights, loss_weights):
        losses, grad = self.objective.evaluate(image, contents, grams, content_layer_weights, style_layer_weights,
                                               loss_weights)
        b1, b2 = ADAM_BETAS
        step = step + 1.0
        m = exp_avg + (grad - exp_avg) * (1.0 - b1)  # lerp(exp_avg, grad, 1 - b1) as torch computes it
        v = exp_avg_sq * b2 + (1.0 - b2) * grad * grad
        # torch computes the bias corrections on the host, in double
        s = step.double()
        step_size = (lr.double() / (1.0 - b1 ** s)).float()
        bc2_sqrt = (1.0 - b2 ** s).sqrt().float()
        denom = v.sqrt() / bc2_sqrt + ADAM_EPS
        x = (image - step_size * (m / denom)).clamp(0.0, 1.0)
        return x, m, v, step, losses


class TargetsGraph(nn.Module):
    """image (1, 3, H, W) -> (content features per content layer (1, C, h, w), the
    normalised Gram per style layer (1, C, C)). Run it on the content image for the
    content targets and on each style image for its Grams; several styles blend on the
    host as sum_k (w_k / sum w) G_k, as engine/targets.py does."""

    def __init__(self, extractor: VGGFeatures, content_layers, style_layers):
        super().__init__()
        self.content_layers, self.style_layers = tuple(content_layers), tuple(style_layers)
        self.net = VGGAdjoint(extractor, tuple(dict.fromkeys(self.content_layers + self.style_layers)))

    def forward(self, image):
        feats, _ = self.net.run(image, keep=False)
        contents = tuple(feats[n] for n in self.content_layers)
        grams = []
        for n in self.style_layers:
            f = feats[n]
            cm = (positions(f) * f.shape[1]).float()
            grams.append((gram_raw(f) / cm).unsqueeze(0))  # (1, C, C)
        return contents, tuple(grams)
