"""The time-budget planner: measure setup and step time per scale, then split the time.

A short calibration measures the setup (targets, buffers) and the step time at each scale;
the time left after it, less a margin for writing the image, is split: half to the final
scale and the rest evenly over the coarser ones, each as a whole number of steps. While
the render runs, ``replan`` gives each scale its deadline: coarse scales keep their
planned steps (fewer, in proportion, when behind the plan); the final scale gets whatever
time is left.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .device import sync
from .errors import InputError
from .plan import resolve_plan
from .session import prepare
from .settings import StylizeSettings

FINAL_SHARE = 0.5  # of the optimisation time, for the final scale (when there are several)


@dataclass
class ScalePlan:
    size: int  # long edge
    hw: tuple[int, int]
    setup_s: float  # measured: targets and buffers for this size
    step_s: float  # measured: one step after warm-up
    steps: int = 0  # re-planned before the scale runs, with the time actually left
    planned_s: float = 0.0
    initial_steps: int = 0  # the plan as first printed
    initial_planned_s: float = 0.0
    actual_s: float = 0.0  # the outcome, once the scale has run
    steps_run: int = 0
    first_loss: float | None = None
    final_loss: float | None = None

    @property
    def wxh(self) -> str:
        return f"{self.hw[1]}x{self.hw[0]}"


def budget_margin(budget: float) -> float:
    """Reserved for writing the image and for noise: 5% of the budget, at least 1 s."""
    return max(1.0, 0.05 * budget)


def calibrate(content, styles, settings: StylizeSettings, extractor, sizes, budget: float | None, t_start: float,
              margin: float) -> list[ScalePlan]:
    """Measure setup and step time per scale (warm-up steps, then one timed step)."""
    device = resolve_plan(settings).device
    content_hw = tuple(content.shape[-2:])
    plans = []
    for k, size in enumerate(sizes):
        s_k = settings.at_scale(content_hw, size)
        if k == 0:
            # Once untimed: the first setup of a process pays one-time costs (allocator,
            # kernel libraries) that would make the first scale look slower than it is.
            prepare(content, styles, s_k, extractor)
        t0 = time.perf_counter()
        p = prepare(content, styles, s_k, extractor)
        sync(device)
        setup = time.perf_counter() - t0
        # Warm-up: first-touch allocations and kernel selection; with a CUDA graph, the eager
        # warm-up steps and the capture too, so that the timed step is a replay.
        for _ in range(p.stepper.warmup_steps):
            p.stepper.step()
        sync(device)
        t1 = time.perf_counter()
        p.stepper.step()
        sync(device)
        plans.append(ScalePlan(size, p.out_hw, setup, time.perf_counter() - t1))
        del p
        if k == 0 and budget is not None:
            _check_affordable(plans[0], budget, t_start, margin)
    return plans


def _check_affordable(first: ScalePlan, budget: float, t_start: float, margin: float) -> None:
    spent = time.perf_counter() - t_start
    need = spent + first.setup_s + first.step_s + margin
    if need > budget:
        raise InputError(
            f"--time-budget {budget:g} s is too small: one step at the smallest scale ({first.wxh}) takes "
            f"{first.step_s:.2f} s after {first.setup_s:.2f} s of setup, and {spent:.1f} s have gone on loading and "
            f"calibrating; allow at least {math.ceil(need)} s"
        )


def allocate(plans: list[ScalePlan], seconds: float) -> None:
    """Split ``seconds`` of optimisation over the scales (whole steps, at least one each)."""
    n = len(plans)
    shares = [1.0] if n == 1 else [(1 - FINAL_SHARE) / (n - 1)] * (n - 1) + [FINAL_SHARE]
    for scale, share in zip(plans, shares):
        t = seconds * share
        scale.steps = max(1, int((t - scale.setup_s) / scale.step_s)) if t > scale.setup_s else 1
        scale.planned_s = scale.setup_s + scale.steps * scale.step_s
    # Whatever the rounding left over goes to the final scale.
    spare = seconds - sum(sc.planned_s for sc in plans)
    if spare > plans[-1].step_s:
        extra = int(spare / plans[-1].step_s)
        plans[-1].steps += extra
        plans[-1].planned_s += extra * plans[-1].step_s


def replan(plans: list[ScalePlan], k: int, elapsed: float, budget: float, margin: float) -> float:
    """Re-plan scale ``k`` and the ones after it with the time actually left; return scale
    k's time limit (seconds from its start).

    The calibration's setup times include first-call costs, so time is often left over;
    each scale then stops at its planned end as a guard against a slow moment, the last one
    at the end of the budget less the writing margin.
    """
    left = budget - margin - elapsed
    last = k == len(plans) - 1
    if last or left < sum(sc.initial_planned_s for sc in plans[k:]):
        allocate(plans[k:], left)  # the final scale takes what is left; behind the scale, all shrink
    else:
        plans[k].steps, plans[k].planned_s = plans[k].initial_steps, plans[k].initial_planned_s
    end = budget - margin if last else min(elapsed + plans[k].planned_s, budget - margin)
    return max(0.05, end - elapsed)
