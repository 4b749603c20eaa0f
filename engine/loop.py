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
from .errors import InputError, NonFiniteLossError, RankLostError
from .session import Prepared, prepare
from .settings import StylizeSettings
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
        stop_rule: StopRule | None = None, resume=None, trial: bool = True) -> Result:
    """Stylise ``content`` (3, H, W) with ``styles`` [((3, h, w), weight)], values in [0, 1].

    ``extractor`` defaults to the one ``settings`` describe (``--extractor`` export dir or
    ``--weights``); ``callback(StepInfo)`` is called before the first step and after every step.
    ``resume`` (an engine/state.py RenderState) continues from its image, optimiser state and step.
    ``trial``: see engine/session.py prepare (False under a time budget).
    """
    t_start = time.perf_counter()
    p = prepare(content, styles, settings or StylizeSettings(), extractor,
                init if resume is None else resume.image, trial=trial)
    if resume is not None:
        check_resume(resume, p)
        p.stepper.load_state_dict(resume.optimizer)
    return optimize(p, callback, t_start, stop_rule, start=0 if resume is None else resume.step)


def check_resume(resume, p: Prepared) -> None:
    """The state file's image and step fit this render (engine/state.py)."""
    hw = tuple(resume.image.shape[-2:])
    if hw != tuple(p.out_hw):
        raise InputError(f"--resume: the state's image is {wxh(hw)}, this render's is {wxh(p.out_hw)}")
    if resume.step > p.settings.steps:
        raise InputError(f"--resume: the state is from step {resume.step}, past --steps {p.settings.steps}")


def optimize(p: Prepared, callback: Callback | None = None, t_start: float | None = None,
             stop_rule: StopRule | None = None, start: int = 0) -> Result:
    """Run the steps of a prepared render; ``settings.time_limit`` counts from ``t_start``;
    ``stop_rule`` may end it early at a progress interval; ``start``: the steps already done
    (a resumed render: the loop goes on from there, with the learning rate of that step)."""
    s, stepper, x = p.settings, p.stepper, p.x
    t_start = time.perf_counter() if t_start is None else t_start
    stats = _new_stats(p)
    start = min(start, s.steps)
    hist = torch.full((s.steps - start, 4), float("nan"), device=x.device)  # per step run [total, content, style, tv]
    best = _Best(x)
    scheduled = s.lr_schedule != "constant"
    deadline = None if s.time_limit is None else t_start + s.time_limit
    sync(x.device)
    stats.setup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    pace = _Pace(t0, asynchronous=x.device.type == "cuda")
    done = start
    state = getattr(stepper, "state_dict", None)
    if callback is not None:
        callback(StepInfo(start, s.steps, None, 0.0, x, optimizer_state=state, opening=True))
    try:
        try:
            for i in range(start, s.steps):
                if deadline is not None and i > start and pace.next_done() > deadline:
                    stats.stopped = "time-limit"  # the next step would end past the limit
                    break
                report = i % s.progress_every == 0 or i == s.steps - 1
                if report:
                    best.snap.copy_(x.detach())  # the image this step evaluates
                if scheduled:
                    stepper.set_lr(s.lr_at(i))
                hist[i - start].copy_(stepper.step())
                done = i + 1
                losses = hist[i - start].tolist() if report else None  # host sync: progress interval only
                pace.issued(synced=report)
                if losses is not None:
                    if not all(math.isfinite(v) for v in losses):
                        stats.stopped = "non-finite"
                        break
                    best.offer(losses[0], i, best.snap)
                if callback is not None:
                    callback(StepInfo(done, s.steps, losses, (done - start) / max(time.perf_counter() - t0, 1e-9), x,
                                      optimizer_state=state))
                if losses is not None and stop_rule is not None:
                    why = stop_rule(i, losses[0])  # the loss after i steps (this step evaluated it)
                    if why:
                        stats.stopped, stats.stop_reason = "moved-on", why
                        break
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
    return _result(p, stats, hist, done, best, t_start, start, final)


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


def _result(p: Prepared, stats: RunStats, hist: torch.Tensor, done: int, best: _Best, t_start: float,
            start: int, final: float) -> Result:
    """Fill in the statistics and pick the returned image: the final image (its loss
    ``final``) or the best one seen at a progress interval. A render that cannot go on
    raises, with that image: NonFiniteLossError or RankLostError."""
    stats.capture_s = p.stepper.capture_s
    stats.compile_s = getattr(p.objective, "compile_s", 0.0)  # an objective that compiles says how long
    stats.variant_choice = p.choice.to_dict() if p.choice is not None else None
    stats.steps_run = done - start
    stats.steps_per_s = stats.steps_run / stats.loop_s if stats.loop_s > 0 else 0.0
    h = hist[:done - start].cpu()
    stats.loss, stats.content, stats.style, stats.tv = (h[:, k].tolist() for k in range(4))
    if math.isfinite(final):
        best.offer(final, done, p.x.detach(), ties=True)  # on a tie, the image with more steps
    stats.final_loss, stats.image_from_step = best.loss, best.step
    stats.total_s = time.perf_counter() - t_start
    result = None
    if best.step >= 0:
        image = best.image.detach().float().clamp(0, 1)
        if p.settings.original_colors:
            image = original_colors(image, p.content_img)
        result = Result(image[0].contiguous().cpu(), stats)
    if stats.stopped == "non-finite":
        raise NonFiniteLossError(_nonfinite_message(hist[:done - start], p, best.step, start), result)
    if stats.stopped == "rank-lost":
        kept = f"the best image so far is from step {best.step}" if best.step >= 0 else "no image was reached"
        raise RankLostError(f"{stats.stop_reason}; {kept}", result)
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
