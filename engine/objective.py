"""The objective: the function of the image a render minimises, behind one small protocol.

    losses(x)                      -> (4,) float32 [total, content, style, tv], no gradient
    losses_and_grad(x, grad_scale) -> the same, with grad_scale * d total / dx left in x.grad

Every evaluator implements it: ``WholeImage`` here (autograd through the network: the
reference, fast and compiled paths), the tiled objectives of engine/tiles.py (explicit
loss gradients, autograd per crop) and the ONNX Runtime one (engine/onnx_runtime.py, a
hand-written adjoint). The steppers (engine/steppers.py) take any of them and read
nothing else of it. What all evaluators share is a ``Problem``: the network placed for
the plan, the targets, and the loss spec (engine/losses.py: the losses and their
gradients, written once).

The network runs under autocast when the plan asks for bf16/fp16; the Grams and losses
are float32 whatever the convolutions ran in (engine/losses.py). fp16's loss scale
(gradients of a scaled loss, unscaled before they are returned) is the objective's.

With ``--compile`` the whole-image function goes through torch.compile (static shapes):
the elementwise work around the convolutions (activations' backward, the losses, the
normalisation, casts) is fused by inductor, the convolutions and the Gram operator stay
library calls. The steppers call it exactly like the eager one, so the CUDA graph stepper
captures the compiled kernels (``mode="reduce-overhead"`` would not nest inside that
capture, so the mode is the default).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .device import sync
from .losses import LossSpec
from .plan import StepPlan
from .settings import StylizeSettings

if TYPE_CHECKING:  # targets.py computes tiled targets with engine/tiles.py, which builds on this module
    from .targets import Targets


class Objective(Protocol):
    math: str | None  # how float32 math runs on CUDA while it is evaluated (engine/device.py); None on the CPU

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float32 -> (4,) float32 [total, content, style, tv], without a gradient."""

    def losses_and_grad(self, x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        """The (4,) losses, detached, with ``grad_scale`` * d total / dx in ``x.grad`` (``x`` a
        leaf that requires grad, whose ``.grad`` is None or zero before the call)."""


def loss_spec(taps, targets: Targets, settings: StylizeSettings) -> LossSpec:
    """The loss spec of a render: the targets' layers as indices into the network's ``taps``."""
    taps = list(taps)
    return LossSpec(content=tuple((taps.index(n), w) for n, w in targets.content_layers),
                    style=tuple((taps.index(n), w) for n, w in targets.style_layers),
                    content_norm=settings.content_norm, gram_norm=settings.gram_norm,
                    content_weight=settings.content_weight, style_weight=settings.style_weight,
                    tv_weight=settings.tv_weight)


@dataclass(frozen=True)
class Problem:
    """What every evaluator of one render's objective shares."""

    net: torch.nn.Module  # placed for the plan (device, layout, checkpointing); frozen
    targets: Targets  # float32, on the plan's device
    spec: LossSpec
    autocast: torch.dtype | None  # the convolutions' dtype under autocast (None: float32)
    device_type: str
    math: str | None

    @classmethod
    def build(cls, net, targets: Targets, settings: StylizeSettings, plan: StepPlan) -> "Problem":
        return cls(net, targets, loss_spec(net.taps, targets, settings), plan.autocast_dtype, plan.device,
                   plan.float32_math)

    def features(self, x: torch.Tensor):
        """The network's taps of ``x`` (or of a crop of it: engine/tiles.py), under autocast
        where the plan asks for half precision. (Autocast's cast cache is off: it only ever
        holds leaves that require grad, which no frozen weight is.)"""
        if self.autocast is not None:
            with torch.autocast(self.device_type, dtype=self.autocast, cache_enabled=False):
                return self.net(x)
        return self.net(x)


class WholeImage:
    """The objective of the whole image, differentiated by autograd through the network."""

    def __init__(self, problem: Problem, compile: bool = False, loss_scale: float | None = None):
        self.problem = problem
        self.math = problem.math
        self.loss_scale = loss_scale  # fp16: the backward runs on the loss times this
        self.compiled = compile
        self.compile_s = 0.0  # compiled: the first call's seconds (the compile, and one step)
        self._run = _compiled(self._evaluate) if compile else self._evaluate

    def _range(self, name: str):
        """A named profiler range (bench/profile.py attributes kernels by them); host-side
        only, a few microseconds per step; not inside compiled code, which has its own."""
        return contextlib.nullcontext() if self.compiled else torch.autograd.profiler.record_function(name)

    def _evaluate(self, x: torch.Tensor) -> torch.Tensor:
        p = self.problem
        with self._range("nst::network"):
            feats = p.features(x)
        with self._range("nst::losses"):
            return p.spec.parts(x, feats, p.targets.content, p.targets.grams)  # (4,)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            # The compiled function as the steps call it (grad mode, an input that requires
            # grad): under no_grad it would compile once more, at the end of every render
            # and scale. Its backward is never run.
            with torch.enable_grad():
                return self._run(x.detach().clone().requires_grad_(True)).detach()
        with torch.no_grad():
            return self._run(x)

    def losses_and_grad(self, x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        first = self.compiled and not self.compile_s
        if first:
            sync(x.device)
            t0 = time.perf_counter()
        parts = self._run(x)
        scale = grad_scale * (self.loss_scale or 1.0)
        (parts[0] * scale if scale != 1.0 else parts[0]).backward()
        if self.loss_scale:
            x.grad.mul_(1.0 / self.loss_scale)  # unscaled before anyone reads it
        if first:
            sync(x.device)
            self.compile_s = time.perf_counter() - t0
        return parts.detach()


def _compiled(fn):
    """``fn`` under torch.compile with static shapes. Each size compiles once (a multi-scale
    render compiles once per scale), so the recompile limit is raised above dynamo's
    default of 8. Compiled code is cached on disk by inductor (its FX graph and autograd
    caches, on by default), so a second run at a size skips most of the compile."""
    import torch._dynamo  # imported here: dynamo is slow to import and only --compile needs it

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(fn, dynamic=False)
