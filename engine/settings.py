"""Settings of a render, in one typed, frozen dataclass; the ``nst stylize`` options are
generated from it (nst/flags.py), so every default is written here and only here, and
every value is checked here, when the settings are made.

Defaults follow the best-known implementations: content at relu4_2 and style at
relu1_1..relu5_1 (Gatys et al. 2016), the PyTorch tutorial's loss normalisation and
weights (content 1, style 1e6; see engine/losses.py), and Adam on the pixels, which is
what fast implementations use instead of the paper's L-BFGS.

This module imports nothing of the numerical core (no torch): the layer table and the
loss normalisations it checks against are plain Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .layers import IMAGENET_STD, NETWORKS, POOLS, deepest, min_side, parse_layer_weights
from .norms import CONTENT_NORMS, GRAM_NORMS
from .sizes import fit_long_edge, parse_wxh

OPTIMIZERS = ("adam", "lbfgs")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
DEFAULT_LR = {"adam": 0.02, "lbfgs": 1.0}
LR_SCHEDULES = ("constant", "step", "cosine")
LR_UNITS = ("pixel", "imagenet")
BUDGET_PLANS = ("adaptive", "equal")
RUNTIMES = ("torch", "onnxruntime")
# engine/variants.py: which step runs; auto = measured on a GPU (cached), eager on the CPU.
STEP_VARIANTS = ("auto", "eager", "graph", "compiled", "kernels")
# Mean of torchvision's ImageNet std: one step of size lr in normalised units moves a
# [0, 1] pixel by about lr * 0.226 (per channel within 1.3%).
IMAGENET_STD_MEAN = sum(IMAGENET_STD) / len(IMAGENET_STD)
AUTO_START = 256  # the default smallest automatic scale of --scales auto (long edge, px); bench/results/quality-*
MOVE_ON_RHO = 0.015  # the adaptive plan's rho (engine/adaptive.py); tuned in bench/results/quality-tuning-cpu-512.md
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
MAX_AUTO_SCALES = 24  # --scales auto: more means a scale factor or start that cannot be meant
MAX_LOSS_WEIGHT = 1e30  # a weight times a loss must stay far below float32's 3.4e38
MAX_SECONDS = 10**7  # --time-budget, --time-limit, --rank-timeout: about 116 days, more than any render is meant to run
MAX_FACTOR = 1e6  # --style-scale, --loss-scale, --scale-factor: beyond it a value cannot be meant (and overflows)
MAX_GIB = 2**20  # --memory-limit: a pebibyte
INIT_KEYWORDS = ("content", "noise", "style")  # --init; anything else names an image file


def option(default: Any = dataclasses.MISSING, *, help: str, **meta: Any) -> Any:
    """A dataclass field with its command-line metadata (nst/flags.py reads it).

    ``meta`` may hold ``choices``, ``metavar``, ``flag``, ``aliases``, ``positional``,
    ``nargs``, ``parse``, ``action`` (``"append"``), ``required``, ``cli`` (False: not an
    option), ``nested`` (a settings object whose fields become options) and
    ``loop_only`` (a setting of the optimisation loop, which ``nst targets`` does not
    offer). Mutable defaults go through default_factory.
    """
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class StylizeSettings:
    """Everything a render needs to know besides its images. A value: change it with
    ``dataclasses.replace``; every field is checked when it is made."""

    size: int = option(512, help="long edge of the output in px; the content's aspect ratio is kept")
    resize: str | None = option(None, help="exact output size, e.g. 911x512 (the content is stretched to it); "
                                "replaces --size", metavar="WxH")
    steps: int = option(500, help="optimisation steps", loop_only=True)
    optimizer: str = option("adam", help="adam (fast) or lbfgs (the paper's choice)", choices=OPTIMIZERS,
                            loop_only=True)
    lr: float | None = option(None, help="learning rate (default: 0.02 for adam, 1.0 for lbfgs); pixels are in [0, 1]")
    lr_units: str = option("pixel", help="units of --lr: pixel ([0, 1] pixel values) or imagenet (ImageNet-"
                           "normalised values, as in loops that optimise the normalised tensor; x0.226)",
                           choices=LR_UNITS)
    lr_schedule: str = option("constant", help="learning rate over the steps (of each scale): constant; step "
                              "(x --lr-gamma every --lr-decay-every steps); cosine (down to 0)", choices=LR_SCHEDULES,
                              loop_only=True)
    lr_decay_every: int = option(100, help="steps between decays of the step schedule", metavar="N", loop_only=True)
    lr_gamma: float = option(0.5, help="factor of each decay of the step schedule", loop_only=True)
    lbfgs_history: int = option(100, help="L-BFGS history size", loop_only=True)
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
    original_colors: bool = option(False, help="keep the content's colours: transfer luminance only", loop_only=True)
    seed: int = option(0, help="random seed (noise init); CPU runs are deterministic for a seed")
    device: str = option("auto", help="where to run: auto picks cuda when available", choices=DEVICES, loop_only=True)
    precision: str = option(
        "auto", help="convolution precision: auto = bf16 on GPUs that support it, else fp32; fp32 = IEEE float32 "
        "(TF32 off); tf32 = float32 on TF32 tensor cores (CUDA); fp16 uses loss scaling; the CPU runs fp32",
        choices=PRECISIONS, loop_only=True)
    weights: str = option("imagenet", help="VGG weights: imagenet, random[:SEED], or a .pth/.safetensors file",
                          metavar="SPEC", loop_only=True)
    network: str = option("vgg19", help="the VGG variant", choices=NETWORKS, loop_only=True)
    extractor: str | None = option(None, help="run on an exported TorchScript extractor (an `nst export` directory) "
                                   "instead of building it from --weights", metavar="DIR")
    memory_format: str = option(
        "auto", help="fast path memory format (auto = channels_last, which measured faster on CUDA and "
        "on the CPU)", choices=MEMORY_FORMATS, loop_only=True)
    reference: bool = option(False, help="force the plain float32 NCHW eager reference path (no fast path)",
                             loop_only=True)
    runtime: str = option("torch", help="what runs the steps: torch (the engine), or onnxruntime (the step graphs of "
                          "an `nst export` directory given with --extractor: ONNX Runtime on the CPU, float32, no "
                          "autograd)", choices=RUNTIMES, loop_only=True)
    step_variant: str = option(
        "auto", help="which step runs: eager; graph (the eager step captured in a CUDA graph); compiled (the objective "
        "under torch.compile, then captured); kernels (compiled, with the Triton kernels for the style taps and the "
        "image update). auto: on a GPU, each candidate is timed at the first render of a size bucket and the fastest "
        "that passes a parity check runs (the choice is cached, see --variant-cache; under --time-budget or "
        "--time-limit without a cached choice, compiled); on the CPU, eager (it measured fastest there). --compile is "
        "--step-variant compiled (kernels compiles too); --no-cuda-graph leaves the capture out of any variant; "
        "--reference runs the reference path instead",
        choices=STEP_VARIANTS, loop_only=True)
    variant_cache: str | None = option(None, help="the file that keeps the step variants chosen on this machine (default: "
                                       "$NST_CACHE_DIR, $XDG_CACHE_HOME/nst or ~/.cache/nst, step-variants.json)",
                                       metavar="FILE", loop_only=True)
    cuda_graph: bool = option(True, help="on CUDA with Adam, capture the whole step in a CUDA graph", loop_only=True)
    compile: bool = option(False, help="compile the objective (network, Grams, losses) with torch.compile, static "
                           "shapes, one compile per size (the same as --step-variant compiled); with --cuda-graph the "
                           "compiled step is then captured. The first run at a size compiles (seconds to a minute); "
                           "later runs reuse inductor's on-disk cache", loop_only=True)
    loss_scale: float = option(1024.0, help="static loss scale for fp16 (gradients are unscaled before the update)",
                               loop_only=True)
    tile: int | None = option(None, help="exact tiled steps: tile interiors of about PX (a multiple of 16), each "
                              "computed from a crop with its halo; loss and gradient equal the untiled ones; the memory "
                              "plan picks a tile itself when a step would not fit otherwise", metavar="PX",
                              loop_only=True)
    distributed: bool | None = option(None, help="split every step's tiles over the ranks of a torchrun launch "
                                      "(NCCL on GPUs, gloo on CPUs): torchrun --nproc-per-node N -m nst stylize ...; "
                                      "on by itself when torchrun starts more than one rank (--no-distributed is "
                                      "refused there); rank 0 writes the output", loop_only=True)
    rank_timeout: float = option(600.0, help="with --distributed: seconds a rank waits for the others before the "
                                 "run ends with an error (the lead keeps its best image so far)", metavar="SECONDS",
                                 loop_only=True)
    checkpointing: str = option(
        "auto", help="activation checkpointing over the VGG blocks: auto = only when the memory plan says a plain "
        "step would not fit", choices=("auto", "on", "off"), loop_only=True)
    memory_limit: float | None = option(None, help="plan for this many GiB instead of the memory found free",
                                        metavar="GIB", loop_only=True)
    progress_every: int = option(25, help="steps between progress updates; the only host syncs in the loop",
                                 loop_only=True)
    time_limit: float | None = option(None, help="stop after this many seconds and keep the best image so far",
                                      metavar="SECONDS", loop_only=True)
    scales: str | None = option(None, help="multi-scale: 'auto' (from about --scale-start px up to --size by --scale-factor) "
                                "or long edges like 256,512,1024; --steps is per scale", metavar="SCALES",
                                loop_only=True)
    scale_factor: float = option(2**0.5, help="growth between automatic scales", loop_only=True)
    scale_start: int = option(AUTO_START, help="long edge of the smallest automatic scale (about; --scales auto)",
                              metavar="PX", loop_only=True)
    time_budget: float | None = option(None, help="finish, image written, within this many seconds: calibrate the "
                                       "step time per scale, then plan the steps", metavar="SECONDS", loop_only=True)
    budget_plan: str = option("equal", help="how a --time-budget is spent over the scales: equal (half to the "
                              "final scale, the rest evenly) or adaptive (a coarse scale moves on when its loss stops "
                              "falling faster than the next scale is expected to; the final scale runs to the "
                              "deadline; not better on the CPU measured, bench/results/quality-cpu-512.md)",
                              choices=BUDGET_PLANS, loop_only=True)
    move_on: float = option(MOVE_ON_RHO, help="adaptive plan: the fraction of its loss the next scale is expected "
                            "to remove per step; a coarse scale moves on when its own fraction per step falls under "
                            "RHO / (the next scale's step time / this one's)", metavar="RHO", loop_only=True)

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_combinations()
        self.resize_hw()
        self.layer_weights()
        self.scale_sizes()
        self._check_tile()

    def _check_numbers(self) -> None:
        if self.size < 1:
            raise InputError(f"--size must be positive, got {self.size}")
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive finite number, got {self.lr}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            v = getattr(self, name)
            if not (0 <= v <= MAX_LOSS_WEIGHT):
                raise InputError(f"--{name.replace('_', '-')} must be a number from 0 to {MAX_LOSS_WEIGHT:g} (the "
                                 f"losses are float32, whose largest value is about 3.4e38), got {v}")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"--seed must be an integer from 0 to 2**63-1, got {self.seed}")
        bounded = {"time_budget": (self.time_budget, MAX_SECONDS, " s"),
                   "time_limit": (self.time_limit, MAX_SECONDS, " s"),
                   "rank_timeout": (self.rank_timeout, MAX_SECONDS, " s"),
                   "memory_limit": (self.memory_limit, MAX_GIB, " GiB"),
                   "style_scale": (self.style_scale, MAX_FACTOR, ""), "loss_scale": (self.loss_scale, MAX_FACTOR, "")}
        for name, (v, most, unit) in bounded.items():
            # Not `v <= 0`: NaN passes that; infinity would become a step count or a timeout.
            if v is not None and not 0 < v <= most:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number up to {most:g}{unit}, got {v}")
        if self.lr_decay_every < 1:
            raise InputError(f"--lr-decay-every must be at least 1, got {self.lr_decay_every}")
        if not 0 < self.lr_gamma <= 1:
            raise InputError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.tile is not None and self.tile < 1:
            raise InputError(f"--tile must be a positive number of pixels, got {self.tile}")
        if self.lbfgs_history < 1:
            raise InputError("--lbfgs-history must be at least 1")
        if self.progress_every < 1:
            raise InputError("--progress-every must be at least 1")
        if not 1 < self.scale_factor <= MAX_FACTOR:
            raise InputError(f"--scale-factor must be above 1 (and at most {MAX_FACTOR:g}), got {self.scale_factor}")
        if self.scale_start < 1:
            raise InputError(f"--scale-start must be positive, got {self.scale_start}")
        if not 0 < self.move_on < 1:
            raise InputError(f"--move-on is a fraction of the loss per step, in (0, 1); got {self.move_on}")

    def _check_tile(self) -> None:
        """Tile edges lie on the deepest tap's stride grid (engine/tiling.py): a --tile off
        that grid would be rounded, and run as another size than the one asked for."""
        if self.tile is None:
            return
        stride = deepest(self.taps(), self.network).stride
        if self.tile % stride:
            up = -(-self.tile // stride) * stride
            raise InputError(f"--tile {self.tile}: tiles lie on the {stride} px grid of the deepest layer used "
                             f"({deepest(self.taps(), self.network).name}); use a multiple of {stride}, such as {up}")

    def _check_combinations(self) -> None:
        self._check_runtime()
        self._check_variant()
        if self.lr_units == "imagenet" and self.optimizer == "lbfgs":
            raise InputError("--lr-units imagenet is for Adam: L-BFGS's steps do not depend on the pixel units")
        if self.reference and self.precision not in ("auto", "fp32"):
            raise InputError(f"--reference runs float32; it cannot be combined with --precision {self.precision}")
        if self.extractor is not None and self.weights != "imagenet":
            raise InputError("--extractor and --weights both choose the network (an export carries its own weights): "
                             "give one of them")
        # Tiled steps (--tile, and every step across ranks) loop over crops of several
        # shapes: nothing to compile, and tiles are the other way to save memory.
        tiled = "--tile" if self.tile is not None else ("--distributed (tiled steps)" if self.distributed else None)
        if tiled and self.compile:
            raise InputError(f"--compile does not apply to {tiled}: each crop has its own shape")
        if tiled and self.checkpointing == "on":
            raise InputError(f"{tiled} and --checkpointing on are two ways to save memory: choose one")
        if self.reference and self.compile:
            raise InputError("--reference runs the plain eager loop; it cannot be combined with --compile")
        if self.reference and self.memory_format == "channels_last":
            raise InputError("--reference runs NCHW; it cannot be combined with --memory-format channels_last")

    def _check_variant(self) -> None:
        """--step-variant against the flags that also say how the step runs: no contradictions."""
        v = self.step_variant
        if v == "auto":
            return
        if self.reference:
            raise InputError(f"--reference runs the plain eager reference path; it cannot be combined with --step-variant {v}")
        if self.compile and v in ("eager", "graph"):
            raise InputError(f"--compile is --step-variant compiled; it cannot be combined with --step-variant {v}")
        if not self.cuda_graph and v == "graph":
            raise InputError("--step-variant graph is the eager step captured in a CUDA graph; --no-cuda-graph "
                             "contradicts it (use --step-variant eager)")
        if self.optimizer == "lbfgs" and v in ("graph", "kernels"):
            raise InputError(f"--step-variant {v} is an Adam step; L-BFGS runs eager or compiled")
        tiled = self.tile is not None or self.distributed
        if tiled and v != "eager":
            raise InputError(f"tiled steps (--tile, --distributed) run eagerly; --step-variant {v} does not apply")

    def _check_runtime(self) -> None:
        if self.runtime != "onnxruntime":
            return
        if self.extractor is None:
            raise InputError("--runtime onnxruntime runs an export's step graphs: give the export directory with "
                             "--extractor DIR (nst export writes them)")
        asked = [flag for flag, on in (("--tile", self.tile is not None), ("--distributed", self.distributed),
                                       ("--compile", self.compile), ("--checkpointing on", self.checkpointing == "on"),
                                       (f"--step-variant {self.step_variant}", self.step_variant != "auto"),
                                       ("--device cuda", self.device == "cuda"),
                                       (f"--precision {self.precision}", self.precision not in ("auto", "fp32")),
                                       ("--memory-format channels_last", self.memory_format == "channels_last"))
                 if on]
        if asked:
            raise InputError(f"--runtime onnxruntime runs whole float32 steps on the CPU; it does not support "
                             f"{asked[0]} (yet): leave it out, or use --runtime torch")

    def layer_weights(self) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
        """(content layers, style layers), each ((name, weight), ...) in depth order."""
        return (parse_layer_weights(self.content_layers, self.network),
                parse_layer_weights(self.style_layers, self.network))

    def check_resumable(self) -> None:
        """A render with these settings can keep and resume a state (--state, --resume,
        engine/state.py): one of fixed steps."""
        if self.time_budget is not None:
            raise InputError("--state and --resume keep a render of fixed steps; a --time-budget render's schedule "
                             "is its budget's and cannot be resumed")

    def min_side(self) -> int:
        """The smallest image side (px) the network's deepest tap takes."""
        return min_side(self.taps(), self.network)

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
        return None if self.resize is None else parse_wxh(self.resize, "--resize")

    @property
    def long_edge(self) -> int:
        """The output's long edge: --resize's if given, else --size."""
        hw = self.resize_hw()
        return max(hw) if hw else self.size

    def output_hw(self, content_hw: tuple[int, int], long_edge: int | None = None) -> tuple[int, int]:
        """(H, W) of the output, or of a scale with that long edge (multi-scale): --resize's
        aspect ratio when given, else the content's."""
        hw = self.resize_hw()
        edge = self.long_edge if long_edge is None else long_edge
        if hw is not None:
            return hw if edge == max(hw) else fit_long_edge(hw, edge)
        return fit_long_edge(content_hw, edge)

    def scale_sizes(self) -> list[int]:
        """Long edges of the scales (--scales), smallest first; the last is always the output's."""
        size = self.long_edge
        spec = (self.scales or "").strip()
        if not spec:
            return [size]
        if spec == "auto":
            floor = self.min_side()
            if self.scale_start < floor:
                raise InputError(f"--scale-start {self.scale_start} is below the network's smallest input side "
                                 f"({floor} px for these layers)")
            start = min(self.scale_start, size)
            sizes = [size]
            s = size / self.scale_factor
            while s >= start * 0.95:  # allow a first scale slightly under the start rather than skip it
                sizes.append(round(s))
                s /= self.scale_factor
                if len(sizes) > MAX_AUTO_SCALES:
                    raise InputError(f"--scales auto would make more than {MAX_AUTO_SCALES} scales: raise "
                                     "--scale-factor or --scale-start")
            return sorted(set(sizes))
        try:
            sizes = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"bad --scales {spec!r}: write auto or a list of long edges like 256,512,1024") from None
        if not sizes or any(v < 1 for v in sizes) or sizes != sorted(set(sizes)):
            raise InputError(f"bad --scales {spec!r}: long edges must be positive and increasing")
        if sizes[-1] > size:
            raise InputError(f"--scales {spec}: the last scale ({sizes[-1]}) is larger than the output's long edge "
                             f"({size}, from --size or --resize)")
        return sizes if sizes[-1] == size else sizes + [size]

    def at_scale(self, content_hw: tuple[int, int], size: int, **changes) -> "StylizeSettings":
        """Settings of one scale: the output size pinned with --resize (the final output's
        aspect ratio at this long edge), no multi-scale of its own."""
        h, w = self.output_hw(content_hw, size)
        return dataclasses.replace(self, size=size, resize=f"{w}x{h}", scales=None, **changes)
