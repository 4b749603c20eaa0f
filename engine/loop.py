"""The optimisation loop: step, record, report through a callback, keep the best image.

    step(x):  features(x) -> content + style + TV losses -> d loss / d x -> update -> clamp

``run`` prepares a render at one size (engine/session.py) and runs it; ``optimize`` runs a
prepared one. Host synchronisation happens only every ``progress_every`` steps (reading
the loss for the progress report, the NaN check and the best-image bookkeeping); each
such place is marked ``# host sync``. Progress bars, intermediate files and GIF frames
are the callback's business (engine/progress.py, nst/stylize_command.py), not the loop's.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .color import original_colors
from .device import float32_math, sync
from .errors import InputError, NonFiniteLossError, RankLostError
from .session import Prepared, prepare
from .settings import StylizeSettings
from .signals import step_boundary
from .sizes import wxh
from .stats import Result, RunStats


@dataclass
class StepInfo:
    """What the callback sees after each step."""

    step: int  # steps done at this scale: 0 (or a resumed render's start) before the first step, then 1, 2, ...
    steps: int  # steps planned in this run
    losses: list[float] | None  # [total, content, style, tv] at progress intervals, else None
    steps_per_s: float  # since the first step of this run
    x: torch.Tensor  # the image being optimised (a live view: copy it, or call image())
    before: int = 0  # steps of the earlier scales of a multi-scale render
    scale_index: int = 0  # which scale of a multi-scale render (0: the first)
    # The optimiser's state now (the stepper's state_dict; engine/state.py saves it with
    # the image for --resume); read it at progress intervals only.
    optimizer_state: Callable[[], dict] | None = None
    opening: bool = False  # the call before the first step (a progress bar opens)
    # One more call after a stop (a signal, the time limit, the move-on rule, a lost rank),
    # with the step the loop stopped at: the image and the optimiser's state are those after
    # ``step`` whole steps, for --state (engine/signals.py step_boundary). Not made when the
    # loop ran all its steps (the last step is a progress interval) or the loss was not finite.
    closing: bool = False
    # The scale's record for a state file (engine/state.py RenderState): {first_loss,
    # best_loss, best_step, best_image (None: the best image is x)}; a host sync.
    record: Callable[[], dict] | None = None

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
    """The best image seen at a progress interval (the losses are only read there); a
    resumed render starts from the state's record (engine/state.py)."""

    def __init__(self, x: torch.Tensor, resume=None):
        self.snap = torch.empty_like(x, memory_format=torch.preserve_format).detach()
        self.image = torch.empty_like(self.snap)
        self.loss, self.step = math.inf, -1
        if resume is not None and resume.best_step >= 0:
            self.loss, self.step = resume.best_loss, resume.best_step
            self.image.copy_(resume.image if resume.best_image is None else resume.best_image)

    def offer(self, loss: float, step: int, image: torch.Tensor, ties: bool = False) -> None:
        if loss < self.loss or (ties and loss == self.loss):
            self.loss, self.step = loss, step
            self.image.copy_(image)


class _History:
    """The losses [total, content, style, tv] of each step run, on the device (written
    without a host sync), in a buffer that grows with the run: --steps may be far more than
    ever run (a time limit, a budget's final scale), and nothing is allocated for them."""

    def __init__(self, device: torch.device, first: int):
        self.buf = torch.full((max(1, min(first, 1024)), 4), math.nan, device=device)  # (capacity, 4)

    def row(self, k: int) -> torch.Tensor:
        """Row ``k`` (4,), growing the buffer (doubling, on the device) when it is full."""
        if k >= self.buf.shape[0]:
            grown = torch.full((2 * self.buf.shape[0], 4), math.nan, device=self.buf.device)
            grown[:self.buf.shape[0]].copy_(self.buf)
            self.buf = grown
        return self.buf[k]

    def first(self, n: int) -> torch.Tensor:
        return self.buf[:n]


def run(content: torch.Tensor, styles: list[tuple[torch.Tensor, float]], settings: StylizeSettings | None = None,
        extractor=None, init: str | torch.Tensor | None = None, callback: Callback | None = None,
        stop_rule: StopRule | None = None, resume=None, trial: bool = True) -> Result:
    """Stylise ``content`` (3, H, W) with ``styles`` [((3, h, w), weight)], values in [0, 1].

    ``extractor`` defaults to the one ``settings`` describe (``--extractor`` export dir or
    ``--weights``); ``callback(StepInfo)`` is called before the first step and after every step.
    ``resume`` (an engine/state.py RenderState) continues from its image, optimiser state and step.
    ``trial``: see engine/session.py prepare (False under a time budget or limit).
    """
    t_start = time.perf_counter()
    p = prepare(content, styles, settings or StylizeSettings(), extractor,
                init if resume is None else resume.image, trial=trial)
    if resume is not None:
        check_resume(resume, p)
        p.stepper.load_state_dict(resume.optimizer)
    return optimize(p, callback, t_start, stop_rule, resume=resume)


def check_resume(resume, p: Prepared) -> None:
    """The state file's image and step fit this render (engine/state.py)."""
    hw = tuple(resume.image.shape[-2:])
    if hw != tuple(p.out_hw):
        raise InputError(f"--resume: the state's image is {wxh(hw)}, this render's is {wxh(p.out_hw)}")
    if resume.step > p.settings.steps:
        raise InputError(f"--resume: the state is from step {resume.step}, past --steps {p.settings.steps}")


def optimize(p: Prepared, callback: Callback | None = None, t_start: float | None = None,
             stop_rule: StopRule | None = None, resume=None) -> Result:
    """Run the steps of a prepared render; ``settings.time_limit`` counts from ``t_start``;
    ``stop_rule`` may end it early at a progress interval; ``resume`` (engine/state.py's
    RenderState, its optimiser state already loaded): the loop goes on from its step, with
    the learning rate of that step and the state's record (first loss, best image)."""
    s, stepper, x = p.settings, p.stepper, p.x
    t_start = time.perf_counter() if t_start is None else t_start
    stats = _new_stats(p)
    start = 0 if resume is None else min(resume.step, s.steps)
    stats.resumed_from = start
    hist = _History(x.device, s.steps - start)
    best = _Best(x, resume)
    deadline = None if s.time_limit is None else t_start + s.time_limit
    sync(x.device)
    stats.setup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    run = _Run(p, callback, stop_rule, stats, hist, best, start, t0, None if resume is None else resume.first_loss)
    if callback is not None:
        callback(StepInfo(start, s.steps, None, 0.0, x, optimizer_state=run.state, opening=True))
    try:
        try:
            run.steps(deadline)
        except KeyboardInterrupt:
            stats.stopped = "interrupted"
        sync(x.device)
        stats.loop_s = time.perf_counter() - t0
        final = _final_loss(p, stats)
    except RankLostError as e:
        # A distributed render lost a rank (engine/ranks.py), in the steps or in the final
        # evaluation (the workers may go first on a signal): handled here and only here. The
        # render ends with its best image, as RankLostError (see _result).
        stats.stopped, stats.stop_reason, final = "rank-lost", str(e), math.nan
        stats.loop_s = stats.loop_s or time.perf_counter() - t0
    if math.isfinite(final):
        best.offer(final, run.done, x.detach(), ties=True)  # on a tie, the image with more steps
    stats.first_loss = run.first_loss()
    if callback is not None and stats.stopped not in (None, "non-finite") and not run.torn:
        record = run.recorder()
        with contextlib.suppress(KeyboardInterrupt):  # a later signal: the image is still to be written
            callback(StepInfo(run.done, s.steps, None, run.rate(), x, optimizer_state=run.state, closing=True,
                              record=record))
    return _result(p, stats, hist, run.done, best, t_start, start)


class _Run:
    """The steps of one ``optimize``: what it has done so far (``done``) and whether a step
    was cut inside its update (``torn``)."""

    def __init__(self, p: Prepared, callback, stop_rule, stats: RunStats, hist: _History, best: _Best, start: int,
                 t0: float, first: float | None):
        self.p, self.callback, self.stop_rule, self.stats = p, callback, stop_rule, stats
        self.hist, self.best, self.start, self.t0 = hist, best, start, t0
        self.done, self.torn = start, False
        self.state = getattr(p.stepper, "state_dict", None)
        self.first = first  # a resumed render's first loss (from its state)

    def rate(self) -> float:
        return (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def first_loss(self) -> float:
        """The loss of the scale's first evaluation (NaN before it); a host sync."""
        if self.first is not None:
            return self.first
        return float(self.hist.first(1)[0, 0]) if self.done > self.start else math.nan

    def recorder(self) -> Callable[[], dict]:
        """The scale's record for a state file (engine/state.py), read when asked (a host sync)."""
        best, done = self.best, self.done

        def record() -> dict:
            image = None if best.step == done else best.image.detach().float().cpu()
            return {"first_loss": self.first_loss(), "best_loss": best.loss, "best_step": best.step,
                    "best_image": image}
        return record

    def steps(self, deadline: float | None) -> None:
        """Step until the end, a stop or a non-finite loss; ``torn`` tells whether a step
        was cut inside its update (its image and optimiser state cannot be saved then)."""
        s, stepper, x, stats, best = self.p.settings, self.p.stepper, self.p.x, self.stats, self.best
        scheduled = s.lr_schedule != "constant"
        pace = _Pace(self.t0, asynchronous=x.device.type == "cuda")
        for i in range(self.start, s.steps):
            if deadline is not None and i > self.start and pace.next_done() > deadline:
                stats.stopped = "time-limit"  # the next step would end past the limit
                break
            report = i % s.progress_every == 0 or i == s.steps - 1
            if report:
                best.snap.copy_(x.detach())  # the image this step evaluates
            if scheduled:
                stepper.set_lr(s.lr_at(i))
            with step_boundary() as b:  # a stop signal during the update waits for the step to be counted
                try:
                    self.hist.row(i - self.start).copy_(stepper.step())
                finally:
                    self.torn = b.torn
                self.done = i + 1
            losses = self.hist.row(i - self.start).tolist() if report else None  # host sync: progress interval only
            pace.issued(synced=report)
            if losses is not None:
                if not all(math.isfinite(v) for v in losses):
                    stats.stopped = "non-finite"
                    break
                best.offer(losses[0], i, best.snap)
            if self.callback is not None:
                record = self.recorder() if losses is not None else None
                self.callback(StepInfo(self.done, s.steps, losses, self.rate(), x, optimizer_state=self.state,
                                       record=record))
            if losses is not None and self.stop_rule is not None:
                why = self.stop_rule(i, losses[0])  # the loss after i steps (this step evaluated it)
                if why:
                    stats.stopped, stats.stop_reason = "moved-on", why
                    break


def _new_stats(p: Prepared) -> RunStats:
    plan, mem = p.plan, p.memory
    return RunStats(
        steps_planned=p.settings.steps, size=p.out_hw, device=plan.device, precision=plan.precision, path=plan.path,
        memory_format=plan.memory_format, cuda_graph=plan.cuda_graph, optimizer=p.settings.optimizer,
        float32_math=plan.float32_math or "",
        weights=str(p.weights_info.get("source", "")), checkpointing=mem.checkpoint, tile=mem.tile or 0,
        memory_estimate_bytes=mem.bytes, step_variant=plan.variant if plan.path == "fast" else plan.path,
    )


def _final_loss(p: Prepared, stats: RunStats) -> float:
    """The loss of the image the steps ended on (evaluated once more, without a step); NaN
    where it was not evaluated."""
    if stats.stopped == "non-finite":
        return math.nan
    try:
        with float32_math(p.objective.math):
            return float(p.objective.losses(p.x.detach())[0])  # host sync: once, after the steps
    except KeyboardInterrupt:  # a second Ctrl-C: keep the best image seen, skip this check
        stats.stopped = "interrupted"
    return math.nan


def _result(p: Prepared, stats: RunStats, hist: _History, done: int, best: _Best, t_start: float,
            start: int) -> Result:
    """Fill in the statistics and pick the returned image: the best one seen (the final image
    was offered last). A render that cannot go on raises, with that image:
    NonFiniteLossError or RankLostError; so does one whose every loss was non-finite."""
    stats.capture_s = p.stepper.capture_s
    stats.compile_s = getattr(p.objective, "compile_s", 0.0)  # an objective that compiles says how long
    stats.variant_choice = p.choice.to_dict() if p.choice is not None else None
    stats.steps_run = done - start
    stats.steps_per_s = stats.steps_run / stats.loop_s if stats.loop_s > 0 else 0.0
    h = hist.first(done - start).cpu()
    stats.loss, stats.content, stats.style, stats.tv = (h[:, k].tolist() for k in range(4))
    stats.final_loss, stats.image_from_step = best.loss, best.step
    stats.total_s = time.perf_counter() - t_start
    result = None
    if best.step < 0 and stats.stopped == "interrupted":
        # Stopped before any loss was read, and again in the final evaluation: the image
        # the steps ended on, unevaluated.
        best.image.copy_(p.x.detach())
        best.step = stats.image_from_step = done
    if best.step >= 0:
        image = best.image.detach().float().clamp(0, 1)
        if p.settings.original_colors:
            image = original_colors(image, p.content_img)
        result = Result(image[0].contiguous().cpu(), stats)
    if stats.stopped == "rank-lost":
        kept = f"the best image so far is from step {best.step}" if best.step >= 0 else "no image was reached"
        raise RankLostError(f"{stats.stop_reason}; {kept}", result)
    if stats.stopped == "non-finite" or result is None:
        stats.stopped = stats.stopped or "non-finite"
        raise NonFiniteLossError(_nonfinite_message(h, p, best.step, start), result)
    return result


def _nonfinite_message(hist: torch.Tensor, p: Prepared, good_step: int, start: int = 0) -> str:
    bad = (~torch.isfinite(hist)).any(dim=1).nonzero()
    step = start + (int(bad[0, 0]) + 1 if len(bad) else hist.shape[0])
    advice = [f"a lower --lr (now {p.settings.learning_rate:g})"]
    if p.plan.precision == "fp16":
        advice.insert(0, "--precision bf16 or fp32, or a smaller --loss-scale")
    elif p.plan.precision == "bf16":
        advice.insert(0, "--precision fp32")
    kept = f"the last good image is from step {good_step}" if good_step >= 0 else "no good image was reached"
    return f"the loss became NaN or Inf at step {step} of {p.settings.steps}; {kept}; try {' or '.join(advice)}"
