"""Multi-scale rendering and the time-budget planner.

Rendering at growing sizes (coarse to fine) lets the cheap coarse steps set up the large
structures, so the expensive full-size steps only refine. Between scales the image is
upsampled (bicubic) and the targets are recomputed for the new size (the style images at
the matching scale). The loss weights keep their meaning because every default loss is a
mean (engine/losses.py); with a sum-based --gram-norm or --content-norm they do not, and
the balance of content and style shifts between scales. Optimiser state is *not* carried
over: L-BFGS's history vectors have the old image's dimension, and Adam's moments are
per-pixel statistics of the old grid whose gradient scale changes with the size (mean-
normalised losses give gradients ~1/(H W) per pixel), so upsampled moments would be
wrong by the area ratio; both start fresh.

With ``--time-budget``, a planner first measures the setup (targets) and step time at each
scale with a short calibration, then splits the remaining time: half to the final scale
and the rest evenly over the coarser ones, each as a whole number of steps. Coarse scales
run their planned steps (fewer, in proportion, when behind the plan); the final scale gets
whatever time is left. Every scale runs under a deadline as a guard, so a slow moment costs
steps, not the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass


from .errors import InputError
from .imageio import resize_to
from .loader import load_extractor
from .optimize import (GRAPH_WARMUP_STEPS, GraphAdamStep, NonFiniteLossError, Result, prepare, resolve_plan,
                       run, sync)
from .settings import StylizeSettings

log = logging.getLogger("nst")

AUTO_START = 256  # the smallest automatic scale (long edge, px)
FINAL_SHARE = 0.5  # of the optimisation time, for the final scale (when there are several)


def scale_sizes(settings: StylizeSettings) -> list[int]:
    """Long edges of the scales, smallest first; the last is always the output's."""
    size = settings.long_edge
    spec = (settings.scales or "").strip()
    if not spec:
        return [size]
    if spec == "auto":
        f = settings.scale_factor
        if not f > 1:
            raise InputError(f"--scale-factor must be above 1, got {f}")
        start = min(AUTO_START, size)
        sizes = [size]
        s = size / f
        while s >= start * 0.95:  # allow a first scale slightly under 256 rather than skip it
            sizes.append(round(s))
            s /= f
        return sorted(set(sizes))
    try:
        sizes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"bad --scales {spec!r}: write auto or a list of long edges like 256,512,1024") from None
    if not sizes or any(v < 1 for v in sizes) or sizes != sorted(set(sizes)):
        raise InputError(f"bad --scales {spec!r}: long edges must be positive and increasing")
    if sizes[-1] > size:
        raise InputError(f"--scales {spec}: the last scale ({sizes[-1]}) is larger than the output's long edge "
                         f"({size}, from --size or --resize)")
    if sizes[-1] < size:
        sizes.append(size)
    return sizes


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
    actual_s: float = 0.0
    steps_run: int = 0


def _offset(on_image, before: int):
    if on_image is None:
        return None
    return lambda step, image: on_image(before + step, image)


def at_scale(settings: StylizeSettings, content_hw: tuple[int, int], size: int, **changes) -> StylizeSettings:
    """Settings of one scale: the output size pinned with --resize (the final output's
    aspect ratio at this long edge), no multi-scale of its own."""
    h, w = settings.output_hw(content_hw, size)
    return dataclasses.replace(settings, size=size, resize=f"{w}x{h}", scales=None, **changes)


def calibrate(content, styles, settings: StylizeSettings, extractor, sizes, budget: float | None, t_start: float,
              margin: float) -> list[ScalePlan]:
    """Measure setup and step time per scale (a warm-up step, then one timed step)."""
    device = resolve_plan(settings).device
    plans = []
    for k, size in enumerate(sizes):
        if k == 0:
            # Once untimed: the first setup of a process pays one-time costs (allocator,
            # kernel libraries) that would make the first scale look slower than it is.
            prepare(content, styles, at_scale(settings, tuple(content.shape[-2:]), size), extractor)
        t0 = time.perf_counter()
        p = prepare(content, styles, at_scale(settings, tuple(content.shape[-2:]), size), extractor)
        sync(device)
        setup = time.perf_counter() - t0
        # Warm-up: first-touch allocations and kernel selection; with a CUDA graph, the eager
        # warm-up steps and the capture too, so that the timed step is a replay.
        for _ in range(GRAPH_WARMUP_STEPS + 1 if isinstance(p.runner, GraphAdamStep) else 1):
            p.runner.step()
        sync(device)
        t1 = time.perf_counter()
        p.runner.step()
        sync(device)
        step = time.perf_counter() - t1
        plans.append(ScalePlan(size, p.out_hw, setup, step))
        del p
        if k == 0 and budget is not None:
            need = (time.perf_counter() - t_start) + setup + step + margin
            if need > budget:
                raise InputError(
                    f"--time-budget {budget:g} s is too small: one step at the smallest scale ({p_hw(plans[0])}) "
                    f"takes {step:.2f} s after {setup:.2f} s of setup, and {time.perf_counter() - t_start:.1f} s "
                    f"have gone on loading and calibrating; allow at least {math.ceil(need)} s"
                )
    return plans


def p_hw(plan: ScalePlan) -> str:
    return f"{plan.hw[1]}x{plan.hw[0]}"


def allocate(plans: list[ScalePlan], seconds: float) -> None:
    """Split ``seconds`` of optimisation over the scales (whole steps, at least one each)."""
    n = len(plans)
    shares = [1.0] if n == 1 else [(1 - FINAL_SHARE) / (n - 1)] * (n - 1) + [FINAL_SHARE]
    for plan, share in zip(plans, shares):
        t = seconds * share
        plan.steps = max(1, int((t - plan.setup_s) / plan.step_s)) if t > plan.setup_s else 1
        plan.planned_s = plan.setup_s + plan.steps * plan.step_s
    # Whatever the rounding left over goes to the final scale.
    spare = seconds - sum(p.planned_s for p in plans)
    if spare > plans[-1].step_s:
        extra = int(spare / plans[-1].step_s)
        plans[-1].steps += extra
        plans[-1].planned_s += extra * plans[-1].step_s


def budget_margin(budget: float) -> float:
    """Reserved for writing the image and for noise: 5% of the budget, at least 1 s."""
    return max(1.0, 0.05 * budget)


def render(content, styles, settings: StylizeSettings, extractor=None, init=None, progress: bool = False,
           on_image=None, save_every: int = 0, t_start: float | None = None, on_plan=None) -> Result:
    """Single- or multi-scale render, optionally under ``settings.time_budget`` seconds.

    ``t_start`` is when the budget's clock started (default: now). ``on_plan(plans)`` is
    called once the plan is known (the CLI prints it). The result's ``stats.scales`` lists
    each scale's plan and outcome.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    settings.validate()
    sizes = scale_sizes(settings)
    budget = settings.time_budget
    if len(sizes) == 1 and budget is None:
        return run(content, styles, settings, extractor=extractor, init=init, progress=progress, on_image=on_image,
                   save_every=save_every)
    if extractor is None:  # loaded once here, not once per scale
        extractor = load_extractor(settings.extractor, settings.weights, settings.taps(), settings.pool,
                                   settings.network)

    margin = budget_margin(budget) if budget is not None else 0.0
    if budget is not None:
        plans = calibrate(content, styles, settings, extractor, sizes, budget, t_start, margin)
        remaining = budget - (time.perf_counter() - t_start) - margin
        allocate(plans, remaining)
        for p in plans:
            p.initial_steps, p.initial_planned_s = p.steps, p.planned_s
    else:
        plans = [ScalePlan(s, settings.output_hw(tuple(content.shape[-2:]), s), 0.0, 0.0, settings.steps)
                 for s in sizes]
    if on_plan is not None:
        on_plan(plans)

    image = init
    result = None
    scale_stats = []
    steps_before = 0  # steps of the earlier scales: on_image counts steps over the whole render
    for k, plan in enumerate(plans):
        t0 = time.perf_counter()
        limit = None
        if budget is not None:
            # Re-plan this and the remaining scales with the time actually left (the
            # calibration's setup times include first-call costs, so time is often left
            # over); then each scale stops at its planned end as a guard against a slow
            # moment, the last one at the end of the budget less the writing margin.
            elapsed = t0 - t_start
            left = budget - margin - elapsed
            if k == len(plans) - 1:
                allocate(plans[k:], left)  # the final scale takes all the time that is left
            elif left < sum(p.initial_planned_s for p in plans[k:]):
                allocate(plans[k:], left)  # behind the plan: shrink what remains, in proportion
            else:
                plans[k].steps, plans[k].planned_s = plans[k].initial_steps, plans[k].initial_planned_s
            end = budget - margin if k == len(plans) - 1 else min(elapsed + plans[k].planned_s, budget - margin)
            limit = max(0.05, end - elapsed)
        s_k = at_scale(settings, tuple(content.shape[-2:]), plan.size, steps=plan.steps, time_budget=None,
                       time_limit=limit if limit is not None else settings.time_limit)
        if image is not None and k > 0:
            image = resize_to(image, plan.hw)  # upsample the previous scale's result
        try:
            result = run(content, styles, s_k, extractor=extractor, init=image, progress=progress,
                         on_image=_offset(on_image, steps_before), save_every=save_every)
        except NonFiniteLossError as e:
            if e.result is not None:
                e.result.image = resize_to(e.result.image, plans[-1].hw)
            raise
        plan.actual_s = time.perf_counter() - t0
        plan.steps_run = result.stats.steps_run
        scale_stats.append({"size": plan.size, "hw": list(plan.hw), "steps_planned": plan.initial_steps or plan.steps,
                            "steps_replanned": plan.steps, "steps_run": result.stats.steps_run,
                            "planned_s": plan.initial_planned_s or plan.planned_s,
                            "actual_s": plan.actual_s, "step_s_calibrated": plan.step_s,
                            "first_loss": result.stats.loss[0] if result.stats.loss else None,
                            "final_loss": result.stats.final_loss})
        image = result.image
        steps_before += result.stats.steps_run
        if result.stats.stopped == "interrupted":
            break
    assert result is not None
    if tuple(result.image.shape[-2:]) != plans[-1].hw:
        result.image = resize_to(result.image, plans[-1].hw)  # interrupted early: still the size asked for
    result.stats.scales = scale_stats
    if budget is not None and result.stats.stopped == "time-limit" and result.stats.steps_run >= plans[-1].steps:
        result.stats.stopped = None  # the planned steps all ran: the guard did not cut anything
    result.stats.total_s = time.perf_counter() - t_start
    return result
