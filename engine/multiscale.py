"""Multi-scale rendering, optionally under a time budget: ``render`` is the entry point.

Rendering at growing sizes (coarse to fine) lets the cheap coarse steps set up the large
structures, so the expensive full-size steps only refine. Between scales the image is
upsampled (bicubic) and the targets are recomputed for the new size (the style images at
the matching scale). The loss weights keep their meaning because every default loss is a
mean (engine/losses.py); with a sum-based --gram-norm or --content-norm they do not, and
the balance of content and style shifts between scales. Optimiser state is *not* carried
over: L-BFGS's history vectors have the old image's dimension, and Adam's moments are
per-pixel statistics of the old grid whose gradient scale changes with the size (mean-
normalised losses give gradients ~1/(H W) per pixel), so upsampled moments would be
wrong by the area ratio; both start fresh. The budget's plan is engine/budget.py's.
"""

from __future__ import annotations

import dataclasses
import time

from .adaptive import (FINAL_MIN_SHARE, MoveOnRule, coarse_limit, move_on_threshold, progress_interval,
                       worth_running)
from .budget import ScaleCost, ScalePlan, allocate, budget_margin, calibrate, replan
from .errors import InputError, NonFiniteLossError, RankLostError
from .imageio import resize_to
from .loader import extractor_for
from .loop import Callback, run
from .settings import StylizeSettings
from .stats import Result


def _offset(callback: Callback | None, before: int, scale: int) -> Callback | None:
    if callback is None:
        return None
    return lambda info: callback(dataclasses.replace(info, before=before, scale=scale))


def plan_scales(content, styles, settings: StylizeSettings, extractor, t_start: float,
                finish_s: float = 0.0) -> list[ScalePlan]:
    """The scales to run: with a budget, calibrated and allocated; else --steps each."""
    sizes = settings.scale_sizes()
    budget = settings.time_budget
    if budget is None:
        unknown = ScaleCost(0.0, 0.0, 0.0)
        return [ScalePlan(s, settings.output_hw(tuple(content.shape[-2:]), s), unknown, settings.steps)
                for s in sizes]
    reserve = budget_margin(budget) + finish_s
    plans = calibrate(content, styles, settings, extractor, sizes, budget, t_start, reserve)
    if adaptive_plan(settings):
        plans = worth_running(plans)
    allocate(plans, budget - (time.perf_counter() - t_start) - reserve)
    for sc in plans:
        sc.initial_steps, sc.initial_planned_s = sc.steps, sc.planned_s
    return plans


def render(content, styles, settings: StylizeSettings, extractor=None, init=None, callback: Callback | None = None,
           t_start: float | None = None, on_plan=None, finish_s: float = 0.0, resume=None) -> Result:
    """Single- or multi-scale render, optionally under ``settings.time_budget`` seconds.

    ``t_start`` is when the budget's clock started (default: now); ``finish_s`` is what the
    caller needs after the render to finish within the budget (writing the image).
    ``on_plan(plans)`` is called once the plan is known (the CLI prints it). The result's
    ``stats.scales`` lists each scale's plan and outcome. ``resume`` (engine/state.py's
    RenderState; not with a budget) skips the scales before its own and goes on from its step.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    if resume is not None and settings.time_budget is not None:
        raise InputError("--resume continues a render of fixed steps; a --time-budget render cannot be resumed")
    if len(settings.scale_sizes()) == 1 and settings.time_budget is None:
        if resume is not None and resume.scale != 0:
            raise InputError("--resume: the state file is from scale "
                             f"{resume.scale + 1} of a multi-scale render; this render has one scale")
        return run(content, styles, settings, extractor=extractor, init=init, callback=callback, resume=resume)
    if extractor is None:  # loaded once here, not once per scale
        extractor = extractor_for(settings)
    plans = plan_scales(content, styles, settings, extractor, t_start, finish_s)
    if on_plan is not None:
        on_plan(plans)
    image, result, steps_before = init, None, 0
    if resume is not None and not 0 <= resume.scale < len(plans):
        raise InputError(f"--resume: the state file is from scale {resume.scale + 1}; this render has {len(plans)}")
    pacer = _Pacer(plans, settings, t_start, finish_s)
    for k, scale in enumerate(plans):
        if resume is not None and k < resume.scale:
            continue  # done before the state was written
        t0 = time.perf_counter()
        s_k, rule = pacer.scale_settings(k, content, t0)
        here = resume if resume is not None and k == resume.scale else None  # this scale starts from the state
        if here is None and image is not None and k > 0:
            image = resize_to(image, scale.hw)  # upsample the previous scale's result
        if here is not None:
            steps_before = here.before
        try:
            result = run(content, styles, s_k, extractor=extractor, init=image,
                         callback=_offset(callback, steps_before, k), stop_rule=rule, resume=here)
        except (NonFiniteLossError, RankLostError) as e:
            if e.result is not None:
                e.result.image = resize_to(e.result.image, plans[-1].hw)
            raise
        st = result.stats
        scale.actual_s, scale.steps_run = time.perf_counter() - t0, st.steps_run
        scale.first_loss, scale.final_loss = (st.loss[0] if st.loss else None), st.final_loss
        scale.why = _why(st, k == len(plans) - 1, settings.time_budget is not None)
        image, steps_before = result.image, steps_before + result.stats.steps_run + (here.step if here else 0)
        if result.stats.stopped == "interrupted":
            break
    return _finish(result, plans, settings, t_start)


class _Pacer:
    """Each scale's settings and stop rule: its steps, time limit and progress interval
    under the budget's plan (equal: engine/budget.py's ``replan``; adaptive: a move-on rule
    and a cap that keeps the later scales' share, engine/adaptive.py)."""

    def __init__(self, plans: list[ScalePlan], settings: StylizeSettings, t_start: float, finish_s: float):
        self.plans, self.settings, self.t_start = plans, settings, t_start
        budget = settings.time_budget
        # With a learning-rate schedule the step count fixes the schedule's length: the fixed
        # split keeps it; the adaptive plan's rule and deadline-run need a constant rate.
        self.to_deadline = adaptive_plan(settings)
        self.adaptive = self.to_deadline and len(plans) > 1
        self.end = None if budget is None else budget - budget_margin(budget) - finish_s
        if self.adaptive:
            # The final scale's guaranteed minimum, from the optimisation time the plan had.
            self.final_min_s = FINAL_MIN_SHARE * sum(sc.initial_planned_s for sc in plans)

    def scale_settings(self, k: int, content, now: float):
        plans, settings = self.plans, self.settings
        scale, last = plans[k], k == len(plans) - 1
        limit, rule, every = settings.time_limit, None, settings.progress_every
        if self.adaptive and not last:
            limit = coarse_limit(plans, k, now - self.t_start, self.end, self.final_min_s)
            every = progress_interval(scale.initial_steps, settings.progress_every)
            scale.steps = scale.cost.steps_within(limit)
            scale.planned_s = scale.cost.seconds(scale.steps)
            rule = MoveOnRule(move_on_threshold(settings.move_on, scale, plans[k + 1])).observe
        elif self.end is not None:
            limit = replan(plans, k, now - self.t_start, self.end)
            if self.to_deadline and last:
                # The final scale runs to the deadline, not to a step count predicted from the
                # calibration (steps often run faster than the calibrated one): room for twice
                # as many steps, the time limit ends it.
                scale.steps = 2 * scale.steps + 16
        s_k = settings.at_scale(tuple(content.shape[-2:]), scale.size, steps=scale.steps, time_budget=None,
                                time_limit=limit, progress_every=every)
        return s_k, rule


def adaptive_plan(settings: StylizeSettings) -> bool:
    """Whether a render runs the adaptive budget plan: a budget, --budget-plan adaptive and
    a constant learning rate (a schedule's length is its step count: the fixed split keeps it)."""
    return (settings.time_budget is not None and settings.budget_plan == "adaptive"
            and settings.lr_schedule == "constant")


def _why(st, last: bool, budgeted: bool) -> str:
    """Why a scale ended, for the printed plan."""
    if st.stopped == "moved-on":
        return st.stop_reason
    if st.stopped == "time-limit":
        return "the budget's end" if last else "its share of the budget"
    if st.stopped:
        return st.stopped
    return "all planned steps" if budgeted or not last else "all steps"


def _finish(result: Result, plans: list[ScalePlan], settings: StylizeSettings, t_start: float) -> Result:
    ran = [sc for sc in plans if sc.actual_s > 0]
    result.stats.scales = [
        {"size": sc.size, "hw": list(sc.hw), "steps_planned": sc.initial_steps or sc.steps,
         "steps_replanned": sc.steps, "steps_run": sc.steps_run, "planned_s": sc.initial_planned_s or sc.planned_s,
         "actual_s": sc.actual_s, "step_s_calibrated": sc.cost.step_s, "setup_s_calibrated": sc.cost.setup_s,
         "warmup_s_calibrated": sc.cost.warmup_s, "first_loss": sc.first_loss,
         "final_loss": sc.final_loss, "why": sc.why} for sc in ran]
    if tuple(result.image.shape[-2:]) != plans[-1].hw:
        result.image = resize_to(result.image, plans[-1].hw)  # interrupted early: still the size asked for
    if (settings.time_budget is not None and result.stats.stopped == "time-limit"
            and (adaptive_plan(settings) or result.stats.steps_run >= plans[-1].steps)):
        # The planned steps all ran (the guard did not cut anything), or, adaptive, the final
        # scale ran to the budget's end as planned.
        result.stats.stopped = None
    result.stats.total_s = time.perf_counter() - t_start
    return result
