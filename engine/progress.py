"""Progress reporting for a render: a loop callback that draws a tqdm bar on a terminal and
logs one line per progress interval elsewhere. The loop itself never prints."""

from __future__ import annotations

import contextlib
import logging
import sys

from .loop import StepInfo

log = logging.getLogger("nst")


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    """A ``ProgressBar`` for the block (closed at its end, however it ends), or None."""
    bar = ProgressBar() if enabled else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


class ProgressBar:
    """``callback=ProgressBar()``: one bar per run (per scale, in a multi-scale render)."""

    def __init__(self):
        self.bar = None

    def __call__(self, info: StepInfo) -> None:
        if info.opening:
            self._open(info.steps, info.step)
            return
        if self.bar is not None:
            self.bar.update(1)
        if info.losses is None:
            return
        total, c, s, tv = info.losses
        if self.bar is not None:
            # tqdm shows its own rate; the postfix only changes at progress intervals.
            self.bar.set_postfix_str(f"loss {total:.4g} (c {c:.3g} s {s:.3g} tv {tv:.3g})", refresh=False)
        else:
            line = (f"step {info.step}/{info.steps} loss {total:.4g} (content {c:.3g} style {s:.3g} tv {tv:.3g}) "
                    f"{info.steps_per_s:.2f} step/s")
            if log.handlers or logging.getLogger().handlers:
                log.info("%s", line)  # the command line's (or the caller's) logging
            else:
                print(line, file=sys.stderr)  # a script that set up no logging still sees progress
        if info.step == info.steps:
            self.close()

    def _open(self, steps: int, start: int = 0) -> None:
        from tqdm import tqdm

        self.close()
        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, leave=True, disable=None)
        self.bar = None if bar.disable else bar  # not a terminal: log lines instead

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
