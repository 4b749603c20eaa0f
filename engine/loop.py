"""The optimisation loop: step, record, report through a callback, keep the best image.

    step(x):  features(x) -> content + style + TV losses -> d loss / d x -> update -> clamp

``run`` prepares a render at one size (engine/session.py) and runs it; ``optimize`` runs a
prepared one. Host synchronisation happens only every ``progress_every`` steps (reading
the loss for the progress report, the NaN check and the best-image bookkeeping); each
such place is marked ``# host sync``. Progress bars, intermediate files and GIF frames
are the callback's business (engine/progress.py, nst/stylize_command.py), not the loop's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .color import original_colors
from .device import float32_math, sync
from .errors import NonFiniteLossError
from .session import Prepared, prepare
from .settings import StylizeSettings
from .stats import Result, RunStats


@dataclass
class StepInfo:
    """What the callback sees after each step."""

    step: int  # steps done in this run: 0 once before the first step, then 1, 2, ...
    steps: int  # steps planned in this run
    losses: list[float] | None  # [total, content, style, tv] at progress intervals, else None
    steps_per_s: float  # since the first step of this run
    x: torch.Tensor  # the image being optimised (a live view: copy it, or call image())
    before: int = 0  # steps of the earlier scales of a multi-scale render

    @property
    def render_step(self) -> int:
        """Steps done over the whole render (all scales so far)."""
        return self.before + self.step

    def image(self) -> torch.Tensor:
        """The current image, (3, H, W) float32 on the CPU in [0, 1]."""
        return self.x.detach().float().clamp(0, 1)[0].cpu()  # host sync: only when a callback asks


Callback = Callable[[StepInfo], None]
# Called at progress intervals with (steps done, loss): None to go on, or why to stop
# (the adaptive budget plan's move-on rule, engine/adaptive.py).
StopRule = Callable[[int, float], "str | None"]


def chain(*callbacks: Callback | None) -> Callback | None:
    """One callback that calls each of ``callbacks`` in turn (None where there are none)."""
    live = [c for c in callbacks if c is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def call_all(info: StepInfo) -> None:
        for c in live:
            c(info)

    return call_all


class _Pace:
    """When the steps issued so far will have finished, so that a time limit stops the loop
    before a step that would pass it (rather than after). On the CPU a step has finished
    when it returns; on CUDA steps queue up asynchronously and are known to have finished
    only at the progress intervals, where the loop syncs: the steps queued since are
    counted at the pace measured between syncs."""

    def __init__(self, t0: float, asynchronous: bool):
        self.t_sync, self.pending, self.step_s = t0, 0, None
        self.asynchronous = asynchronous

    def issued(self, synced: bool) -> None:
        """One more step was issued; ``synced``: the host has waited for it."""
        self.pending += 1
        if synced or not self.asynchronous:
            now = time.perf_counter()
            self.step_s = (now - self.t_sync) / self.pending
            self.t_sync, self.pending = now, 0

    def next_done(self) -> float:
        """The predicted clock time at which one more step would be done."""
        now = time.perf_counter()
        if self.step_s is None:
            return now
        return max(now, self.t_sync + self.pending * self.step_s) + self.step_s


class _Best:
    """The best image seen at a progress interval (the losses are only read there)."""

    def __init__(self, x: torch.Tensor):
        self.snap = torch.empty_like(x, memory_format=torch.preserve_format).detach()
        self.image = torch.empty_like(self.snap)
        self.loss, self.step = math.inf, -1

    def offer(self, loss: float, step: int, image: torch.Tensor, ties: bool = False) -> None:
        if loss < self.loss or (ties and loss == self.loss):
            self.loss, self.step = loss, step
            self.image.copy_(image)


def run(content: torch.Tensor, styles: list[tuple[torch.Tensor, float]], settings: StylizeSettings | None = None,
        extractor=None, init: str | torch.Tensor | None = None, callback: Callback | None = None,
        stop_rule: StopRule | None = None) -> Result:
    """Stylise ``content`` (3, H, W) with ``styles`` [((3, h, w), weight)], values in [0, 1].

    ``extractor`` defaults to the one ``settings`` describe (``--extractor`` export dir or
    ``--weights``); ``callback(StepInfo)`` is called before the first step and after every step.
    """
    t_start = time.perf_counter()
    p = prepare(content, styles, settings or StylizeSettings(), extractor, init)
    return optimize(p, callback, t_start, stop_rule)


def optimize(p: Prepared, callback: Callback | None = None, t_start: float | None = None,
             stop_rule: StopRule | None = None) -> Result:
    """Run the steps of a prepared render; ``settings.time_limit`` counts from ``t_start``;
    ``stop_rule`` may end it early at a progress interval."""
    s, stepper, x = p.settings, p.stepper, p.x
    t_start = time.perf_counter() if t_start is None else t_start
    stats = _new_stats(p)
    hist = torch.full((s.steps, 4), float("nan"), device=x.device)  # per step [total, content, style, tv]
    best = _Best(x)
    scheduled = s.lr_schedule != "constant"
    deadline = None if s.time_limit is None else t_start + s.time_limit
    sync(x.device)
    stats.setup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    pace = _Pace(t0, asynchronous=x.device.type == "cuda")
    done = 0
    if callback is not None:
        callback(StepInfo(0, s.steps, None, 0.0, x))  # about to start (a progress bar opens)
    try:
        for i in range(s.steps):
            if deadline is not None and i > 0 and pace.next_done() > deadline:
                stats.stopped = "time-limit"  # the next step would end past the limit
                break
            report = i % s.progress_every == 0 or i == s.steps - 1
            if report:
                best.snap.copy_(x.detach())  # the image this step evaluates
            if scheduled:
                stepper.set_lr(s.lr_at(i))
            hist[i].copy_(stepper.step())
            done = i + 1
            losses = hist[i].tolist() if report else None  # host sync: progress interval only
            pace.issued(synced=report)
            if losses is not None:
                if not all(math.isfinite(v) for v in losses):
                    stats.stopped = "non-finite"
                    break
                best.offer(losses[0], i, best.snap)
            if callback is not None:
                callback(StepInfo(done, s.steps, losses, done / max(time.perf_counter() - t0, 1e-9), x))
            if losses is not None and stop_rule is not None:
                why = stop_rule(i, losses[0])  # the loss after i steps (this step evaluated it)
                if why:
                    stats.stopped, stats.stop_reason = "moved-on", why
                    break
    except KeyboardInterrupt:
        stats.stopped = "interrupted"
    sync(x.device)
    stats.loop_s = time.perf_counter() - t0
    return _finish(p, stats, hist, done, best, t_start)


def _new_stats(p: Prepared) -> RunStats:
    plan, mem = p.plan, p.memory
    return RunStats(
        steps_planned=p.settings.steps, size=p.out_hw, device=plan.device, precision=plan.precision, path=plan.path,
        memory_format=plan.memory_format, cuda_graph=plan.cuda_graph, optimizer=p.settings.optimizer,
        float32_math=plan.float32_math or "",
        weights=str(p.weights_info.get("source", "")), checkpointing=mem.checkpoint, tile=mem.tile or 0,
        memory_estimate_bytes=mem.bytes,
    )


def _finish(p: Prepared, stats: RunStats, hist: torch.Tensor, done: int, best: _Best, t_start: float) -> Result:
    """Fill in the statistics and pick the returned image: the final image (evaluated once
    more here, without a step) or the best one seen at a progress interval."""
    stats.capture_s = p.stepper.capture_s
    stats.steps_run = done
    stats.steps_per_s = done / stats.loop_s if stats.loop_s > 0 else 0.0
    h = hist[:done].cpu()
    stats.loss, stats.content, stats.style, stats.tv = (h[:, k].tolist() for k in range(4))
    if stats.stopped != "non-finite":
        try:
            with torch.no_grad(), float32_math(p.objective.math):
                final = p.objective(p.x.detach()).tolist()
        except KeyboardInterrupt:  # a second Ctrl-C: keep the best image seen, skip this check
            stats.stopped, final = "interrupted", [math.nan]
        if math.isfinite(final[0]):
            best.offer(final[0], done, p.x.detach(), ties=True)  # on a tie, the image with more steps
    stats.final_loss, stats.image_from_step = best.loss, best.step
    stats.total_s = time.perf_counter() - t_start
    result = None
    if best.step >= 0:
        image = best.image.detach().float().clamp(0, 1)
        if p.settings.original_colors:
            image = original_colors(image, p.content_img)
        result = Result(image[0].contiguous().cpu(), stats)
    if stats.stopped == "non-finite":
        raise NonFiniteLossError(_nonfinite_message(hist[:done], p, best.step), result)
    return result


def _nonfinite_message(hist: torch.Tensor, p: Prepared, good_step: int) -> str:
    bad = (~torch.isfinite(hist)).any(dim=1).nonzero()
    step = int(bad[0, 0]) + 1 if len(bad) else hist.shape[0]
    advice = [f"a lower --lr (now {p.settings.learning_rate:g})"]
    if p.plan.precision == "fp16":
        advice.insert(0, "--precision bf16 or fp32, or a smaller --loss-scale")
    elif p.plan.precision == "bf16":
        advice.insert(0, "--precision fp32")
    kept = f"the last good image is from step {good_step}" if good_step >= 0 else "no good image was reached"
    return f"the loss became NaN or Inf at step {step} of {p.settings.steps}; {kept}; try {' or '.join(advice)}"
