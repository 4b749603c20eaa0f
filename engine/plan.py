"""The plan of a render's steps, decided once: ``resolve_plan`` is the entry point.

From the settings, the machine and the memory estimate (engine/memory.py), one function
decides everything about how the steps run: device, precision, memory format, CUDA graph,
compile, fast or reference path, activation checkpointing, exact tiles, and how many ranks
share the tiles. Everything after it only reads the ``StepPlan``.

Called with the settings alone it resolves the machine's part (device, precision, layout,
graph, compile), for callers that need no size (the command line's device, the benchmarks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .device import resolve_device
from .errors import InputError
from .memory import MemoryEstimate, estimate_memory, estimate_tiled_bytes, tile_work
from .settings import StylizeSettings
from .tiling import rank_tile, tiles_for


@dataclass(frozen=True)
class StepPlan:
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "tf32" | "bf16" | "fp16"
    channels_last: bool
    cuda_graph: bool
    path: str  # "fast" | "reference" | "onnxruntime"
    compile: bool = False  # the objective under torch.compile (engine/objective.py)
    memory: MemoryEstimate | None = None  # None: no size given, the machine's part only
    world: int = 1  # ranks that share every step's tiles (--distributed)
    # Which step runs (engine/variants.py): eager | graph | compiled | kernels; "auto" until
    # prepare has chosen it by measurement (a GPU with no cached choice; engine/session.py).
    variant: str = "eager"

    @property
    def tile(self) -> int | None:
        """Exact tiled steps with tiles of this many px (engine/tiles.py), or None."""
        return self.memory.tile if self.memory is not None else None

    @property
    def checkpoint(self) -> bool:
        """Activation checkpointing over the VGG blocks."""
        return bool(self.memory and self.memory.checkpoint)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def float32_math(self) -> str | None:
        """How float32 convolutions and matmuls run on CUDA (engine/device.py): TF32 only
        when asked for; IEEE otherwise, so "fp32" is float32 and the float32 Grams and
        targets of the bf16/fp16 paths are too. None on the CPU (nothing to set)."""
        if self.device != "cuda":
            return None
        return "tf32" if self.precision == "tf32" else "ieee"

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element of the convolutions (for the memory estimate)."""
        return 2 if self.precision in ("bf16", "fp16") else 4


def _machine(settings: StylizeSettings) -> StepPlan:
    """Device, precision, layout and the step variant (graph, compile), from the settings and the machine."""
    if settings.runtime == "onnxruntime":
        # ONNX Runtime's CPU provider runs the export's step graphs: float32, NCHW (engine/onnx_runtime.py).
        return StepPlan("cpu", "fp32", False, False, "onnxruntime")
    device = resolve_device(settings.device).type
    if settings.reference:
        return StepPlan(device, "fp32", False, False, "reference")
    # auto: channels-last everywhere; it measured faster on the CPU and on CUDA
    # (bench/results/ has the numbers).
    channels_last = settings.memory_format in ("auto", "channels_last")
    prec = settings.precision
    if device == "cpu":
        if prec in ("bf16", "fp16", "tf32"):
            raise InputError(f"--precision {prec} needs a CUDA GPU; on the CPU the engine runs float32")
        return with_variant(StepPlan("cpu", "fp32", channels_last, False, "fast"), _cpu_variant(settings))
    bf16_ok = torch.cuda.is_bf16_supported()
    if prec == "auto":
        prec = "bf16" if bf16_ok else "fp32"
    if prec == "bf16" and not bf16_ok:
        raise InputError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return with_variant(StepPlan("cuda", prec, channels_last, False, "fast"), _cuda_variant(settings),
                        settings.cuda_graph and settings.optimizer == "adam")


def _cpu_variant(settings: StylizeSettings) -> str:
    v = settings.step_variant
    if v == "auto" and settings.compile:
        v = "compiled"  # --compile names compiled; with kernels (which compiles too), as on CUDA
    if v in ("graph", "kernels"):
        raise InputError(f"--step-variant {v} needs a CUDA GPU (CUDA graphs, Triton kernels); the CPU runs eager "
                         "or compiled")
    return "eager" if v == "auto" else v  # the CPU default: what measured fastest there


def _cuda_variant(settings: StylizeSettings) -> str:
    if settings.step_variant != "auto":
        return settings.step_variant
    if settings.compile:
        return "compiled"
    if settings.optimizer != "adam" or not settings.cuda_graph:
        return "eager"  # L-BFGS is not captured; without a graph the candidates are not what the trial compares
    return "auto"  # chosen by measurement (engine/variants.py, in engine/session.py)


def with_variant(plan: StepPlan, variant: str, graph: bool = True) -> StepPlan:
    """``plan`` running ``variant``: compile for compiled and kernels, a CUDA graph for every
    variant but eager (on CUDA, with Adam, unless ``graph`` is off)."""
    compile = variant in ("compiled", "kernels")
    captured = plan.device == "cuda" and graph and variant in ("graph", "compiled", "kernels", "auto")
    return dataclasses.replace(plan, variant=variant, compile=compile, cuda_graph=captured)


def resolve_plan(settings: StylizeSettings, out_hw: tuple[int, int] | None = None, style_hws=(),
                 can_checkpoint: bool = False, world: int = 1) -> StepPlan:
    """The plan of the steps at ``out_hw`` (H, W): the machine's part, then the memory
    estimate's choice (plain, checkpointed, tiled, or refused), tiles for every rank when
    ``world`` > 1, and what tiles imply. ``style_hws``: the style images' sizes (their
    features are computed once; one too large is refused). ``can_checkpoint``: whether the
    extractor can recompute its blocks (the eager one can; a TorchScript one cannot)."""
    plan = _machine(settings)
    if out_hw is None:
        return plan
    if settings.checkpointing == "on" and not can_checkpoint:
        raise InputError("--checkpointing on needs the eager extractor; a TorchScript extractor cannot recompute blocks")
    taps, network = settings.taps(), settings.network
    mem = estimate_memory(*out_hw, taps, network, plan.act_bytes, settings.pool, plan.device, settings.checkpointing,
                          settings.memory_limit, can_checkpoint, style_hws, tile=settings.tile)
    if world > 1:
        # Across ranks every step is tiled, into at least one tile per rank.
        tile = mem.tile or rank_tile(out_hw, world, taps, network)
        mem = dataclasses.replace(mem, tile=tile, checkpoint=False, tiled_bytes=estimate_tiled_bytes(
            *out_hw, tile, taps, network, plan.act_bytes, settings.pool),
            tile_work=tile_work(*out_hw, tile, taps, network))
    elif mem.tile and len(tiles_for(out_hw, mem.tile, taps, network)) == 1:
        mem = dataclasses.replace(mem, tile=None)  # one tile is the plain step with a second forward: run plain
    if mem.tile:
        # A tiled step loops over crops of several shapes in Python: no CUDA graph, no compile.
        plan = dataclasses.replace(plan, cuda_graph=False, compile=False, variant="eager")
    return dataclasses.replace(plan, memory=mem, world=world)
