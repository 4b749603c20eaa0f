"""What a render says about itself, as lines of text: the schedule of a budget (before
the steps), the schedule against what ran (after), and a diagnosis of a render that never
improved. The engine writes them; the command line prints them, and the Python API returns
them on the Result (engine/api.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .adaptive import MIN_STEPS
from .budget import ScaleSchedule, budget_margin
from .multiscale import adaptive_budget
from .settings import StylizeSettings
from .stats import RunStats


def schedule_lines(schedule: list[ScaleSchedule], settings: StylizeSettings, write_s: float,
                   spent_s: float | None = None) -> list[str]:
    """The scales and their steps; under a budget, with their calibrated costs and
    ``spent_s``, the budget's seconds gone before the plan (loading and calibrating)."""
    if settings.time_budget is None:
        return ["scales: " + ", ".join(f"{sc.wxh} ({sc.steps} steps)" for sc in schedule)]
    if len(settings.scale_sizes()) == 1:
        how = "one scale"
    elif not adaptive_budget(settings):
        how = "equal split" + (" (an --lr-schedule keeps its step count)" if settings.budget_plan == "adaptive" else "")
    elif len(schedule) > 1:
        how = "adaptive: a coarse scale may move on sooner, and its time goes to the finer ones"
    else:
        how = "adaptive: the coarser scales were dropped (not 1.5x cheaper per step, or not affordable)"
    spent = "" if spent_s is None else f"{spent_s:.1f} s spent on loading and calibrating, "
    lines = [f"plan for a {settings.time_budget:g} s budget (calibrated; {spent}{write_s:.1f} s kept for writing the "
             f"image, {budget_margin(settings.time_budget):.1f} s spare for timing noise; {how}):"]
    for i, sc in enumerate(schedule, 1):
        lines.append(f"  scale {i}: {sc.wxh}  {sc.step_s * 1e3:8.1f} ms/step  {sc.steps:5d} steps  "
                     f"{sc.planned_s:6.1f} s planned (setup and warm-up {sc.cost.setup_s + sc.cost.warmup_s:.1f} s)")
    return lines


def outcome_lines(stats: RunStats, settings: StylizeSettings, elapsed_s: float) -> list[str]:
    """Under a budget with several scales: each scale as planned against as run."""
    if not (stats.scales and settings.time_budget is not None):
        return []
    spent = f"; {stats.schedule_s:.1f} s of it on loading and calibrating" if stats.schedule_s else ""
    lines = [f"planned against actual ({elapsed_s:.1f} s of a {settings.time_budget:g} s budget, image "
             f"written{spent}):"]
    for i, sc in enumerate(stats.scales, 1):
        why = sc["why"]
        if why == "all planned steps" and sc["steps_replanned"] != sc["steps_planned"]:
            # Re-planned before it ran (behind or ahead of the plan): say so, not "planned".
            why = f"all {sc['steps_replanned']} steps re-planned before it ran (the time left had changed)"
        lines.append(f"  scale {i}: {sc['hw'][1]}x{sc['hw'][0]}  planned {sc['steps_planned']} steps / "
                     f"{sc['planned_s']:.1f} s, ran {sc['steps_run']} steps / {sc['actual_s']:.1f} s; ended: {why}")
    return lines


@dataclass(frozen=True)
class Diagnosis:
    """What a render whose image is its start image says: ``diverged`` (a failure: the
    command line exits 1) after MIN_STEPS steps; before that, a note (Adam's and L-BFGS's
    first steps often raise the loss: a short run cannot tell divergence from a normal start)."""

    text: str
    diverged: bool

    def __str__(self) -> str:
        return self.text


def diagnose(stats: RunStats, settings: StylizeSettings, recipe: str | None = None,
             where: str = "") -> Diagnosis | None:
    """Why a single-scale render whose loss never went below its first value ended on its
    start image, with the likely cause; None for a render that improved, or stopped early.
    Counted over the whole render (a resumed one carries its first loss and best image in
    its state). ``where``: the file the image went to, if any."""
    steps = stats.resumed_from + stats.steps_run
    if stats.scales or stats.stopped is not None or steps < 1 or stats.image_from_step != 0:
        return None
    first = stats.first_loss if math.isfinite(stats.first_loss) else (stats.loss[0] if stats.loss else math.nan)
    written = f"the image written{f' to {where}' if where else ''} is the start image"
    hint = ""
    if recipe is not None:
        from . import recipes

        own = recipes.get(recipe).values.get("optimizer", "adam")
        if own != settings.optimizer:
            hint = (f"; --recipe {recipe} sets --lr for its own optimizer ({own}): with --optimizer "
                    f"{settings.optimizer} pass an --lr for it")
    if steps < MIN_STEPS:
        return Diagnosis(f"the loss has not gone below its first value ({first:.4g}) in {steps} step"
                         f"{'s' if steps > 1 else ''} yet, so {written}: an optimiser's first steps often raise it "
                         f"(divergence is judged from step {MIN_STEPS}); run more --steps{hint}", False)
    cause = f"the learning rate ({settings.learning_rate:g} in [0, 1] pixel units) is likely too high{hint}"
    return Diagnosis(f"the loss never went below its first value ({first:.4g}) in {steps} steps, so {written}; "
                     f"{cause}", True)
