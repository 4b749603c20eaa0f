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
wrong by the area ratio; both start fresh. The budget's schedule is engine/budget.py's; the lines that describe it, engine/summary.py's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .adaptive import (FINAL_MIN_SHARE, MoveOnRule, coarse_limit, move_on_threshold, progress_interval,
                       worth_running)
from .budget import ScaleCost, ScaleSchedule, allocate, budget_margin, calibrate, fit, replan
from .errors import InputError, RenderFailed
from .imageio import resize_to
from .loader import extractor_for
from .loop import Callback, run
from .settings import StylizeSettings
from .stats import Result


@dataclass
class ScaleOutcome:
    """What one scale did (its schedule is budget.py's ScaleSchedule)."""

    actual_s: float = 0.0
    steps_run: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    why: str = ""  # why the scale ended (the printed report shows it)
    step_variant: str = ""  # which step ran at this scale, and what it cost to set up
    # True: the step's choice read from the cache; False: made now (a trial, or the compiled step
    # where a clock leaves no time for one); None: the settings or the machine named the step
    variant_cached: bool | None = None
    compile_s: float = 0.0
    capture_s: float = 0.0


def _offset(callback: Callback | None, before: int, scale_index: int) -> Callback | None:
    if callback is None:
        return None
    return lambda info: callback(dataclasses.replace(info, before=before, scale_index=scale_index))


def schedule_scales(content, styles, settings: StylizeSettings, extractor, t_start: float,
                    write_s: float = 0.0) -> list[ScaleSchedule]:
    """The scales to run: with a budget, calibrated and allocated; else --steps each."""
    sizes = settings.scale_sizes()
    budget = settings.time_budget
    if budget is None:
        unknown = ScaleCost(0.0, 0.0, 0.0)
        return [ScaleSchedule(s, settings.output_hw(tuple(content.shape[-2:]), s), unknown, settings.steps)
                for s in sizes]
    reserve = budget_margin(budget) + write_s
    schedule = calibrate(content, styles, settings, extractor, sizes, budget, t_start, reserve)
    if adaptive_budget(settings):
        schedule = worth_running(schedule)
    allocate(schedule, budget - (time.perf_counter() - t_start) - reserve)
    for sc in schedule:
        sc.mark_initial()
    return schedule


def render(content, styles, settings: StylizeSettings, extractor=None, init=None, callback: Callback | None = None,
           t_start: float | None = None, on_schedule=None, write_s: float = 0.0, resume=None) -> Result:
    """Single- or multi-scale render, optionally under ``settings.time_budget`` seconds.

    ``t_start`` is when the budget's clock started (default: now); ``write_s`` is what the
    caller needs after the render to finish within the budget (writing the image).
    ``on_schedule(schedule, outcomes)`` is called once the schedule (a ScaleSchedule per
    scale) is known, with the ScaleOutcome list the render fills in as each scale ends: the
    command line prints engine/summary.py's lines for it, the live page follows both. The result's
    ``stats.scales`` lists each scale's schedule and outcome. ``resume`` (engine/state.py's
    RenderState; not with a budget) skips the scales before its own and goes on from its step.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    if resume is not None:
        settings.check_resumable()
    if len(settings.scale_sizes()) == 1 and settings.time_budget is None:
        if resume is not None and resume.scale_index != 0:
            raise InputError("--resume: the state file is from scale "
                             f"{resume.scale_index + 1} of a multi-scale render; this render has one scale")
        if settings.time_limit is not None:  # it counts from t_start, the render's (or the process's) start
            settings = dataclasses.replace(settings, time_limit=_left(settings.time_limit, t_start))
        return run(content, styles, settings, extractor=extractor, init=init, callback=callback, resume=resume)
    if extractor is None:  # loaded once here, not once per scale
        extractor = extractor_for(settings)
    schedule = schedule_scales(content, styles, settings, extractor, t_start, write_s)
    if resume is not None and not 0 <= resume.scale_index < len(schedule):
        raise InputError(f"--resume: the state file is from scale {resume.scale_index + 1}; this render has "
                         f"{len(schedule)}")
    outcomes = [ScaleOutcome() for _ in schedule]
    scheduled_s = time.perf_counter() - t_start
    if on_schedule is not None:
        on_schedule(schedule, outcomes)
    result, limited = _run_scales(content, styles, settings, extractor, init, callback, schedule, outcomes, t_start,
                                  write_s, resume)
    result.stats.schedule_s = scheduled_s
    return _summary(result, schedule, outcomes, settings, t_start, limited)


def _left(limit: float, t_start: float) -> float:
    """What is left of a time limit of ``limit`` seconds from ``t_start`` (a little at least:
    a limit already spent stops the render before its second step)."""
    return max(1e-3, limit - (time.perf_counter() - t_start))


def _run_scales(content, styles, settings, extractor, init, callback, schedule, outcomes, t_start, write_s, resume):
    """Each scale in turn, the image upsampled between them; (the last scale's result,
    whether --time-limit ended it)."""
    image, result, steps_before = init, None, 0
    pacer = _Pacer(schedule, settings, t_start, write_s)
    for k, (scale, out) in enumerate(zip(schedule, outcomes)):
        if resume is not None and k < resume.scale_index:
            continue  # done before the state was written
        t0 = time.perf_counter()
        s_k, rule = pacer.scale_settings(k, content, t0)
        here = resume if resume is not None and k == resume.scale_index else None  # starts from the state
        if here is None and image is not None and k > 0:
            image = resize_to(image, scale.hw)  # upsample the previous scale's result
        if here is not None:
            steps_before = here.before
        try:
            result = run(content, styles, s_k, extractor=extractor, init=image, callback=_offset(callback, steps_before, k),
                         stop_rule=rule, resume=here, trial=_may_trial(settings))
        except RenderFailed as e:  # its best image, at the size asked for
            if e.result is not None:
                e.result.image = resize_to(e.result.image, schedule[-1].hw)
            raise
        except KeyboardInterrupt:
            if result is None:
                raise  # nothing rendered yet
            # A stop during this scale's setup (its targets, a trial): the previous scale's
            # image is the render's, and its state (written at its last step) resumes here.
            result.stats.stopped = "interrupted"
            break
        st = result.stats
        out.actual_s, out.steps_run = time.perf_counter() - t0, st.steps_run
        out.first_loss, out.final_loss = (st.loss[0] if st.loss else None), st.final_loss
        out.step_variant, out.compile_s, out.capture_s = st.step_variant, st.compile_s, st.capture_s
        out.variant_cached = st.variant_choice["cached"] if st.variant_choice else None
        limited = st.stopped == "time-limit" and pacer.limited(k)
        out.why = "--time-limit" if limited else _why(st, k == len(schedule) - 1, settings.time_budget is not None)
        image, steps_before = result.image, steps_before + st.steps_run + (here.step if here else 0)
        if st.stopped == "interrupted" or limited:
            break  # a signal, or --time-limit (not a budget's share): the render ends here
    return result, limited


class _Pacer:
    """Each scale's settings and stop rule: its steps, time limit and progress interval
    under the budget's schedule (equal: engine/budget.py's ``replan``; adaptive: a move-on
    rule and a cap that keeps the later scales' share, engine/adaptive.py)."""

    def __init__(self, schedule: list[ScaleSchedule], settings: StylizeSettings, t_start: float, write_s: float):
        self.schedule, self.settings, self.t_start = schedule, settings, t_start
        budget = settings.time_budget
        # With a learning-rate schedule the step count fixes the schedule's length: the fixed
        # split keeps it; the adaptive plan's rule and deadline-run need a constant rate.
        self.to_deadline = adaptive_budget(settings)
        self.adaptive = self.to_deadline and len(schedule) > 1
        self.end = None if budget is None else budget - budget_margin(budget) - write_s
        self.user_limit = settings.time_limit  # --time-limit, from t_start over all scales: the earlier end wins
        self.cut: set[int] = set()  # the scales whose time limit was --time-limit's
        if self.adaptive:
            # The final scale's guaranteed minimum, from the optimisation time the schedule had.
            self.final_min_s = FINAL_MIN_SHARE * sum(sc.initial_planned_s for sc in schedule)

    def scale_settings(self, k: int, content, now: float):
        schedule, settings = self.schedule, self.settings
        scale, last = schedule[k], k == len(schedule) - 1
        limit, rule, every, steps = settings.time_limit, None, settings.progress_every, scale.steps
        if self.adaptive and not last:
            limit = coarse_limit(schedule, k, now - self.t_start, self.end, self.final_min_s)
            every = progress_interval(scale.initial_steps, settings.progress_every)
            fit(scale, limit)
            steps = scale.steps
            rule = MoveOnRule(move_on_threshold(settings.move_on, scale, schedule[k + 1])).observe
        elif self.end is not None:
            limit = replan(schedule, k, now - self.t_start, self.end)
            steps = scale.steps
            if self.to_deadline and last:
                # The final scale runs to the deadline, not to a step count predicted from the
                # calibration (steps often run faster than the calibrated one): room for twice
                # as many steps, the time limit ends it.
                steps = 2 * scale.steps + 16
        if self.user_limit is not None:
            left = _left(self.user_limit, self.t_start)
            if limit is None or left <= limit:
                limit = left
                self.cut.add(k)
        s_k = settings.at_scale(tuple(content.shape[-2:]), scale.size, steps=steps, time_budget=None,
                                time_limit=limit, progress_every=every)
        return s_k, rule

    def limited(self, k: int) -> bool:
        """Whether scale ``k`` ran under --time-limit's end rather than its budget's share."""
        return k in self.cut


def adaptive_budget(settings: StylizeSettings) -> bool:
    """Whether a render runs the adaptive budget plan: a budget, --budget-plan adaptive and
    a constant learning rate (a schedule's length is its step count: the fixed split keeps it)."""
    return (settings.time_budget is not None and settings.budget_plan == "adaptive"
            and settings.lr_schedule == "constant")


def _why(st, last: bool, budgeted: bool) -> str:
    """Why a scale ended, for the printed report."""
    if st.stopped == "moved-on":
        return st.stop_reason
    if st.stopped == "time-limit":
        return "the budget's end" if last else "its share of the budget"
    if st.stopped:
        return st.stopped
    return "all planned steps" if budgeted or not last else "all steps"


def _summary(result: Result, schedule: list[ScaleSchedule], outcomes: list[ScaleOutcome], settings: StylizeSettings,
             t_start: float, limited: bool = False) -> Result:
    """The result of the last scale run, with every scale's schedule and outcome in its
    statistics, its image at the size asked for. ``limited``: --time-limit ended it (a
    stop the report names, not the budget's planned end)."""
    result.stats.scales = [
        {"size": sc.size, "hw": list(sc.hw), "steps_planned": sc.initial_steps or sc.steps,
         "steps_replanned": sc.steps, "steps_run": out.steps_run, "planned_s": sc.initial_planned_s or sc.planned_s,
         "actual_s": out.actual_s, "step_s_calibrated": sc.cost.step_s, "setup_s_calibrated": sc.cost.setup_s,
         "warmup_s_calibrated": sc.cost.warmup_s, "first_loss": out.first_loss,
         "final_loss": out.final_loss, "why": out.why, "step_variant": out.step_variant,
         "variant_cached": out.variant_cached, "compile_s": out.compile_s, "capture_s": out.capture_s}
        for sc, out in zip(schedule, outcomes) if out.actual_s > 0]
    if tuple(result.image.shape[-2:]) != schedule[-1].hw:
        result.image = resize_to(result.image, schedule[-1].hw)  # interrupted early: still the size asked for
    if (settings.time_budget is not None and result.stats.stopped == "time-limit" and not limited
            and (adaptive_budget(settings) or result.stats.steps_run >= schedule[-1].steps)):
        # The planned steps all ran (the guard did not cut anything), or, adaptive, the final
        # scale ran to the budget's end as planned.
        result.stats.stopped = None
    result.stats.total_s = time.perf_counter() - t_start
    return result


def _may_trial(settings) -> bool:
    """A step-variant trial (engine/variants.py: cold compiles of every candidate, on a GPU)
    runs only where no clock bounds the render: under --time-budget or --time-limit the
    compiled step runs unless a choice is cached."""
    return settings.time_budget is None and settings.time_limit is None
