"""The Python API: ``nst.engine.stylize(content, style, ...)`` does what ``nst stylize``
does, without the command line. Inputs may be paths, PIL images or tensors (3, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses

from .inputs import as_image, gather
from .live import open_live
from .loop import Callback, chain
from .multiscale import render
from .progress import progress_bar
from .settings import StylizeSettings
from .stats import Result
from .summary import diagnose, outcome_lines, schedule_lines

__all__ = ["as_image", "stylize"]


def _style_items(style) -> list:
    """One style (a path, image or tensor, or one ``(image, weight)`` pair) or a list of them,
    as (image, weight) pairs."""
    if isinstance(style, tuple) and len(style) == 2 and isinstance(style[1], (int, float)):
        items = [style]
    elif isinstance(style, (list, tuple)):
        items = list(style)
    else:
        items = [style]
    return [(item if isinstance(item, tuple) else (item, 1.0)) for item in items]


def stylize(content, style, settings: StylizeSettings | None = None, extractor=None, progress: bool = False,
            recipe: str | None = None, callback: Callback | None = None, serve: str | None = None,
            progress_file=None, **overrides) -> Result:
    """Stylise ``content`` with ``style``.

    ``style`` is one image, or a list of images or ``(image, weight)`` pairs (weights are
    relative). ``recipe`` names a configuration of engine/recipes.py, applied over
    ``settings``; ``overrides`` set StylizeSettings fields (``steps=100, size=256``...) last.
    ``progress`` draws a progress bar; ``callback(StepInfo)`` is called after every step.
    ``serve="[HOST:]PORT"`` serves the live page while it runs (its URL is printed; the stop
    button raises KeyboardInterrupt in the main thread, as Ctrl-C would);
    ``progress_file=FILE`` appends its progress for ``nst watch FILE`` (engine/live.py).
    Returns a :class:`nst.engine.stats.Result`: ``.image`` (3, H, W), ``.stats``, and what
    the render says about itself: ``.report`` (its schedule of scales, planned against
    actual) and ``.diagnosis`` (why a render that never improved did not, or, under 10 steps,
    that it has not yet; else None).
    """
    if recipe is not None:
        from .recipes import settings as recipe_settings

        settings = recipe_settings(recipe, settings, **overrides)
    else:
        settings = dataclasses.replace(settings or StylizeSettings(), **overrides)
    live = open_live(serve, progress_file, settings)  # a port in use is refused before any work
    with live:
        content_t, styles, init = gather(content, _style_items(style), settings)
        report: list[str] = []

        def on_schedule(schedule, outcomes) -> None:
            report.extend(schedule_lines(schedule, settings, 0.0))
            if live.on_schedule is not None:
                live.on_schedule(schedule, outcomes)

        with progress_bar(progress) as bar:
            result = render(content_t, styles, settings, extractor=extractor, init=init,
                            callback=chain(bar, callback, live.callback), on_schedule=on_schedule)
    result.report = report + outcome_lines(result.stats, settings, result.stats.total_s)
    found = diagnose(result.stats, settings, recipe)
    result.diagnosis = None if found is None else found.text
    return result
