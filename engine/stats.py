"""What a render reports: per-step statistics (``RunStats``) and the ``Result``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class RunStats:
    """Per-step statistics of one render (lists are per step, in order)."""

    steps_planned: int
    steps_run: int = 0
    loss: list[float] = field(default_factory=list)
    content: list[float] = field(default_factory=list)
    style: list[float] = field(default_factory=list)
    tv: list[float] = field(default_factory=list)
    final_loss: float = float("nan")  # loss of the returned image
    image_from_step: int = 0  # how many steps had been applied to the returned image
    first_loss: float = float("nan")  # the loss of the scale's first evaluation (a resumed render's: from its state)
    resumed_from: int = 0  # steps done before this run (a resumed render's start; 0 otherwise)
    stopped: str | None = None  # None (all steps ran), "time-limit", "interrupted", "non-finite", "moved-on"
    stop_reason: str = ""  # "moved-on": why the adaptive budget plan ended this scale (engine/adaptive.py)
    setup_s: float = 0.0  # targets (and everything else before the first step)
    loop_s: float = 0.0  # wall time of the steps, synchronised
    capture_s: float = 0.0  # CUDA graph capture, included in loop_s
    compile_s: float = 0.0  # torch.compile: the first compiled call (the compile, and one step), included in loop_s
    step_variant: str = ""  # which step ran (engine/variants.py): eager, graph, compiled, kernels
    variant_choice: dict | None = None  # how it was chosen: the candidates' ms per step, the reason, cached or not
    steps_per_s: float = 0.0
    size: tuple[int, int] = (0, 0)
    device: str = ""
    precision: str = ""
    float32_math: str = ""  # CUDA: "ieee" or "tf32" for float32 convolutions and matmuls; "" on the CPU
    path: str = ""
    memory_format: str = ""
    cuda_graph: bool = False
    checkpointing: bool = False
    tile: int = 0  # exact tiled steps: the tile size in px (0: untiled)
    memory_estimate_bytes: int = 0
    scales: list = field(default_factory=list)  # multi-scale: per-scale plan and outcome
    total_s: float = 0.0  # from the start of the render (or of the budget's clock) to the result
    schedule_s: float = 0.0  # several scales or a budget: from that start to the schedule (loading, calibrating)
    optimizer: str = ""
    weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    image: torch.Tensor  # (3, H, W) float32 on the CPU, in [0, 1]
    stats: RunStats
    # What the render says about itself (engine/summary.py), set by the Python API: the
    # schedule of a budget or of several scales, planned against actual, and a diagnosis
    # of a render that never improved (None when it did).
    report: list[str] = field(default_factory=list)
    diagnosis: str | None = None
