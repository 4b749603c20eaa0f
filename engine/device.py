"""The device: which one ``auto`` means, and waiting for it before reading a host clock."""

from __future__ import annotations

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


def sync(device: torch.device | str) -> None:
    """Wait for the device (a no-op on the CPU): before reading a host clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
