"""The adaptive budget plan (``--budget-plan adaptive``, on request): each coarse scale
runs while it buys loss faster than the next scale is expected to, then hands the rest of
its time to the finer scales. The fixed split, ``--budget-plan equal`` (engine/budget.py's
``allocate``), stays the default: on the CPU measured, the adaptive plan was not better
(bench/results/quality-cpu-512.md).

The model. Progress is read per step (within a scale every step costs the same, so this
is free of timing noise) and in relative terms, as the fall of the log of the loss:

    rate = ln(L_a / L_b) / (b - a)      (about the fraction of the loss removed per step)

over the last two progress intervals (the loop's only host syncs), with L the best loss
so far (so an oscillating loss reads as no progress, not as a negative rate). The next
scale is expected to remove ``rho`` (``--move-on``) of its loss per step at first, but each
of its steps costs ``c = step_s(next) / step_s(this)`` times as much (calibrated). So this
scale is worth more time while it beats the next one per second:

    rate / step_s(this) > rho / step_s(next)    <=>    rate > rho / c

On a GPU, where small images are launch-bound and c is close to 1, a coarse scale moves
on once its progress slows to ``rho``; on a CPU, where c is about 4 for a doubling, it
stays until its rate is a quarter of that. ``rho`` was chosen from measured renders on
one image pair and reported on another (bench/results/quality-*); on the report pair it
proved too low for a ladder starting at 256 px.

Scales worth running. A coarse scale helps only by being cheaper per step than the next
one; on a GPU the smallest images are launch-bound and cost about as much as larger ones,
so after calibration the adaptive plan drops, from the coarse end, every scale whose step
is not at least ``MIN_CHEAPER`` times cheaper than the next scale's.

Bounds. A coarse scale never takes the time the finer scales need: the setup and warm-up
of every later scale, one step of each intermediate one, and at least ``FINAL_MIN_SHARE``
of the optimisation time for the final scale. The final scale runs to the end of the
budget (minus the measured cost of writing the image and the margin), as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .budget import ScaleSchedule

FINAL_MIN_SHARE = 0.25  # of the optimisation time: the final scale's guaranteed minimum
MIN_CHEAPER = 1.5  # a coarse scale is kept only if its step costs at most 1/1.5 of the next scale's
MIN_STEPS = 10  # a scale's first steps are not judged: Adam's fresh moments make its first steps sign-like
OBSERVATIONS = 12  # progress intervals wanted over a coarse scale's equal-split steps


@dataclass
class MoveOnRule:
    """Decides, from (step, loss) at progress intervals, when a coarse scale moves on.

    ``threshold`` = rho / c (see the module's note). ``observe`` returns None to go on,
    or the reason for stopping, once the recent rate has fallen below the threshold.
    """

    threshold: float
    points: list[tuple[int, float]] = field(default_factory=list)  # (step, best loss so far)
    rate: float | None = None  # the last rate seen

    def observe(self, step: int, loss: float) -> str | None:
        if self.points and step <= self.points[-1][0]:
            return None  # the same interval reported twice (the last step of a run)
        best = min(loss, self.points[-1][1]) if self.points else loss
        self.points.append((step, best))
        # Judged only after MIN_STEPS and once the loss has fallen below its start (a fresh
        # Adam's first steps can raise it: that is not a plateau), over two intervals.
        if len(self.points) < 3 or step < MIN_STEPS or not best < self.points[0][1]:
            return None
        (a, la), (b, lb) = self.points[-3], self.points[-1]
        if not (la > 0 and lb > 0):
            return None  # no logarithm of a zero loss: the time cap still holds
        self.rate = math.log(la / lb) / (b - a)
        if self.rate < self.threshold:
            return (f"plateau: the loss fell {100 * self.rate:.2f}% per step, under {100 * self.threshold:.2f}% "
                    "(the next scale's expected rate over its step-cost ratio)")
        return None


def worth_running(schedule: list[ScaleSchedule]) -> list[ScaleSchedule]:
    """The scales left after dropping, from the coarse end, those not ``MIN_CHEAPER`` times
    cheaper per step than the next (and every scale coarser than such a one)."""
    for k in range(len(schedule) - 2, -1, -1):
        if schedule[k + 1].cost.step_s < MIN_CHEAPER * schedule[k].cost.step_s:
            return schedule[k + 1:]
    return schedule


def move_on_threshold(rho: float, this: ScaleSchedule, nxt: ScaleSchedule) -> float:
    """rho / c, with c the step-cost ratio of the next scale to this one (calibrated; at
    least 1: a finer scale never costs less per step)."""
    c = max(nxt.cost.step_s, 1e-9) / max(this.cost.step_s, 1e-9)
    return rho / max(c, 1.0)


def coarse_limit(schedule: list[ScaleSchedule], k: int, elapsed: float, end: float, final_min_s: float) -> float:
    """Seconds scale ``k`` (not the last) may run from now (``elapsed`` on the budget's
    clock): all that is left before ``end`` except what the later scales need."""
    later = schedule[k + 1:]
    need = sum(sc.cost.seconds(1) for sc in later[:-1]) + later[-1].cost.seconds(0) + final_min_s
    return max(0.05, end - elapsed - need)


def progress_interval(equal_steps: int, progress_every: int) -> int:
    """Steps between observations of a coarse scale: ``OBSERVATIONS`` over its equal-split
    steps, never sparser than --progress-every."""
    return max(1, min(progress_every, equal_steps // OBSERVATIONS))
