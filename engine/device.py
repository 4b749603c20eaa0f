"""The device: which one ``auto`` means, waiting for it before reading a clock, and how
float32 math runs on it (IEEE or TF32)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from .errors import InputError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when PyTorch sees a GPU, else cpu; ``cuda`` without one is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to PyTorch")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for reports and the step-variant cache's keys."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def same_device(here: torch.device, device: torch.device) -> bool:
    """Whether something ``here`` is already on ``device`` ("cuda" means any CUDA device)."""
    return here == device or (device.index is None and here.type == device.type)


def sync(device: torch.device | str) -> None:
    """Wait for the device (a no-op on the CPU): before reading a host clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def float32_math(mode: str | None):
    """Run float32 convolutions and matmuls on CUDA as IEEE float32 (``"ieee"``) or with
    TF32 tensor cores (``"tf32"``) inside the block, then restore the caller's settings;
    ``None`` leaves them alone (the CPU).

    PyTorch runs cuDNN convolutions in TF32 by default, so without this "fp32" would not
    be float32. Only the per-backend settings of torch >= 2.9 are used (cuDNN convolutions
    and cuBLAS matmuls, the two that govern this engine's kernels): mixing them with the
    legacy ``allow_tf32`` flags is an error in torch, so nothing here reads or writes those.
    """
    if mode is None:
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@contextlib.contextmanager
def cudnn_search(on: bool):
    """On CUDA (``on``), let cuDNN time its convolution algorithms for each new shape
    (``torch.backends.cudnn.benchmark``) inside the block, then restore the caller's setting:
    the first steps (the warm-up, before a CUDA graph captures the choice) search once per
    shape; later steps reuse the choice. Off the GPU, nothing."""
    if not on:
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def float32_math_now() -> dict[str, str]:
    """The float32 modes in force for cuDNN convolutions and cuBLAS matmuls (for reports)."""
    return {"cudnn_conv": torch.backends.cudnn.conv.fp32_precision,
            "cuda_matmul": torch.backends.cuda.matmul.fp32_precision}
