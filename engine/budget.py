"""The time-budget planner: a cost model of each scale, measured by a short calibration,
then the budget split over the scales.

The cost model (``ScaleCost``) is the one place where time is predicted: a scale costs its
setup (targets, buffers), the extra time of its first steps (kernel selection; with a CUDA
graph, the eager warm-up steps and the capture) and a steady time per step. After the last
step the caller needs ``write_s`` to write the image (nst/stylize_command.py predicts it
from the format and size), and a margin absorbs noise. The time left after calibration is
split: half to the final scale and the rest evenly over the coarser ones, each as a whole
number of steps. While the render runs, ``replan`` gives each scale its deadline: coarse
scales keep their planned steps (fewer, in proportion, when behind the plan); the final
scale gets whatever time is left.
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
from .sizes import wxh

FINAL_SHARE = 0.5  # of the optimisation time, for the final scale (when there are several)


@dataclass(frozen=True)
class ScaleCost:
    """What one scale costs, in seconds (measured by ``measure_scale``)."""

    setup_s: float  # prepare: targets and buffers at this size
    warmup_s: float  # the first steps' time beyond their steady share (kernel selection, graph capture)
    step_s: float  # one steady step

    def seconds(self, steps: int) -> float:
        """A run of ``steps`` steps at this scale, setup included."""
        return self.setup_s + self.warmup_s + steps * self.step_s

    def steps_within(self, seconds: float) -> int:
        """The most steps (at least one) that fit in ``seconds``, setup included."""
        return max(1, int((seconds - self.setup_s - self.warmup_s) / self.step_s))


@dataclass
class ScaleSchedule:
    """One scale of a render: its size, its measured cost and its steps. ``steps`` and
    ``planned_s`` are re-planned before the scale runs, with the time actually left (by this
    module's ``allocate``, ``replan`` and ``fit``, nothing else); ``initial_*`` keep the
    schedule as first printed. What the scale then did is multiscale.py's ScaleOutcome."""

    size: int  # long edge
    hw: tuple[int, int]
    cost: ScaleCost
    steps: int = 0
    planned_s: float = 0.0
    initial_steps: int = 0
    initial_planned_s: float = 0.0

    @property
    def wxh(self) -> str:
        return wxh(self.hw)

    @property
    def step_s(self) -> float:
        return self.cost.step_s

    def mark_initial(self) -> None:
        """The schedule as it is now is the one printed (and compared with the outcome)."""
        self.initial_steps, self.initial_planned_s = self.steps, self.planned_s


def budget_margin(budget: float) -> float:
    """Reserved for noise (and the last evaluation and copy of the image): 5% of the budget,
    at least 1 s. Writing the image is planned separately (``write_s``)."""
    return max(1.0, 0.05 * budget)


def measure_scale(content, styles, settings: StylizeSettings, extractor) -> tuple[ScaleCost, tuple[int, int]]:
    """Prepare one scale, run its warm-up steps and one steady step, timing each part."""
    device = resolve_plan(settings).device
    t0 = time.perf_counter()
    p = prepare(content, styles, settings, extractor, trial=False)  # the budget times what runs: no separate trial
    sync(device)
    t1 = time.perf_counter()
    # Warm-up: first-touch allocations and kernel selection; with a CUDA graph, the eager
    # warm-up steps and the capture too, so that the timed step is a replay.
    for _ in range(p.stepper.warmup_steps):
        p.stepper.step()
    sync(device)
    t2 = time.perf_counter()
    p.stepper.step()
    sync(device)
    step = time.perf_counter() - t2
    warmup = max(0.0, (t2 - t1) - p.stepper.warmup_steps * step)
    return ScaleCost(t1 - t0, warmup, step), p.out_hw


def calibrate(content, styles, settings: StylizeSettings, extractor, sizes, budget: float | None, t_start: float,
              reserve: float) -> list[ScaleSchedule]:
    """Measure each scale's cost. With a budget, drop the coarsest scales while the budget
    cannot pay every scale's setup and one step, and refuse it when it cannot pay that
    for the final scale alone. ``reserve``: seconds kept at the end (margin, writing)."""
    content_hw = tuple(content.shape[-2:])
    schedule = []
    for k, size in enumerate(sizes):
        s_k = settings.at_scale(content_hw, size)
        if k == 0:
            # Once untimed: the first setup of a process pays one-time costs (allocator,
            # kernel libraries) that would make the first scale look slower than it is.
            prepare(content, styles, s_k, extractor, trial=False)
        cost, hw = measure_scale(content, styles, s_k, extractor)
        schedule.append(ScaleSchedule(size, hw, cost))
        if k == 0 and budget is not None:
            _check_affordable(schedule[:1], budget, t_start, reserve)
    if budget is not None:
        schedule = affordable(schedule, budget - (time.perf_counter() - t_start) - reserve)
        _check_affordable(schedule, budget, t_start, reserve)
    return schedule


def affordable(schedule: list[ScaleSchedule], seconds: float) -> list[ScaleSchedule]:
    """The scales whose setup and one step each fit in ``seconds``: the coarsest dropped
    first, the final scale always kept (a budget too small for it is refused elsewhere)."""
    schedule = list(schedule)
    while len(schedule) > 1 and sum(sc.cost.seconds(1) for sc in schedule) > seconds:
        schedule.pop(0)
    return schedule


def _shortfall(schedule: list[ScaleSchedule], budget: float, t_start: float, reserve: float) -> float:
    """Seconds by which the budget misses every scale's setup and one step (<= 0: it does not)."""
    spent = time.perf_counter() - t_start
    return spent + sum(sc.cost.seconds(1) for sc in schedule) + reserve - budget


def _check_affordable(schedule: list[ScaleSchedule], budget: float, t_start: float, reserve: float) -> None:
    short = _shortfall(schedule, budget, t_start, reserve)
    if short > 0:
        sc = schedule[-1]
        spent = time.perf_counter() - t_start
        raise InputError(
            f"--time-budget {budget:g} s is too small: one step at {sc.wxh} takes {sc.cost.step_s:.2f} s after "
            f"{sc.cost.setup_s + sc.cost.warmup_s:.2f} s of setup, {spent:.1f} s have gone on loading and "
            f"calibrating, and {reserve:.1f} s are kept for writing the image and for noise; allow at least "
            f"{math.ceil(budget + short)} s"
        )


def allocate(schedule: list[ScaleSchedule], seconds: float) -> None:
    """Split ``seconds`` over the scales (whole steps, at least one each)."""
    n = len(schedule)
    shares = [1.0] if n == 1 else [(1 - FINAL_SHARE) / (n - 1)] * (n - 1) + [FINAL_SHARE]
    for scale, share in zip(schedule, shares):
        scale.steps = scale.cost.steps_within(seconds * share)
        scale.planned_s = scale.cost.seconds(scale.steps)
    # Whatever the rounding left over goes to the final scale.
    spare = seconds - sum(sc.planned_s for sc in schedule)
    last = schedule[-1]
    if spare > last.cost.step_s:
        extra = int(spare / last.cost.step_s)
        last.steps += extra
        last.planned_s += extra * last.cost.step_s


def fit(scale: ScaleSchedule, seconds: float) -> None:
    """Re-plan one scale to the most steps that fit in ``seconds``, setup included."""
    scale.steps = scale.cost.steps_within(seconds)
    scale.planned_s = scale.cost.seconds(scale.steps)


def replan(schedule: list[ScaleSchedule], k: int, elapsed: float, end: float) -> float:
    """Re-plan scale ``k`` and the ones after it with the time actually left before ``end``
    (seconds on the budget's clock when the last step must be done); return scale k's time
    limit (seconds from its start).

    The calibration's setup times include first-call costs, so time is often left over;
    each scale then stops at its planned end as a guard against a slow moment, the last one
    at ``end``.
    """
    left = end - elapsed
    last = k == len(schedule) - 1
    if last or left < sum(sc.initial_planned_s for sc in schedule[k:]):
        allocate(schedule[k:], left)  # the final scale takes what is left; behind the plan, all shrink
    else:
        schedule[k].steps, schedule[k].planned_s = schedule[k].initial_steps, schedule[k].initial_planned_s
    stop = end if last else min(elapsed + schedule[k].planned_s, end)
    return max(0.05, stop - elapsed)
