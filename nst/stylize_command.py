"""``nst stylize``: load the images, render, write the image (and intermediates, a GIF,
statistics), and say what happened. The render itself is nst.engine's."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from nst.engine.errors import NSTError, RankLostError, RenderFailed
from nst.engine.plan import resolve_plan
from nst.engine.ranks import joined, launched_ranks
from nst.engine.fsutil import OutputError, atomic_write_text, write_target
from nst.engine.live import open_live
from nst.engine.imageio import (GIF_LONG_EDGE, check_gif_path, check_output_path, gif_frame,
                                predict_save_s, save_gif, save_image)
from nst.engine.loop import StepInfo, chain
from nst.engine.multiscale import render
from nst.engine.progress import progress_bar
from nst.engine.signals import STOP_SIGNALS, deferred, stop_signal
from nst.engine.sizes import fit_long_edge
from nst.engine.state import RenderState, fingerprint, load_state, save_state
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
        if info.opening:
            return  # a scale's start: its image was saved (if due) as the last scale's end
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
    """A loop callback that rewrites the --state file at every progress interval: the scale,
    the step, the image and the optimiser's state (engine/state.py)."""

    def __init__(self, path: str, print_: dict):
        self.path, self.print = path, print_
        self.failed = False

    def __call__(self, info: StepInfo) -> None:
        if info.losses is None or info.optimizer_state is None:
            return
        state = RenderState(info.scale_index, info.step, info.before, info.x.detach().cpu(),  # host sync: progress interval
                            info.optimizer_state(), self.print)
        try:
            with deferred():  # a stop signal waits for the file: the previous state stays whole until it is
                save_state(self.path, state)
        except OutputError as e:  # a full disk must not end the render: the image still matters more
            if not self.failed:
                print(f"nst: warning: {e}; the render goes on (the previous state file, if any, is whole)",
                      file=sys.stderr)
            self.failed = True


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


def _report(result, settings, out: Path, t_start: float) -> int:
    st = result.stats
    for line in outcome_lines(st, settings, time.perf_counter() - t_start):
        print(line)
    h, w = st.size
    random = "; seeded random weights, NOT a trained network" if st.weights.startswith("random") else ""
    loss = f"loss {st.loss[0]:.4g} -> {st.final_loss:.4g}" if st.loss else f"loss {st.final_loss:.4g}"
    print(f"wrote {out} ({w}x{h}, {st.steps_run} steps, {loss}, "
          f"{st.steps_per_s:.2f} steps/s on {st.device} {st.precision} {st.path} path{random})")
    if st.stopped in ("time-limit", "interrupted"):
        signum = stop_signal() or signal.SIGINT
        why = "the time limit was reached" if st.stopped == "time-limit" else \
            f"interrupted by {signal.Signals(signum).name}"
        print(f"nst: stopped early ({why}) after {st.steps_run} of {st.steps_planned} steps; "
              f"wrote the best image so far (after {st.image_from_step} steps)", file=sys.stderr)
        return 128 + signum if st.stopped == "interrupted" else 0
    return 0


def stylize_command(job: StylizeJob, quiet: bool, t_start: float, recipe: str | None = None) -> int:
    """Run ``nst stylize``; ``t_start`` is when a --time-budget's clock started; ``recipe``
    names the --recipe the settings came from, if any. Under torchrun (--distributed) rank 0
    renders and writes; the other ranks compute their tiles (engine/ranks.py)."""
    if not job.settings.distributed and launched_ranks() > 1:
        try:
            job = dataclasses.replace(job, settings=dataclasses.replace(job.settings, distributed=True))
        except NSTError as e:
            raise NSTError(f"launched with {launched_ranks()} ranks (WORLD_SIZE), which turns --distributed on: "
                           f"{e}") from None
    if not job.settings.distributed:
        return _stylize(job, quiet, t_start, recipe)
    with joined(resolve_plan(job.settings).device, job.settings.rank_timeout) as ranks:
        if ranks.lead:
            return _stylize(job, quiet, t_start, recipe, ranks)
        return _work(job)


def _work(job: StylizeJob) -> int:
    """A worker rank: the same inputs as the lead, then its share of every step. It ignores
    stop signals: it leaves when the lead says so (the lead stops on them and still needs
    the workers for its last evaluation) or when the lead is lost."""
    from nst.engine.worker import serve

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    logging.getLogger("nst").setLevel(logging.ERROR)  # the lead reports; warnings once, not once per rank
    content, styles, _ = load_inputs(job)
    try:
        serve(content, styles, job.settings)
    except RankLostError as e:
        if job.state:
            raise RankLostError(f"{e}; the lead's last progress interval is in its --state {job.state}: --resume "
                                "continues") from None
        raise
    return 0


def _stylize(job: StylizeJob, quiet: bool, t_start: float, recipe: str | None, ranks=None) -> int:
    # Everything that can be refused is refused before any work: output paths, the live
    # page's port, the inputs.
    out = check_output_path(job.output)
    if job.stats:
        write_target(job.stats, "--stats")
    if job.gif:
        check_gif_path(job.gif)
    if job.state and not job.resume:
        write_target(job.state, "--state")
    live = open_live(job.serve, job.progress, job.settings, t_start)
    with live:
        return _render_job(job, quiet, t_start, recipe, ranks, out, live)


def _render_job(job: StylizeJob, quiet: bool, t_start: float, recipe: str | None, ranks, out: Path, live) -> int:
    settings = job.settings
    content, styles, init = load_inputs(job)
    print_ = fingerprint(settings, content, styles) if job.state else None
    resume = load_state(job.state, print_) if job.resume else None
    saver = StateKeeper(job.state, print_) if job.state else None
    final_hw = settings.output_hw(tuple(content.shape[-2:]))
    gif_hw = fit_long_edge(final_hw, min(GIF_LONG_EDGE, max(final_hw))) if job.gif else None
    keeper = Keeper(out, job.save_every, gif_hw, job.gif_every or max(1, settings.steps // 50))
    # A budget ends with the image written: plan the writing too.
    write_s = predict_save_s(content, final_hw, out) if settings.time_budget is not None else 0.0

    def on_schedule(schedule, outcomes) -> None:
        for line in schedule_lines(schedule, settings, write_s):
            print(line)
        if live.on_schedule is not None:
            live.on_schedule(schedule, outcomes)

    try:
        with progress_bar(not quiet) as bar:
            result = render(content, styles, settings, init=init, callback=chain(bar, keeper, saver, live.callback),
                            t_start=t_start, on_schedule=on_schedule, write_s=write_s, resume=resume)
    except RenderFailed as e:  # the loss diverged or a rank was lost: its best image is still written
        if ranks is not None:
            ranks.stop_workers()
        if e.result is not None:
            save_final(e.result.image, out)
            where = f"wrote it to {out}" + (f"; --resume --state {job.state} continues" if job.state else "")
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
    code = _report(result, settings, out, t_start)
    diagnosis = diagnose(result.stats, settings, recipe, where=str(out))
    if diagnosis:
        raise NSTError(diagnosis)
    return code
