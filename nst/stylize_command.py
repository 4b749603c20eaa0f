"""``nst stylize``: load the images, render, write the image (and intermediates, a GIF,
statistics, the resumable state), and say what happened. The render itself is nst.engine's."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nst.engine.errors import NSTError, RankLostError, RenderFailed
from nst.engine.fsutil import OutputError, atomic_write_text, check_distinct, write_target
from nst.engine.imageio import (GIF_LONG_EDGE, check_gif_path, check_output_path, gif_frame,
                                predict_save_s, save_gif, save_image)
from nst.engine.live import open_live
from nst.engine.loop import StepInfo, chain
from nst.engine.multiscale import render
from nst.engine.plan import resolve_plan
from nst.engine.progress import progress_bar
from nst.engine.ranks import joined, launched_ranks
from nst.engine.signals import STOP_SIGNALS, deferred, stop_signal
from nst.engine.sizes import fit_long_edge
from nst.engine.state import RenderState, describe, fingerprint, load_state, locked, network_sha256, peek, save_state
from nst.engine.summary import diagnose, outcome_lines, schedule_lines

from .inputs import load_inputs
from .jobs import StylizeJob


class Keeper:
    """A loop callback that writes ``OUT-stem_NNNNN.ext`` every ``save_every`` steps and
    collects GIF frames every ``gif_every`` steps (numbered over all scales)."""

    def __init__(self, out: Path, save_every: int, gif_hw: tuple[int, int] | None, gif_every: int):
        self.out, self.save_every = out, save_every
        self.gif_hw, self.gif_every = gif_hw, gif_every
        self.frames = []

    def __call__(self, info: StepInfo) -> None:
        if info.opening or info.closing:
            return  # a scale's start (its image was saved, if due, as the last scale's end), or a stop
        n = info.render_step
        save = self.save_every and n % self.save_every == 0
        frame = self.gif_hw is not None and n % self.gif_every == 0
        if save or frame:
            image = info.image()  # host sync: only at the steps that write
            if save:
                save_image(image, self.out.with_name(f"{self.out.stem}_{n:05d}{self.out.suffix}"))
            if frame:
                self.frames.append(gif_frame(image, self.gif_hw))

    def write_gif(self, path: str, final) -> str:
        """End on the image that was written (held 2 s), then write the GIF."""
        last = gif_frame(final, self.gif_hw)
        if not self.frames or last.tobytes() != self.frames[-1].tobytes():
            self.frames.append(last)
        save_gif(self.frames, path)
        return f"wrote {path} ({len(self.frames)} frames, {self.gif_hw[1]}x{self.gif_hw[0]})"


class StateKeeper:
    """A loop callback that rewrites the --state file at every progress interval and at a
    stop (a signal, the live page's stop, --time-limit, a lost rank): the scale, the step,
    the image, the optimiser's state and the scale's record (engine/state.py)."""

    def __init__(self, path: str, print_: dict):
        self.path, self.print = path, print_
        self.failed = False
        self.last: RenderState | None = None  # the state written last

    def __call__(self, info: StepInfo) -> None:
        if info.record is None or info.optimizer_state is None or not (info.losses is not None or info.closing):
            return
        rec = info.record()  # host sync: progress interval
        state = RenderState(info.scale_index, info.step, info.before, info.x.detach().float().cpu(),
                            info.optimizer_state(), self.print, rec["first_loss"], rec["best_loss"], rec["best_step"],
                            rec["best_image"])
        try:
            with deferred():  # a stop signal waits for the file: the previous state stays whole until it is
                save_state(self.path, state)
            self.last = state
        except OutputError as e:  # a full disk must not end the render: the image still matters more
            if not self.failed:
                print(f"nst: warning: {e}; the render goes on (the previous state file, if any, is whole)",
                      file=sys.stderr)
            self.failed = True

    def resume_note(self) -> str:
        """Where --resume continues from, after a stop."""
        st = self.last
        if st is None:
            return ""
        at = describe({"scale": st.scale_index, "step": st.step, "before": st.before})
        held = "" if st.best_image is None else (f"; the state holds the image after {at}, the render's current one, "
                                                 "not the best image written, and keeps that one for the end")
        return f"; --resume --state {self.path} continues from {at}{held}"


def save_final(image, out: Path) -> None:
    """Write the render's image; held signals wait for it. If it cannot be written where
    asked (a full disk...), it is written to the temporary directory and the error says where."""
    with deferred():
        try:
            save_image(image, out)
        except OutputError as e:
            rescue = Path(tempfile.gettempdir()) / f"nst-rescued-{os.getpid()}{out.suffix}"
            try:
                save_image(image, rescue)
            except NSTError:
                raise NSTError(f"{e}; the image could not be written anywhere") from None
            raise NSTError(f"{e}; the rendered image was written to {rescue} instead") from None


def stopped_early(st) -> tuple[str, int] | None:
    """(the line that says a render stopped early, its exit status), or None: a signal
    exits 128 + its number, --time-limit 0. Shared with ``nst demo``."""
    if st.stopped not in ("time-limit", "interrupted"):
        return None
    signum = stop_signal() or signal.SIGINT
    why = "the time limit was reached" if st.stopped == "time-limit" else \
        f"interrupted by {signal.Signals(signum).name}"
    done = st.resumed_from + st.steps_run
    line = (f"nst: stopped early ({why}) after {done} of {st.steps_planned} steps; wrote the best image so far "
            f"(after {st.image_from_step} steps)")
    return line, (128 + signum if st.stopped == "interrupted" else 0)


def _report(result, settings, out: Path, t_start: float, ranks, saver: StateKeeper | None) -> int:
    st = result.stats
    for line in outcome_lines(st, settings, time.perf_counter() - t_start):
        print(line)
    h, w = st.size
    random = "; seeded random weights, NOT a trained network" if st.weights.startswith("random") else ""
    tiles = f"{st.tile} px tiles" if st.tile else "untiled"
    where = (f" across {ranks.world} rank{'s' if ranks.world > 1 else ''}, {tiles}" if ranks is not None
             else f", {tiles}" if st.tile else "")
    loss = f"loss {st.loss[0]:.4g} -> {st.final_loss:.4g}" if st.loss else f"loss {st.final_loss:.4g}"
    print(f"wrote {out} ({w}x{h}, {st.steps_run} steps, {loss}, "
          f"{st.steps_per_s:.2f} steps/s on {st.device} {st.precision} {st.path} path{where}{random})")
    early = stopped_early(st)
    if early is None:
        return 0
    line, code = early
    print(line + (saver.resume_note() if saver is not None else ""), file=sys.stderr)
    return code


def _distributed(job: StylizeJob) -> StylizeJob:
    """--distributed as the launch decides it: on under torchrun with two or more ranks
    (unless refused), off otherwise; --no-distributed under such a launch is refused."""
    world, asked = launched_ranks(), job.settings.distributed
    if asked is False and world > 1:
        raise NSTError(f"--no-distributed, but launched with {world} ranks (WORLD_SIZE): every rank would render the "
                       "whole image and write the same files; launch one process without torchrun, or leave "
                       "--no-distributed out to share the tiles")
    try:
        on = bool(asked or world > 1)
        return dataclasses.replace(job, settings=dataclasses.replace(job.settings, distributed=on))
    except NSTError as e:
        raise NSTError(f"launched with {world} ranks (WORLD_SIZE), which turns --distributed on: {e}") from None


def stylize_command(job: StylizeJob, quiet: bool, t_start: float, recipe: str | None = None) -> int:
    """Run ``nst stylize``; ``t_start`` is when a --time-budget's clock started; ``recipe``
    names the --recipe the settings came from, if any. Under torchrun (--distributed) rank 0
    renders and writes; the other ranks compute their tiles (engine/ranks.py). Before the
    first step every rank checks what it can, and the ranks agree that they render the
    same thing (``Ranks.agree``), or all refuse."""
    job = _distributed(job)
    if not job.settings.distributed:
        with contextlib.ExitStack() as stack:
            setup = _setup(job, stack, t_start, lead=True, ranks=False)
            return _render_job(job, setup, quiet, t_start, recipe, None)
    with joined(resolve_plan(job.settings).device, job.settings.rank_timeout) as ranks, \
            contextlib.ExitStack() as stack:
        setup, failure = None, None
        try:
            setup = _setup(job, stack, t_start, lead=ranks.lead, ranks=True)
        except NSTError as e:  # every rank gets to the agreement, so that none waits for another
            failure = e
        ranks.agree(setup.print if setup is not None else None, failure)
        if ranks.lead:
            return _render_job(job, setup, quiet, t_start, recipe, ranks)
        return _work(job, setup)


@dataclass
class _Setup:
    """What a render has opened and read before any work."""

    out: Path | None = None
    live: object = None
    content: object = None
    styles: list | None = None
    init: object = None
    extractor: object = None  # loaded here when the fingerprint needs the network's hash
    print: dict | None = None  # engine/state.py fingerprint, with the network's hash
    resume: RenderState | None = None


def _setup(job: StylizeJob, stack: contextlib.ExitStack, t_start: float, lead: bool, ranks: bool) -> _Setup:
    """Everything that can be refused, before any work: on the lead the output paths (none
    may be an input or another output), the state file (its lock, and not replacing one
    unasked) and the live page's port; on every rank the inputs, and the fingerprint of
    what it renders when the ranks or a state need one."""
    setup = _Setup()
    if lead:
        setup.out = check_output_path(job.output)
        for label, path in (("--stats", job.stats), ("--state", job.state)):
            if path:
                write_target(path, label)
        if job.gif:
            check_gif_path(job.gif)
        check_distinct(*job.files())
        if job.state:
            stack.enter_context(locked(job.state))
            _check_state_overwrite(job)
        setup.live = stack.enter_context(open_live(job.serve, job.progress, job.settings, t_start))
    setup.content, setup.styles, setup.init = load_inputs(job)
    if ranks or job.state:
        from nst.engine.loader import extractor_for

        setup.extractor = extractor_for(job.settings)
        setup.print = fingerprint(job.settings, setup.content, setup.styles, network_sha256(setup.extractor))
    if lead and job.resume:
        setup.resume = load_state(job.state, setup.print)
    return setup


def _check_state_overwrite(job: StylizeJob) -> None:
    """A new render (no --resume) does not replace saved progress unless asked."""
    path = Path(job.state)
    if job.resume or job.overwrite_state or not path.exists() or path.stat().st_size == 0:
        return
    d = peek(path)
    what = f"the saved state of a render, at {describe(d)}" if d else "a file that is not an nst render state"
    raise OutputError(f"--state {job.state} exists ({what}): --resume continues it; --overwrite-state starts again "
                      "and replaces it")


def _work(job: StylizeJob, setup: _Setup) -> int:
    """A worker rank: the same inputs as the lead, then its share of every step. It ignores
    stop signals: it leaves when the lead says so (the lead stops on them and still needs
    the workers for its last evaluation) or when the lead is lost."""
    from nst.engine.worker import serve

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    logging.getLogger("nst").setLevel(logging.ERROR)  # the lead reports; warnings once, not once per rank
    try:
        serve(setup.content, setup.styles, job.settings, extractor=setup.extractor)
    except RankLostError as e:
        if job.state:
            raise RankLostError(f"{e}; the lead's last progress interval is in its --state {job.state}: --resume "
                                "continues") from None
        raise
    return 0


def _render_job(job: StylizeJob, setup: _Setup, quiet: bool, t_start: float, recipe: str | None, ranks) -> int:
    settings, out, live = job.settings, setup.out, setup.live
    content = setup.content
    saver = StateKeeper(job.state, setup.print) if job.state else None
    if setup.resume is not None:
        r = setup.resume
        print(f"resuming {job.state} from {describe({'scale': r.scale_index, 'step': r.step, 'before': r.before})} "
              f"(of {settings.steps} steps{' per scale' if len(settings.scale_sizes()) > 1 else ''})")
    final_hw = settings.output_hw(tuple(content.shape[-2:]))
    gif_hw = fit_long_edge(final_hw, min(GIF_LONG_EDGE, max(final_hw))) if job.gif else None
    keeper = Keeper(out, job.save_every, gif_hw, job.gif_every or max(1, settings.steps // 50))
    # A budget ends with the image written: plan the writing too.
    write_s = predict_save_s(content, final_hw, out) if settings.time_budget is not None else 0.0

    def on_schedule(schedule, outcomes) -> None:
        for line in schedule_lines(schedule, settings, write_s, time.perf_counter() - t_start):
            print(line)
        if live.on_schedule is not None:
            live.on_schedule(schedule, outcomes)

    try:
        with progress_bar(not quiet) as bar:
            result = render(content, setup.styles, settings, extractor=setup.extractor, init=setup.init,
                            callback=chain(bar, keeper, saver, live.callback), t_start=t_start,
                            on_schedule=on_schedule, write_s=write_s, resume=setup.resume)
    except RenderFailed as e:  # the loss diverged or a rank was lost: its best image is still written
        if ranks is not None:
            ranks.stop_workers()
        if e.result is not None:
            save_final(e.result.image, out)
            where = f"wrote it to {out}" + (saver.resume_note() if saver is not None else "")
            raise type(e)(f"{e}; {where}") from None
        raise
    if ranks is not None:
        ranks.stop_workers()  # the workers are done: they need not wait while the image is written
    save_final(result.image, out)
    live.close(f"wrote {out}")
    if job.gif:
        print(keeper.write_gif(job.gif, result.image))
    if job.stats:
        atomic_write_text(job.stats, json.dumps(result.stats.to_dict(), indent=1) + "\n")
    code = _report(result, settings, out, t_start, ranks, saver)
    found = diagnose(result.stats, settings, recipe, where=str(out))
    if found is not None and found.diverged:
        raise NSTError(found.text)
    if found is not None:
        print(f"nst: note: {found.text}", file=sys.stderr)
    return code
