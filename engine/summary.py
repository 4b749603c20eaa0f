"""What a render says about itself, as lines of text: the schedule of a budget (before
the steps), the schedule against what ran (after), and a diagnosis of a render that never
improved. The engine writes them; the command line prints them, and the Python API returns
them on the Result (engine/api.py)."""

from __future__ import annotations

from .budget import ScaleSchedule, budget_margin
from .multiscale import adaptive_budget
from .settings import StylizeSettings
from .stats import RunStats


def schedule_lines(schedule: list[ScaleSchedule], settings: StylizeSettings, write_s: float) -> list[str]:
    """The scales and their steps; under a budget, with their calibrated costs."""
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
    lines = [f"plan for a {settings.time_budget:g} s budget (calibrated; {write_s:.1f} s kept for writing the image, "
             f"{budget_margin(settings.time_budget):.1f} s spare for timing noise; {how}):"]
    for i, sc in enumerate(schedule, 1):
        lines.append(f"  scale {i}: {sc.wxh}  {sc.step_s * 1e3:8.1f} ms/step  {sc.steps:5d} steps  "
                     f"{sc.planned_s:6.1f} s planned (setup and warm-up {sc.cost.setup_s + sc.cost.warmup_s:.1f} s)")
    return lines


def outcome_lines(stats: RunStats, settings: StylizeSettings, elapsed_s: float) -> list[str]:
    """Under a budget with several scales: each scale as planned against as run."""
    if not (stats.scales and settings.time_budget is not None):
        return []
    lines = [f"planned against actual ({elapsed_s:.1f} s of a {settings.time_budget:g} s budget, image written):"]
    for i, sc in enumerate(stats.scales, 1):
        lines.append(f"  scale {i}: {sc['hw'][1]}x{sc['hw'][0]}  planned {sc['steps_planned']} steps / "
                     f"{sc['planned_s']:.1f} s, ran {sc['steps_run']} steps / {sc['actual_s']:.1f} s; ended: {sc['why']}")
    return lines


def diagnose(stats: RunStats, settings: StylizeSettings, recipe: str | None = None, where: str = "") -> str | None:
    """Why a single-scale render whose loss never went below its first value ended on its
    start image (it diverged), with the likely cause; None for a render that improved.
    ``where``: the file the image went to, if any."""
    if stats.scales or stats.stopped is not None or stats.steps_run < 2 or stats.image_from_step > 0:
        return None
    cause = f"the learning rate ({settings.learning_rate:g} in [0, 1] pixel units) is likely too high"
    if recipe is not None:
        from . import recipes

        own = recipes.get(recipe).values.get("optimizer", "adam")
        if own != settings.optimizer:
            cause += (f"; --recipe {recipe} sets --lr for its own optimizer ({own}): with --optimizer "
                      f"{settings.optimizer} pass an --lr for it")
    return (f"the loss never went below its first value ({stats.loss[0]:.4g}) in {stats.steps_run} steps, so the "
            f"image written{f' to {where}' if where else ''} is the start image; {cause}")
