"""The VGG feature extractor: RGB in [0, 1] -> a tuple of feature maps at named taps.

This module is the numerical heart shared by the engine and the export step: the engine
differentiates through it, and ``export/`` traces exactly this module.

Contract (also written into every export manifest):
- input: NCHW, 3 channels (RGB), values in [0, 1], any floating dtype (cast inside to the
  module's compute dtype); H and W at least ``min_side``;
- ImageNet mean/std normalisation happens inside, so no caller can forget it;
- output: a tuple with one tensor per tap, in network depth order (``self.taps``).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import torch
from torch import nn

from .device import same_device
from .errors import InputError
from .layers import (DEFAULT_TAPS, IMAGENET_MEAN, IMAGENET_STD, POOLS, deepest, layer_by_name, layers_upto, min_side,
                     parse_taps)
from .weights import Weights, resolve_weights


class VGGFeatures(nn.Module):
    """A frozen VGG feature stack cut after its deepest tap.

    Args:
        weights: checked weights from :func:`engine.weights.resolve_weights`.
        taps: layer names to return (``relu4_2``, ``conv1_1``, ``pool3``...); returned in
            network depth order whatever order they are given in.
        pool: ``"max"`` (torchvision's network) or ``"avg"`` (Gatys et al. found average
            pooling gives smoother results; the weights are the same).
    """

    can_checkpoint = True  # the engine may recompute its blocks in the backward (engine/memory.py)

    def __init__(self, weights: Weights, taps=DEFAULT_TAPS, pool: str = "max"):
        super().__init__()
        if pool not in POOLS:
            raise InputError(f"unknown pooling {pool!r}; choose max or avg")
        network = weights.network
        self.network = network
        self.taps: tuple[str, ...] = parse_taps(taps, network)
        self.pool = pool
        self.min_side = min_side(self.taps, network)
        self.weights_info = weights.info()

        table = layer_by_name(network)
        self.cut_after = deepest(self.taps, network).name
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for layer in layers_upto(self.taps, network):
            if layer.kind == "conv":
                conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
                with torch.no_grad():
                    conv.weight.copy_(weights.state[f"{layer.index}.weight"])
                    conv.bias.copy_(weights.state[f"{layer.index}.bias"])
                layers[layer.name] = conv
            elif layer.kind == "relu":
                # In place (saves one activation-sized allocation per layer, which costs page
                # faults on the CPU), except after a conv that is itself a tap: that tap
                # must keep its pre-activation values. Autograd allows it: a conv's backward
                # does not need its output.
                conv_name = "conv" + layer.name[4:]
                layers[layer.name] = nn.ReLU(inplace=conv_name not in self.taps)
            else:
                layers[layer.name] = nn.MaxPool2d(2, 2) if pool == "max" else nn.AvgPool2d(2, 2)
        self.body = nn.Sequential(layers)
        tap_set = set(self.taps)
        # Position in self.body after which each tap is read, in output order.
        self._tap_positions = tuple(i for i, name in enumerate(layers) if name in tap_set)
        self.tap_channels = tuple(table[t].out_channels for t in self.taps)
        self.tap_strides = tuple(table[t].stride for t in self.taps)

        # VGG blocks as (first, last) positions in self.body, for activation checkpointing.
        blocks: dict[int, list[int]] = {}
        for i, name in enumerate(layers):
            blocks.setdefault(table[name].block, []).append(i)
        self._blocks = tuple((b[0], b[-1]) for b in blocks.values())
        self.checkpoint = False  # set by the memory plan: recompute each block in the backward

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.channels_last = False
        # Frozen once, here: the engine only ever needs gradients of the input.
        self.requires_grad_(False)
        self.eval()

    # -- configuration -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def to_format(self, dtype: torch.dtype | None = None, channels_last: bool | None = None) -> "VGGFeatures":
        """Set the compute dtype and memory format in place (returns self)."""
        if dtype is not None:
            self.to(dtype)
        if channels_last is not None:
            self.channels_last = bool(channels_last)
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the convolutions' weights (the normalisation stays in ``dtype``)."""
        return self.body[0].weight.dtype

    def placed(self, device: torch.device | str, channels_last: bool, checkpoint: bool = False,
               owned: bool = False, weights_dtype: torch.dtype | None = None) -> "VGGFeatures":
        """This network on ``device`` in the given layout: ``self`` when nothing would change,
        else a copy (or ``self`` converted, when ``owned``: the engine's own copy already).
        The engine never moves, casts or flags a module a caller handed it.

        ``weights_dtype`` (bf16/fp16 under autocast): the convolutions' weights and biases
        cast once, here. Autocast would cast them at every call otherwise: it caches casts
        only of tensors that require grad, which frozen weights do not (issue #24: 78 MB cast
        per step). The results are the same: autocast's cast is the same rounding."""
        device = torch.device(device)
        wdt = weights_dtype or self.weights_dtype
        if (same_device(self.mean.device, device) and self.channels_last == channels_last
                and self.checkpoint == checkpoint and self.weights_dtype == wdt):
            return self
        net = self if owned else copy.deepcopy(self)
        net.to(device)
        net.to_format(channels_last=channels_last)
        for m in net.body:
            if isinstance(m, nn.Conv2d):
                m.to(wdt)  # the convolutions only: the input's normalisation stays in float32
        net.checkpoint = checkpoint
        return net

    def train(self, mode: bool = True):
        # Always in eval mode: there is nothing to train, and exporters warn otherwise.
        return super().train(False)

    # -- checks ----------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputError with a clear message if ``x`` cannot go through the network."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"expected an NCHW RGB batch of shape (N, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image in [0, 1], got dtype {x.dtype}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side:
            raise InputError(
                f"image of {w}x{h} px is too small for tap {self.cut_after}: height and width "
                f"must be at least {self.min_side} px"
            )

    def weights_sha256(self) -> str:
        """SHA-256 over the parameters this extractor uses (name, shape, float32 bytes).

        Identifies the network independently of the file it came from, so a .pth and a
        .safetensors file with the same tensors give the same hash.
        """
        h = hashlib.sha256()
        for name, p in self.body.state_dict().items():
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "network": self.network,
            "taps": list(self.taps),
            "tap_channels": list(self.tap_channels),
            "tap_strides": list(self.tap_strides),
            "cut_after": self.cut_after,
            "pool": self.pool,
            "min_side": self.min_side,
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory_format": "channels_last" if self.channels_last else "contiguous",
        }

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (N, 3, H, W), RGB in [0, 1]
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
            self.check_input(x)  # shape checks would be baked into a trace: eager only
        x = x.to(self.mean.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x - self.mean) / self.std
        if self.checkpoint and torch.is_grad_enabled() and not torch.jit.is_tracing():
            return self._forward_checkpointed(x)
        return self._run_block(x, 0, len(self.body) - 1)[1:]

    def _run_block(self, x: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, ...]:
        """Layers first..last of self.body: (output, *taps read on the way)."""
        taps = []  # each (N, C_tap, H / stride, W / stride)
        for i in range(first, last + 1):
            x = self.body[i](x)
            if i in self._tap_positions:
                taps.append(x)
        return (x, *taps)

    def _forward_checkpointed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Same outputs; only block inputs and taps are kept, the rest is recomputed in backward."""
        from torch.utils.checkpoint import checkpoint

        outs: list[torch.Tensor] = []
        for first, last in self._blocks:
            res = checkpoint(self._run_block, x, first, last, use_reentrant=False)
            x = res[0]
            outs.extend(res[1:])
        return tuple(outs)


def build_extractor(
    weights: str | Weights = "imagenet",
    taps=DEFAULT_TAPS,
    pool: str = "max",
    network: str = "vgg19",
) -> VGGFeatures:
    """Resolve ``weights`` (a spec or a Weights) and build the eager extractor."""
    tap_names = parse_taps(taps, network)
    if not isinstance(weights, Weights):
        weights = resolve_weights(weights, network, upto=deepest(tap_names, network).name)
    return VGGFeatures(weights, tap_names, pool)
