"""Where one engine step spends its time, grouped by what it computes, with the achieved
FLOP/s of the compute groups.

Kernel names cannot say what a kernel computes: cuDNN's convolutions are implicit GEMMs
("gemm" in their names, like the Gram's), and a Triton kernel's name is whatever inductor
fused. So every kernel (CUDA) or operator's own time (CPU) is attributed to the operators
that launched it: the profiler links each kernel to the innermost CPU operator running at
its launch, and each operator to its parents (the autograd node of a backward, the
optimiser's step, the engine's ``nst::network`` / ``nst::losses`` ranges, the custom Gram
operator). ``attribute`` reads that chain.

The profiled step is the defaults' step run eagerly: kernels replayed from a CUDA graph
have no launching operator to attribute them to, so the graph is switched off here (the
replay runs the same kernels, minus the launch gaps; the waterfall has its time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from nst.engine.device import sync
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings

from . import flops as flops_mod
from .inputs import drawn_pair

GROUPS = ("convolution forward", "convolution input-gradient", "Gram and its backward", "pooling/activation",
          "losses", "optimizer", "copies", "other")
_COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")
_CONV_BACKWARD = ("aten::convolution_backward", "convolutionbackward", "aten::_slow_conv2d_backward",
                  "aten::cudnn_convolution_backward", "aten::mkldnn_convolution_backward")
_CONV = ("aten::convolution", "aten::_convolution", "aten::conv2d", "aten::cudnn_convolution",
         "aten::mkldnn_convolution", "aten::_slow_conv2d_forward")
_POOL_ACT = ("max_pool", "avg_pool", "relu", "threshold", "clamp_min")
_OPTIMIZER = ("optimizer.", "aten::_fused_adam", "aten::_foreach")


def attribute(chain: list[str]) -> str:
    """The group of a kernel or operator from its launch chain: ``chain[0]`` is the
    operator that launched it (or the operator itself, for CPU time), then its parents,
    innermost first. The first rule that matches wins."""
    names = [n.lower() for n in chain]
    leaf = names[0] if names else ""

    def within(keys):
        return any(any(n == k or n.startswith(k) or k in n for k in keys) for n in names)

    if any(n.startswith(_OPTIMIZER) for n in names) or leaf == "aten::clamp_":
        return "optimizer"  # Adam's step (torch records it as Optimizer.step#Adam.step) and the clamp after it
    if leaf in _COPIES:
        return "copies"  # casts and layout copies, wherever they happen
    if within(("nst::gram_mc", "nst_gram_mc")):
        return "Gram and its backward"
    if within(_CONV_BACKWARD):
        return "convolution input-gradient"  # the weights are frozen: the input's is the only one
    if within(_CONV):
        return "convolution forward"
    if any(k in n for n in names for k in _POOL_ACT):
        return "pooling/activation"
    if within(("nst::losses",)) or any(n.startswith("autograd::engine::evaluate_function") for n in names):
        # The backward of what is left is the losses' (and the input normalisation's, a
        # few elementwise ops on a 3-channel image).
        return "losses"
    return "other"


def _chain(ev) -> list[str]:
    out = [ev.name]
    while ev.cpu_parent is not None:
        ev = ev.cpu_parent
        out.append(ev.name)
    return out


def attribute_events(events, use_cuda: bool) -> tuple[dict, list]:
    """(microseconds per group, [(us, leaf name, group)]) over a profile's events: on CUDA
    each CPU operator's launched kernels, on the CPU each operator's self time."""
    groups = dict.fromkeys(GROUPS, 0.0)
    items = []
    for ev in events:
        if getattr(ev, "device_type", None) is not None and ev.device_type.name != "CPU":
            continue  # device-side copies of the kernels; counted through their launching ops
        if use_cuda:
            t = sum(k.duration for k in getattr(ev, "kernels", []))
            names = [k.name for k in getattr(ev, "kernels", [])]
        else:
            t, names = ev.self_cpu_time_total, [ev.name]
        if t <= 0:
            continue
        g = attribute(_chain(ev))
        groups[g] += t
        items.append((t, f"{names[0] if names else ev.name} <- {ev.name}" if use_cuda else ev.name, g))
    return groups, items


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


def record(step, device, n: int):
    """A profiler trace of ``n`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _silent_stderr(), profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    return prof


def profile_engine(size: int, device, eager_net, cfg, settings: StylizeSettings | None = None) -> dict:
    """Profile ``cfg.steps`` (2 to 5) steps of the engine's defaults at ``size`` px (CUDA
    graph off: see the module's note)."""
    content, style = drawn_pair(size)
    settings = settings or StylizeSettings(size=size, device=device.type, weights=cfg.weights)
    settings = dataclasses.replace(settings, cuda_graph=False)
    step = prepare(content, [(style, 1.0)], settings, extractor=eager_net).stepper.step
    for _ in range(cfg.warmup):
        step()
    sync(device)
    n = max(2, min(cfg.steps, 5))
    prof = record(step, device, n)
    groups, items = attribute_events(prof.events(), device.type == "cuda")
    return summary(size, n, device.type == "cuda", groups, items)


def summary(size: int, n: int, use_cuda: bool, groups: dict, items: list) -> dict:
    total = sum(groups.values()) or 1.0
    per_step = {k: v / 1e6 / n for k, v in groups.items()}  # seconds per step (profiler times are in us)
    by_name: dict[tuple[str, str], float] = {}
    for t, name, g in items:
        by_name[(name, g)] = by_name.get((name, g), 0.0) + t
    top = sorted(((t, name, g) for (name, g), t in by_name.items()), reverse=True)[:12]
    out = {"size": size, "steps_profiled": n, "graph": "off (eager launches, attributed to their operators)",
           "clock": "CUDA kernel time" if use_cuda else "CPU self time",
           "groups": {k: {"s_per_step": v, "share": groups[k] / total} for k, v in per_step.items()},
           "top_ops": [{"name": name[:100], "s_per_step": t / 1e6 / n, "share": t / total, "group": g}
                       for t, name, g in top]}
    conv_f = flops_mod.conv_forward_flops(size, size)
    for g, f in (("convolution forward", conv_f), ("convolution input-gradient", conv_f),
                 ("Gram and its backward", flops_mod.gram_flops(size, size))):
        if per_step[g] > 0:
            out["groups"][g]["flops_per_s"] = f / per_step[g]
    return out
