"""The steppers: one optimisation step per call, behind one small protocol.

- ``AdamStep``: eager Adam (the reference path uses torch's single-tensor Adam; the CPU
  fast path the multi-tensor one; CUDA the fused one);
- ``GraphAdamStep``: the same step captured in one CUDA graph and replayed (static
  shapes, buffers allocated once per size);
- ``LBFGSStep``: one L-BFGS iteration per call, its history carried between calls.

``make_stepper`` picks one for a plan. Each takes an objective through its protocol
(engine/objective.py: ``losses_and_grad``) and reads nothing else of it, so the whole-image,
tiled, ranked and ONNX Runtime objectives all step alike. Every step returns the (4,)
losses of the image it evaluated, as a device tensor: reading it is the caller's host
sync, not the stepper's.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import torch

from .device import cudnn_search, float32_math
from .errors import InputError
from .objective import Objective
from .plan import StepPlan
from .settings import StylizeSettings
from .signals import updating

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN autotune, Adam state)


class Stepper(Protocol):
    warmup_steps: int  # steps before the step time is steady (a graph: warm-up and capture)
    capture_s: float  # seconds spent capturing a CUDA graph (0 without one)

    def step(self) -> torch.Tensor:
        """One step; the (4,) losses [total, content, style, tv] of the image before it."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (no host sync)."""

    def state_dict(self) -> dict:
        """The optimiser's state (for --resume, engine/state.py)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() (before the first step)."""


class AdamStep:
    """Eager Adam step; the reference uses the textbook single-tensor Adam."""

    warmup_steps = 1
    capture_s = 0.0

    def __init__(self, objective: Objective, x: torch.Tensor, lr: float, plan: StepPlan, scheduled: bool = False):
        self.objective, self.x = objective, x
        self.on_cuda = plan.device == "cuda"
        if plan.path == "reference":
            kw = {"foreach": False}
        elif plan.device == "cuda":
            kw = {"fused": True, "capturable": plan.cuda_graph}
        else:
            kw = {"foreach": True}
        if plan.cuda_graph and scheduled:
            # A captured graph reads the learning rate from device memory: a tensor that
            # set_lr refills between replays (fused, capturable Adam accepts one).
            lr = torch.tensor(lr, dtype=torch.float32, device=x.device)
        self.opt = torch.optim.Adam([x], lr=lr, **kw)

    def set_lr(self, lr: float) -> None:
        group = self.opt.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a device-side fill: no host sync
        else:
            group["lr"] = lr

    def state_dict(self) -> dict:
        # Adam's moments and step count; the learning rate comes from the settings (and
        # the schedule at the resumed step), not from the file.
        return {"adam": self.opt.state_dict()["state"]}

    def load_state_dict(self, state: dict) -> None:
        if "adam" not in state:
            raise InputError("--resume: the state file was written by another optimizer (not Adam)")
        full = self.opt.state_dict()
        full["state"] = state["adam"]
        self.opt.load_state_dict(full)  # moved to the image's device and, fused/capturable, as Adam wants it
        for st in self.opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:  # in the image's memory layout (fused Adam wants them alike), whatever was saved
                    st[k] = torch.empty_like(self.x).copy_(st[k])

    def _body(self) -> torch.Tensor:
        parts = self.objective.losses_and_grad(self.x)  # x.grad: d total / dx
        updating()  # a stop signal now waits for the loop's step to end (engine/signals.py)
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)
        return parts

    def step(self) -> torch.Tensor:
        with float32_math(self.objective.math), cudnn_search(self.on_cuda):
            self.opt.zero_grad(set_to_none=True)
            return self._body()

    def restart(self, x0: torch.Tensor) -> None:
        """Start again from the image x0 with a fresh Adam state, keeping what was compiled
        and captured (the step-variant trial hands its winner to the render this way)."""
        with torch.no_grad():
            self.x.copy_(x0)
            for st in self.opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()  # exp_avg, exp_avg_sq and the step count, in place: a graph reads them


class Captured:
    """A step body run eagerly on a side stream for GRAPH_WARMUP_STEPS calls (cuDNN's
    algorithm search, compiles, optimiser state), then captured in one CUDA graph on the
    next call and replayed on every later one. Every call is one real optimisation step.
    ``before_capture()`` runs just before the capture (gradients set to None, so that the
    backward allocates them from the graph's pool)."""

    warmup_steps = GRAPH_WARMUP_STEPS + 1

    def __init__(self, body, before_capture=None):
        self.body, self.before_capture = body, before_capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: torch.Tensor | None = None
        self.side = torch.cuda.Stream()
        self.capture_s = 0.0

    def __call__(self) -> torch.Tensor:
        if self.calls < GRAPH_WARMUP_STEPS:
            self.calls += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.body()
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            t0 = time.perf_counter()
            if self.before_capture is not None:
                self.before_capture()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static = self.body()
            self.capture_s = time.perf_counter() - t0
        self.calls += 1
        updating()
        self.graph.replay()
        return self.static


class GraphAdamStep(AdamStep):
    """The Adam step captured in a CUDA graph after a few eager warm-up steps (``Captured``)."""

    warmup_steps = Captured.warmup_steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured = Captured(self._zeroed_body, lambda: self.opt.zero_grad(set_to_none=True))

    @property
    def capture_s(self) -> float:
        return self.captured.capture_s

    def _zeroed_body(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        return self._body()

    def step(self) -> torch.Tensor:
        with float32_math(self.objective.math), cudnn_search(self.on_cuda):  # the graph captures the kernels chosen
            return self.captured()


class LBFGSStep:
    """One L-BFGS iteration per call; its history carries over between calls.

    Not part of the fast path's no-sync promise: L-BFGS reads the loss on the host.

    It minimises loss / loss_0, loss_0 being the first evaluation's loss (a constant): the
    minimiser and the updates are those of the loss itself, but torch's absolute thresholds
    (stop when max |grad| <= 1e-7; skip the curvature update when y.s <= 1e-10) no longer
    depend on the loss's units. Losses in small units (the sum-normalised recipes, random
    or non-Caffe-scaled networks) had stalled L-BFGS for good on its first step otherwise.
    """

    warmup_steps = 1
    capture_s = 0.0

    def __init__(self, objective: Objective, x: torch.Tensor, lr: float, history: int):
        self.objective, self.x = objective, x
        self.opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=history)
        self.inv_scale: float | None = None

    def set_lr(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr

    def state_dict(self) -> dict:
        # The history and the loss unit fixed at the first evaluation (inv_scale).
        return {"lbfgs": self.opt.state_dict()["state"], "inv_scale": self.inv_scale}

    def load_state_dict(self, state: dict) -> None:
        if "lbfgs" not in state:
            raise InputError("--resume: the state file was written by another optimizer (not L-BFGS)")
        full = self.opt.state_dict()
        full["state"] = state["lbfgs"]
        self.opt.load_state_dict(full)
        self.inv_scale = state["inv_scale"]

    def step(self) -> torch.Tensor:
        first: list[torch.Tensor] = []

        def closure():
            self.opt.zero_grad(set_to_none=True)
            if self.inv_scale is None:
                # The loss unit, from the first image: one evaluation without a gradient, once.
                l0 = abs(float(self.objective.losses(self.x.detach())[0]))  # host sync: once per render
                self.inv_scale = 1.0 / l0 if math.isfinite(l0) and l0 > 0 else 1.0
            parts = self.objective.losses_and_grad(self.x, self.inv_scale)  # x.grad: d (loss / loss_0) / dx
            if not first:
                first.append(parts)
            updating()  # the rest of the step is the update (max_iter=1: no second evaluation)
            return parts[0] * self.inv_scale

        with float32_math(self.objective.math):
            self.opt.step(closure)
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)
        return first[0]


def make_stepper(objective: Objective, x: torch.Tensor, settings: StylizeSettings, plan: StepPlan) -> Stepper:
    """The stepper for ``settings.optimizer`` on this plan, optimising ``x`` in place (the
    ``kernels`` variant: engine/fused.py's, on its fused objective)."""
    if settings.optimizer == "lbfgs":
        return LBFGSStep(objective, x, settings.learning_rate, settings.lbfgs_history)
    if plan.variant == "kernels":
        from .fused import FusedAdamStep

        return FusedAdamStep(objective, x, settings.learning_rate, plan.cuda_graph)
    scheduled = settings.lr_schedule != "constant"
    cls = GraphAdamStep if plan.cuda_graph else AdamStep
    return cls(objective, x, settings.learning_rate, plan, scheduled)
