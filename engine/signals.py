"""Signals: SIGTERM and SIGHUP stop a render as Ctrl-C does, and a second signal does not
cut short the writing of the image.

The command line calls ``stop_on_signals()`` once; a library user keeps Python's own
Ctrl-C handling. Either way the loop treats the resulting ``KeyboardInterrupt`` as a stop:
it returns the best image so far (engine/loop.py).

A stop between the steps, not inside an update: the loop runs each step in a
``step_boundary``; a stepper calls ``updating()`` when its evaluation is done and its update
(the optimiser's state and the image) begins, and a stop signal from then on waits for the
boundary, so that the step is whole and counted (the state a graceful stop writes, --state,
is then the state after a whole number of steps). A signal during the evaluation, the long
part of a step, stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
_received: list[int] = []


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP), raised where the main thread is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held = [0]  # depth of deferred() blocks in progress
_pending: list[int] = []  # a first signal that arrived inside one, raised when it ends


def _handler(signum, frame):
    _received.append(signum)
    if len(_received) == 1:
        if _held[0]:
            # Another thread took the signal (a thread's mask is its own: torch's and gloo's
            # threads do not block it); the main thread raises it when the block ends.
            _pending.append(signum)
            return
        raise Stopped(signum)  # the first stops the render; the image is still written
    if len(_received) == 2:
        print("nst: stopping: writing the image (a third signal quits at once, without it)", file=sys.stderr)
        return
    os._exit(128 + signum)


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise ``Stopped`` (a KeyboardInterrupt); a second one is
    noted and ignored while the image is written; a third quits at once."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _handler)


def stop_signal() -> int | None:
    """The signal that stopped the process, if one did."""
    return _received[0] if _received else None


class Boundary:
    """One step of the loop (``step_boundary``): ``updating`` is set once the stepper began
    its update; ``torn`` when an exception went through the block after that (with this
    module's handler a stop signal cannot: the update may be partial)."""

    def __init__(self):
        self.updating = False
        self.torn = False


_boundaries: list[Boundary] = []  # the open step boundaries (the loop's), innermost last


@contextlib.contextmanager
def step_boundary():
    """One step of the loop: a stop signal that arrives once the stepper has called
    ``updating()`` is raised when the block ends, after the step was counted."""
    b = Boundary()
    main = threading.current_thread() is threading.main_thread()
    if main:
        _boundaries.append(b)
    try:
        yield b
    except BaseException:
        # Raised inside the update (a Ctrl-C handler other than this module's, or an error):
        # the optimiser's state and the image may be partly updated.
        b.torn = b.updating
        raise
    finally:
        if main:
            _boundaries.pop()
            if b.updating:
                _held[0] -= 1
    if b.updating and not _held[0] and _pending:
        raise Stopped(_pending.pop())


def updating() -> None:
    """Called by a stepper when its update begins (engine/steppers.py): from here to the
    end of the loop's step a stop signal waits (outside a loop's step, nothing changes)."""
    if _boundaries and not _boundaries[-1].updating and threading.current_thread() is threading.main_thread():
        _boundaries[-1].updating = True
        _held[0] += 1


@contextlib.contextmanager
def deferred():
    """Hold the stop signals until the block ends (they are delivered then), so that a file
    being written is complete, or every rank's collective is done (engine/tiles.py), before
    a signal can interrupt anything. Blocked in this thread; one taken by another thread
    is held by the handler (``stop_on_signals``) until the block ends."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if main and hasattr(signal, "pthread_sigmask") \
        else None
    _held[0] += 1
    try:
        yield
    finally:
        _held[0] -= 1
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a signal blocked meanwhile is raised here
    if not _held[0] and _pending:
        raise Stopped(_pending.pop())
