"""Signals: SIGTERM and SIGHUP stop a render as Ctrl-C does, and a second signal does not
cut short the writing of the image.

The command line calls ``stop_on_signals()`` once; a library user keeps Python's own
Ctrl-C handling. Either way the loop treats the resulting ``KeyboardInterrupt`` as a stop:
it returns the best image so far (engine/loop.py).
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
