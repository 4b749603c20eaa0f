"""Where one engine step spends its time: kernels (CUDA) or operators (CPU) by group,
with the achieved FLOP/s of the convolutions and the Gram matmuls."""

from __future__ import annotations

import contextlib
import os
import sys

from nst.engine.device import sync
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings

from . import flops as flops_mod
from .inputs import drawn_pair

GROUPS = ("convolution backward", "convolution forward", "Gram matmuls", "other")
# Checked in this order: cuDNN's convolution kernels are implicit GEMMs and carry "gemm"
# in their names (sm90_xmma_fprop_implicit_gemm_bf16..., ..._dgrad_implicit_gemm_...), so
# the convolution names must be matched before the matmul ones.
_CONV_BACKWARD = ("dgrad", "wgrad", "convolution_backward", "conv_backward", "convbackward")
_CONV_FORWARD = ("fprop", "convolve", "convolution", "conv2d", "mkldnn_conv", "cudnn_conv", "conv_")
_MATMUL = ("aten::mm", "aten::bmm", "aten::addmm", "gemm", "cutlass", "ampere_", "sm80_", "sm90_", "sm100_")


def kernel_group(name: str) -> str:
    """The group of a kernel or operator name (one of GROUPS)."""
    low = name.lower()
    if any(k in low for k in _CONV_BACKWARD) or ("backward" in low and "conv" in low):
        return "convolution backward"
    if any(k in low for k in _CONV_FORWARD):
        return "convolution forward"
    if any(k in low for k in _MATMUL):
        return "Gram matmuls"
    return "other"


@contextlib.contextmanager
def _silent_stderr():
    """The profiler's C++ library (kineto) writes start/stop notes and, on a machine without
    a GPU, an alarming "gpuGetDeviceCount failed" straight to file descriptor 2: hold them back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_engine(size: int, device, eager_net, cfg) -> dict:
    """Profile ``cfg.steps`` (2 to 5) steps of the engine's defaults at ``size`` px."""
    from torch.profiler import ProfilerActivity, profile

    content, style = drawn_pair(size)
    settings = StylizeSettings(size=size, device=device.type, weights=cfg.weights)
    step = prepare(content, [(style, 1.0)], settings, extractor=eager_net).stepper.step
    for _ in range(cfg.warmup):
        step()
    sync(device)
    use_cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    n = max(2, min(cfg.steps, 5))
    with _silent_stderr(), profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    groups = dict.fromkeys(GROUPS, 0.0)
    ops = []
    for ev in prof.key_averages():
        t = (getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)) if use_cuda \
            else ev.self_cpu_time_total
        if t > 0:
            g = kernel_group(ev.key)
            groups[g] += t
            ops.append((t, ev.key, g))
    return _summary(size, n, use_cuda, groups, ops)


def _summary(size: int, n: int, use_cuda: bool, groups: dict, ops: list) -> dict:
    total = sum(groups.values()) or 1.0
    per_step = {k: v / 1e6 / n for k, v in groups.items()}  # seconds per step (profiler times are in us)
    out = {"size": size, "steps_profiled": n, "clock": "CUDA kernel time" if use_cuda else "CPU self time",
           "groups": {k: {"s_per_step": v, "share": groups[k] / total} for k, v in per_step.items()},
           "top_ops": [{"name": name[:80], "s_per_step": t / 1e6 / n, "share": t / total, "group": g}
                       for t, name, g in sorted(ops, reverse=True)[:12]]}
    conv_f = flops_mod.conv_forward_flops(size, size)
    gram_f = flops_mod.gram_flops(size, size)
    for g, f in (("convolution forward", conv_f), ("convolution backward", conv_f), ("Gram matmuls", gram_f)):
        if per_step[g] > 0:
            out["groups"][g]["flops_per_s"] = f / per_step[g]
    return out
