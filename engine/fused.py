"""The ``kernels`` step variant: the style taps and the image update through the Triton
kernels of engine/kernels.py (issue #24), chosen only where it measures fastest
(engine/variants.py).

What changes against the compiled whole-image step (engine/objective.py WholeImage):

- each style tap's ReLU and style term are one autograd node (``kernels.relu_style_tap``):
  the forward is the Gram (bf16 operands, float32 accumulation, split over M), the value
  and dL/dG in two launches; the backward is one GEMM, F (S + S^T) times the value's
  gradient, with the deeper layers' gradient added and the ReLU mask applied in its
  epilogue (it replaces the Gram's backward, autograd's add and the ReLU's backward);
- the network's gradient stops at the normalised image xn = (x - mean) / std, and one
  kernel does the rest of the step (``kernels.ImageAdam``): the normalisation's backward,
  the TV gradient, Adam and the clamp, in place, in one pass over the image.

The network is walked here, layer by layer (VGGFeatures' body), so that the style taps'
ReLUs can be the kernels' node; the convolutions, pooling and the content term stay torch's
(and inductor's, compiled). Where a kernel's guard says no (a CPU tensor outside Triton's
interpreter, another dtype), each entry point runs its PyTorch reference: the same step,
unfused, which is how the parity tests compare it with the reference step on the CPU.
"""

from __future__ import annotations

import time

import torch

from .device import sync
from .losses import content_coef, content_value, style_coef, tv_grad, tv_value
from .objective import Problem, _compiled
from .signals import updating

# A style tap must be a ReLU of the eager extractor's body for its ReLU and Gram to fuse.


def eligible(problem: Problem) -> str | None:
    """None when the fused step can run on this problem, else why not."""
    net = problem.net
    if not hasattr(net, "body") or not hasattr(net, "_tap_positions"):
        return "the fused step walks the eager extractor's layers (not a TorchScript export)"
    if getattr(net, "checkpoint", False):
        return "the fused step does not recompute blocks (activation checkpointing)"
    names = list(net.body._modules)
    for i, _ in problem.spec.style:
        if not names[net._tap_positions[i]].startswith("relu"):
            return f"style layer {names[net._tap_positions[i]]} is not a ReLU: its Gram cannot fuse with one"
    return None


class FusedObjective:
    """The objective protocol on the fused network walk: losses of x, and its gradient
    (the network's to xn, then the normalisation's backward and TV's by hand)."""

    def __init__(self, problem: Problem, compile: bool = False, loss_scale: float | None = None):
        why = eligible(problem)
        if why:
            raise ValueError(why)
        self.problem, self.spec, self.math = problem, problem.spec, problem.math
        net = problem.net
        self.body = list(net.body)
        pos = net._tap_positions  # body index of each tap, in tap order
        self.style_at = {pos[i]: (k, problem.targets.grams[k][0]) for k, (i, _) in enumerate(self.spec.style)}
        self.content_at = {}
        for k, (i, _) in enumerate(self.spec.content):
            self.content_at.setdefault(pos[i], []).append((k, problem.targets.content[k]))
        self.last = max(pos[i] for i, _ in self.spec.style + self.spec.content)
        self.loss_scale = loss_scale
        self.compiled, self.compile_s = compile, 0.0
        self._run = _compiled(self._forward) if compile else self._forward

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        net = self.problem.net
        return (x.float() - net.mean) / net.std  # (1, 3, H, W), x's memory format

    def _forward(self, xn: torch.Tensor):
        """(content, style) float32 losses of the normalised image xn (1, 3, H, W)."""
        from .kernels import relu_style_tap

        p, spec = self.problem, self.spec
        c_terms, s_terms = [], []
        with torch.autocast(p.device_type, dtype=p.autocast, enabled=p.autocast is not None, cache_enabled=False):
            h = xn
            for i, layer in enumerate(self.body[:self.last + 1]):
                if i in self.style_at:
                    k, target = self.style_at[i]
                    h, value = relu_style_tap(h, target)  # the tap's ReLU and its style value, one node
                    coef = style_coef(spec.gram_norm, spec.style[k][1], h.shape[1], h.shape[2] * h.shape[3])
                    s_terms.append(coef * value)
                else:
                    h = layer(h)
                for k, target in self.content_at.get(i, ()):
                    coef = content_coef(spec.content_norm, spec.content[k][1], h.shape[1], h.shape[2] * h.shape[3])
                    c_terms.append(coef * content_value(h, target))
        zero = xn.new_zeros((), dtype=torch.float32)
        return sum(c_terms, zero), sum(s_terms, zero)

    def forward_backward(self, xn: torch.Tensor):
        """(content, style) of xn (a leaf that requires grad), with d (w_c c + w_s s) / d xn in xn.grad."""
        first = self.compiled and not self.compile_s
        if first:
            sync(xn.device)
            t0 = time.perf_counter()
        c, s = self._run(xn)
        loss = self.spec.content_weight * c + self.spec.style_weight * s
        (loss * self.loss_scale if self.loss_scale else loss).backward()
        if self.loss_scale:
            xn.grad.mul_(1.0 / self.loss_scale)
        if first:
            sync(xn.device)
            self.compile_s = time.perf_counter() - t0  # the first call: the compile, and one step
        return c.detach(), s.detach()

    # -- the protocol (the loop's last evaluation, L-BFGS-free callers, the tests) --------
    def losses(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # the same graph as the steps: a compiled forward is not compiled again
            xn = self.normalise(x.detach()).detach().requires_grad_(True)
            c, s = self._run(xn)
        return self.spec.total(c.detach(), s.detach(), tv_value(x.detach()))

    def losses_and_grad(self, x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        xn = self.normalise(x.detach()).detach().requires_grad_(True)
        c, s = self.forward_backward(xn)
        g = xn.grad / self.problem.net.std + self.spec.tv_weight * tv_grad(x.detach())  # (1, 3, H, W)
        x.grad = g if grad_scale == 1.0 else g * grad_scale
        return self.spec.total(c, s, tv_value(x.detach()))


class FusedAdamStep:
    """The stepper protocol for the ``kernels`` variant: the fused objective's backward to
    the normalised image, then ``kernels.ImageAdam`` (normalisation backward, TV, Adam,
    clamp in one pass), captured in one CUDA graph when the plan says so."""

    def __init__(self, objective: FusedObjective, x: torch.Tensor, lr: float, cuda_graph: bool = False):
        from .kernels import ImageAdam
        from .steppers import Captured

        self.objective, self.x = objective, x
        self.adam = ImageAdam(x, lr, tv_weight=objective.spec.tv_weight)
        # The network's gradient stops here: the normalised image, a leaf of its own.
        self.xn = torch.zeros_like(x, memory_format=torch.preserve_format).requires_grad_(True)
        self.captured = Captured(self._body) if cuda_graph else None
        self.warmup_steps = self.captured.warmup_steps if self.captured else 1

    @property
    def capture_s(self) -> float:
        return self.captured.capture_s if self.captured else 0.0

    def _body(self) -> torch.Tensor:
        with torch.no_grad():
            self.xn.copy_(self.objective.normalise(self.x))
        self.xn.grad = None  # allocated by the backward (from the graph's pool when captured)
        c, s = self.objective.forward_backward(self.xn)
        updating()  # a stop signal now waits for the loop's step to end (engine/signals.py)
        tv = self.adam.step(self.xn.grad)  # tv_value of the image before the step
        return self.objective.spec.total(c, s, tv)  # (4,)

    def step(self) -> torch.Tensor:
        from .device import cudnn_search, float32_math

        # cuDNN's algorithm search while stepping, as the other steppers do: the graph
        # captures the kernels chosen (the trial compares the variants on equal terms).
        with float32_math(self.objective.math), cudnn_search(self.x.is_cuda):
            return self.captured() if self.captured else self._body()

    def set_lr(self, lr: float) -> None:
        self.adam.set_lr(lr)  # a device-side fill: the graph reads it

    def state_dict(self) -> dict:
        # torch.optim.Adam's layout (AdamStep's): a render resumes in any variant.
        return {"adam": {0: {k: v.detach().clone() for k, v in self.adam.state().items()}}}

    def load_state_dict(self, state: dict) -> None:
        from .errors import InputError

        if "adam" not in state:
            raise InputError("--resume: the state file was written by another optimizer (not Adam)")
        self.adam.load_state(next(iter(state["adam"].values())))

    def restart(self, x0: torch.Tensor) -> None:
        """Start again from the image x0 with a fresh Adam state, keeping what was compiled and captured."""
        with torch.no_grad():
            self.x.copy_(x0)
            for t in (self.adam.exp_avg, self.adam.exp_avg_sq, self.adam.step_count):
                t.zero_()
