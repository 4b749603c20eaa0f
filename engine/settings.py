"""Settings of a render, in one typed dataclass; the ``nst stylize`` options are
generated from it (engine/config.py), so every default is written here and only here.

Defaults follow the best-known implementations: content at relu4_2 and style at
relu1_1..relu5_1 (Gatys et al. 2016), the PyTorch tutorial's loss normalisation and
weights (content 1, style 1e6; see engine/losses.py), and Adam on the pixels, which is
what fast implementations use instead of the paper's L-BFGS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import option
from .errors import InputError
from .features import POOLS
from .layers import NETWORKS
from .losses import CONTENT_NORMS, GRAM_NORMS

OPTIMIZERS = ("adam", "lbfgs")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LR = {"adam": 0.02, "lbfgs": 1.0}
LR_SCHEDULES = ("constant", "step", "cosine")
LR_UNITS = ("pixel", "imagenet")
# Mean of torchvision's ImageNet std (0.229, 0.224, 0.225): one step of size lr in
# normalised units moves a [0, 1] pixel by about lr * 0.226 (per channel within 1.3%).
IMAGENET_STD_MEAN = (0.229 + 0.224 + 0.225) / 3


@dataclass
class StylizeSettings:
    size: int = option(512, help="long edge of the output in px; the content's aspect ratio is kept")
    resize: str | None = option(None, help="exact output size, e.g. 911x512 (the content is stretched to it); "
                                "replaces --size", metavar="WxH")
    steps: int = option(500, help="optimisation steps")
    optimizer: str = option("adam", help="adam (fast) or lbfgs (the paper's choice)", choices=OPTIMIZERS)
    lr: float | None = option(None, help="learning rate (default: 0.02 for adam, 1.0 for lbfgs); pixels are in [0, 1]")
    lr_units: str = option("pixel", help="units of --lr: pixel ([0, 1] pixel values) or imagenet (ImageNet-"
                           "normalised values, as in loops that optimise the normalised tensor; x0.226)",
                           choices=LR_UNITS)
    lr_schedule: str = option("constant", help="learning rate over the steps (of each scale): constant; step "
                              "(x --lr-gamma every --lr-decay-every steps); cosine (down to 0)", choices=LR_SCHEDULES)
    lr_decay_every: int = option(100, help="steps between decays of the step schedule", metavar="N")
    lr_gamma: float = option(0.5, help="factor of each decay of the step schedule")
    lbfgs_history: int = option(100, help="L-BFGS history size")
    content_weight: float = option(1.0, help="weight of the content loss (mean squared feature error)")
    style_weight: float = option(1e6, help="weight of the style loss (mean squared Gram error, Gram / (C*H*W))")
    tv_weight: float = option(1.0, help="weight of the total-variation loss (mean squared neighbour difference)")
    content_layers: str = option("relu4_2", help="content layers, LAYER[:WEIGHT],...", metavar="LAYERS")
    style_layers: str = option(
        "relu1_1,relu2_1,relu3_1,relu4_1,relu5_1", help="style layers, LAYER[:WEIGHT],... (weights are summed)",
        metavar="LAYERS",
    )
    gram_norm: str = option("chw", help="style loss normalisation per layer: chw = mean sq. error of F F^T/(C*H*W); "
                            "hw = of F F^T/(H*W); 4n2m2 = sum sq. error of F F^T / (4 C^2 (H*W)^2); raw-chw = mean "
                            "sq. error of F F^T, / (C*H*W); raw = mean sq. error of F F^T", choices=GRAM_NORMS)
    content_norm: str = option("mean", help="content loss per layer: mean squared error, or half-sum = "
                               "1/2 sum of squared errors (Gatys et al.)", choices=CONTENT_NORMS)
    init: str = option("content", help="start image: content, noise, style, or an image file", metavar="INIT")
    pool: str = option("max", help="pooling in the network: max (torchvision) or avg (Gatys et al.)", choices=POOLS)
    style_scale: float = option(1.0, help="style images' long edge relative to the output's")
    original_colors: bool = option(False, help="keep the content's colours: transfer luminance only")
    seed: int = option(0, help="random seed (noise init); CPU runs are deterministic for a seed")
    device: str = option("auto", help="where to run: auto picks cuda when available", choices=DEVICES)
    precision: str = option(
        "auto", help="convolution precision: auto = bf16 on GPUs that support it, else fp32; fp16 uses loss "
        "scaling; CPU runs fp32", choices=PRECISIONS,
    )
    weights: str = option("imagenet", help="VGG weights: imagenet, random[:SEED], or a .pth/.safetensors file",
                          metavar="SPEC")
    network: str = option("vgg19", help="the VGG variant", choices=NETWORKS)
    extractor: str | None = option(None, help="run on an exported TorchScript extractor (an `nst export` directory) "
                                   "instead of building it from --weights", metavar="DIR")
    memory_format: str = option(
        "auto", help="fast path memory format (auto = channels_last, which measured faster on CUDA and "
        "on the CPU)", choices=("auto", "contiguous", "channels_last"),
    )
    reference: bool = option(False, help="force the plain float32 NCHW eager reference path (no fast path)")
    cuda_graph: bool = option(True, help="on CUDA with Adam, capture the whole step in a CUDA graph")
    loss_scale: float = option(1024.0, help="static loss scale for fp16 (gradients are unscaled before the update)")
    checkpointing: str = option(
        "auto", help="activation checkpointing over the VGG blocks: auto = only when the memory plan says a plain "
        "step would not fit", choices=("auto", "on", "off"),
    )
    memory_limit: float | None = option(None, help="plan for this many GiB instead of the memory found free",
                                        metavar="GIB")
    progress_every: int = option(25, help="steps between progress updates; the only host syncs in the loop")
    time_limit: float | None = option(None, help="stop after this many seconds and keep the best image so far",
                                      metavar="SECONDS")
    scales: str | None = option(None, help="multi-scale: 'auto' (from about 256 px up to --size by --scale-factor) "
                                "or long edges like 256,512,1024; --steps is per scale", metavar="SCALES")
    scale_factor: float = option(2**0.5, help="growth between automatic scales")
    time_budget: float | None = option(None, help="finish, image written, within this many seconds: calibrate the "
                                       "step time per scale, then plan the steps", metavar="SECONDS")

    def validate(self) -> None:
        if self.size < 1:
            raise InputError(f"--size must be positive, got {self.size}")
        if self.resize is not None:
            self.resize_hw()
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            v = getattr(self, name)
            if not (v >= 0 and v != float("inf")):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if not self.style_scale > 0:
            raise InputError(f"--style-scale must be positive, got {self.style_scale}")
        if self.lr_decay_every < 1:
            raise InputError(f"--lr-decay-every must be at least 1, got {self.lr_decay_every}")
        if not 0 < self.lr_gamma <= 1:
            raise InputError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.lr_units == "imagenet" and self.optimizer == "lbfgs":
            raise InputError("--lr-units imagenet is for Adam: L-BFGS's steps do not depend on the pixel units")
        if self.lbfgs_history < 1:
            raise InputError("--lbfgs-history must be at least 1")
        if self.progress_every < 1:
            raise InputError("--progress-every must be at least 1")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InputError("--time-budget must be positive")
        if not self.scale_factor > 1:
            raise InputError(f"--scale-factor must be above 1, got {self.scale_factor}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise InputError("--time-limit must be positive")
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise InputError("--memory-limit must be positive")
        if self.loss_scale <= 0:
            raise InputError("--loss-scale must be positive")

    def layer_weights(self) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
        """(content layers, style layers), each ((name, weight), ...) in depth order."""
        from .targets import parse_layer_weights

        return (parse_layer_weights(self.content_layers, self.network),
                parse_layer_weights(self.style_layers, self.network))

    def taps(self) -> tuple[str, ...]:
        """Every layer the losses read: the content layers first, then the style layers."""
        content, style = self.layer_weights()
        return tuple(dict.fromkeys(n for n, _ in content + style))

    @property
    def learning_rate(self) -> float:
        """The (initial) learning rate in [0, 1] pixel units."""
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        return lr * IMAGENET_STD_MEAN if self.lr_units == "imagenet" else lr

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based) under --lr-schedule."""
        lr = self.learning_rate
        if self.lr_schedule == "step":
            return lr * self.lr_gamma ** (step // self.lr_decay_every)
        if self.lr_schedule == "cosine":
            return lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return lr

    def resize_hw(self) -> tuple[int, int] | None:
        """--resize WxH as (H, W), or None."""
        if self.resize is None:
            return None
        w, sep, h = str(self.resize).lower().partition("x")
        try:
            if not sep:
                raise ValueError
            hw = (int(h), int(w))
        except ValueError:
            raise InputError(f"--resize {self.resize}: write WIDTHxHEIGHT in px, e.g. 911x512") from None
        if min(hw) < 1:
            raise InputError(f"--resize {self.resize}: both sides must be positive")
        return hw

    @property
    def long_edge(self) -> int:
        """The output's long edge: --resize's if given, else --size."""
        hw = self.resize_hw()
        return max(hw) if hw else self.size

    def output_hw(self, content_hw: tuple[int, int], long_edge: int | None = None) -> tuple[int, int]:
        """(H, W) of the output, or of a scale with that long edge (multi-scale): --resize's
        aspect ratio when given, else the content's."""
        from .imageio import fit_long_edge

        hw = self.resize_hw()
        edge = self.long_edge if long_edge is None else long_edge
        if hw is not None:
            return hw if edge == max(hw) else fit_long_edge(hw, edge)
        return fit_long_edge(content_hw, edge)


@dataclass(kw_only=True)
class StylizeJob(StylizeSettings):
    """A render from files: the settings above plus the paths (``nst stylize``)."""

    content: str = option(help="content image file", positional=True, metavar="CONTENT")
    style: list[str] | None = option(
        None, help="style image, optionally with a relative weight: --style a.jpg --style b.jpg:0.3 "
        "(repeat for several; weights are normalised)", action="append", metavar="STYLE[:WEIGHT]", required=True,
    )
    output: str = option(help="output image; the extension picks the format (.png .jpg .webp .tif)",
                         aliases=("-o",), metavar="OUT")
    save_every: int = option(0, help="also write the image every N steps, as OUT-stem_NNNNN.ext", metavar="N")
    gif: str | None = option(None, help="also write an animated GIF of the image forming (frames at most "
                             "512 px)", metavar="FILE.gif")
    gif_every: int = option(0, help="steps between GIF frames (0: about 50 frames per scale)", metavar="N")
    stats: str | None = option(None, help="write per-step statistics and timings as JSON to this file",
                               metavar="FILE")
    max_pixels: int = option(16384 * 16384, help="refuse input images with more pixels than this "
                             "(decompression bombs)")


@dataclass(kw_only=True)
class TargetsJob(StylizeSettings):
    """``nst targets``: content features, style Grams and start image for a C++ host."""

    content: str = option(help="content image file", positional=True, metavar="CONTENT")
    style: list[str] | None = option(
        None, help="style image, optionally with a relative weight (repeat for several)", action="append",
        metavar="STYLE[:WEIGHT]", required=True,
    )
    output: str = option(help="targets file to write (a TorchScript module of tensors, e.g. targets.pt)",
                         aliases=("-o",), metavar="OUT")
    max_pixels: int = option(16384 * 16384, help="refuse input images with more pixels than this")


# Settings that belong to the loop, not to the targets: `nst targets` does not offer them.
TARGETS_EXCLUDE = frozenset({
    "steps", "optimizer", "lbfgs_history", "device", "precision", "memory_format", "reference", "cuda_graph",
    "loss_scale", "progress_every", "time_limit", "original_colors", "weights", "network",
    # The C++ host runs a constant learning rate.
    "lr_schedule", "lr_decay_every", "lr_gamma",
})


@dataclass
class DemoSettings:
    """``nst demo``: a render of images the project draws itself, with no network."""

    out: str = option("nst-demo", help="directory for the demo's images", metavar="DIR")
    size: int = option(256, help="long edge of the output in px")
    steps: int = option(100, help="optimisation steps")
    weights: str = option("auto", help="auto: ImageNet weights if already cached, else seeded random weights; "
                          "or any --weights spec", metavar="SPEC")
    device: str = option("auto", help="where to run", choices=DEVICES)
    seed: int = option(0, help="seed for the drawn style image and random weights")
