"""The plan of a render: what the loop will actually run on this machine.

Resolved once from the settings and the machine: device, precision, memory format,
whether the Adam step is captured in a CUDA graph, whether the objective is compiled, and
which path (fast or reference; the reference is never compiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device import resolve_device
from .errors import InputError
from .settings import StylizeSettings


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "tf32" | "bf16" | "fp16"
    channels_last: bool
    cuda_graph: bool
    path: str  # "fast" | "reference"
    compile: bool = False  # the objective under torch.compile (engine/objective.py)

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
        """Bytes per activation element of the convolutions (for the memory plan)."""
        return 2 if self.precision in ("bf16", "fp16") else 4


def resolve_plan(settings: StylizeSettings) -> Plan:
    device = resolve_device(settings.device).type
    if settings.reference:
        return Plan(device, "fp32", False, False, "reference")
    # auto: channels-last everywhere; it measured faster on the CPU and on CUDA
    # (bench/results/ has the numbers).
    channels_last = settings.memory_format in ("auto", "channels_last")
    prec = settings.precision
    if device == "cpu":
        if prec in ("bf16", "fp16", "tf32"):
            raise InputError(f"--precision {prec} needs a CUDA GPU; on the CPU the engine runs float32")
        return Plan("cpu", "fp32", channels_last, False, "fast", settings.compile)
    bf16_ok = torch.cuda.is_bf16_supported()
    if prec == "auto":
        prec = "bf16" if bf16_ok else "fp32"
    if prec == "bf16" and not bf16_ok:
        raise InputError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    # A tiled step loops over crops of several shapes in Python: not one graph.
    graph = settings.cuda_graph and settings.optimizer == "adam" and settings.tile is None
    return Plan("cuda", prec, channels_last, graph, "fast", settings.compile)
