"""Watch a render as it forms (issue #28): a loop callback that publishes the render's
progress to a live page (``--serve [HOST:]PORT``) and/or a progress file (``--progress
FILE``), and a follower that shows a progress file's render on the same page (``nst watch``).

The render thread's share, at each progress interval and at each scale's start only: the
image downscaled on the device (long edge <= ``PREVIEW_EDGE``) and copied off as uint8, a
small dict of numbers, and one hand-over into a latest-value slot (a lock held for an
assignment). Everything else runs on other threads: one encoder thread PNG-encodes each
update once (not once per client) and hands it to the server's Hub and the progress file's
writer; the server (engine/live_server.py) has one thread per client. A slow, stalled or
gone client, or a stalled disk, never makes the render thread wait. The full-size image
is copied off only when a page asks for it, at the next progress interval.

The stop button delivers SIGINT to the main thread, so that a stop is exactly a Ctrl-C
(engine/signals.py; the loop keeps the best image, the command line writes it and the
state, and exits 130).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .fsutil import OutputError, write_target
from .live_page import PAGE
from .live_server import Hub, LiveServer
from .loop import StepInfo

PREVIEW_EDGE = 512  # long edge of the image pushed at each update (px)
FORMAT = "nst-progress-1"  # the first key of every progress-file line


def image_array(x: torch.Tensor, edge: int | None = PREVIEW_EDGE) -> np.ndarray:
    """(1, 3, H, W) on any device -> (h, w, 3) uint8 on the CPU, downscaled on the device
    (area average) to a long edge of at most ``edge`` (None: full size) before the copy."""
    with torch.no_grad():
        t = x.detach()
        if t.device.type == "cpu" and t.dtype != torch.float32:
            t = t.float()  # CPU half-precision interpolation is not everywhere
        h, w = t.shape[-2:]
        if edge is not None and max(h, w) > edge:
            s = edge / max(h, w)
            t = F.interpolate(t, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
        # (3, h, w), still on the device; + 0.5 then truncation rounds (torch.round on the CPU
        # took ~10 ms on a 64 px image with 2 threads, 2.14; this takes ~40 us)
        t = t[0].float().clamp(0, 1).mul_(255).add_(0.5).to(torch.uint8)  # clamp: a new tensor, x untouched
        return t.permute(1, 2, 0).contiguous().cpu().numpy()  # host sync: the progress interval's


def encode_png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", compress_level=1)  # fast: the page wants it now, not small
    return buf.getvalue()


class _Slot:
    """From one producer to one consumer thread: the newest value (an older one not yet
    taken is replaced), the extras of every put in order, and an end mark. ``put`` holds
    the lock for assignments only and never waits for the consumer."""

    def __init__(self):
        self._lock, self._ready = threading.Lock(), threading.Event()
        self._value, self._extras, self._end = None, [], None

    def put(self, value=None, extra=None, end: str | None = None) -> None:
        with self._lock:
            if value is not None:
                self._value = value
            if extra is not None:
                self._extras.append(extra)
            if end is not None:
                self._end = end
        self._ready.set()

    def take(self, timeout: float):
        """(newest value or None, extras, end mark or None), after waiting up to ``timeout``."""
        self._ready.wait(timeout)
        with self._lock:
            self._ready.clear()
            out = self._value, self._extras, self._end
            self._value, self._extras = None, []
        return out


class _FullImage:
    """The full-size image, copied off only when a page has asked for it: a server thread
    asks (``get``) and waits; the render thread, at its next progress interval, sees the
    request (an Event, no lock) and copies the image. Encoded once per copy."""

    def __init__(self):
        self.wanted = threading.Event()
        self._cond, self._encode = threading.Condition(), threading.Lock()
        self._array, self._seq, self._png, self._png_seq, self.closed = None, 0, b"", -1, False

    def offer(self, x: torch.Tensor) -> None:
        """The render thread, at a progress interval."""
        if not self.wanted.is_set():
            return
        self.wanted.clear()
        a = image_array(x, None)
        with self._cond:
            self._array, self._seq = a, self._seq + 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def get(self, timeout: float) -> bytes | None:
        """A server thread: the full-size PNG of the next progress interval (None if none came)."""
        with self._cond:
            seen = self._seq
            self.wanted.set()
            if not self._cond.wait_for(lambda: self._seq > seen or self.closed, timeout) or self._seq == seen:
                return None
            a, seq = self._array, self._seq
        with self._encode:  # however many pages asked, each copy is encoded once
            if self._png_seq != seq:
                self._png, self._png_seq = encode_png(a), seq
            return self._png


def interrupt_main() -> None:
    """A Ctrl-C: SIGINT to the main thread (held there while engine/signals.py defers
    signals, as a real Ctrl-C is)."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGINT)


def _can_interrupt() -> bool:
    """Whether the stop button can be a Ctrl-C: SIGINT reaches Python code (not ignored,
    not the default that kills the process), and the render runs on the main thread, where
    Python raises it (assumed from where the page is opened)."""
    return threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT))


class Publisher:
    """The loop callback (``callback=``) and the schedule hook (``on_schedule=``, engine/multiscale.py):
    at each progress interval and each scale's start, the numbers and the downscaled image
    into the slot. ``spent`` holds the render thread's seconds per call (the page's cost)."""

    def __init__(self, slot: _Slot, full: _FullImage | None, settings, t_start: float, edge: int = PREVIEW_EDGE):
        from .ranks import launched_ranks

        self.slot, self.full, self.settings, self.t_start, self.edge = slot, full, settings, t_start, edge
        self.plans, self.outcomes, self.t_plan, self.tiles = None, None, None, None
        self.world = launched_ranks() if settings is not None and settings.distributed else 1
        self.spent: collections.deque[float] = collections.deque(maxlen=100_000)

    def on_schedule(self, schedule, outcomes) -> None:
        """The scales' schedule and outcomes (engine/budget.py ScaleSchedule and
        engine/multiscale.py ScaleOutcome lists; read again at every update: the render
        re-plans the schedule and fills the outcomes in as it goes)."""
        self.plans, self.outcomes, self.t_plan = schedule, outcomes, time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        if info.losses is None and not info.opening:
            return
        t0 = time.perf_counter()
        if info.opening:
            self.tiles = _tile_info(self.settings, tuple(info.x.shape[-2:]), self.world)
        numbers = self._numbers(info, t0)
        point = None if info.losses is None else [info.render_step - 1, *info.losses, info.scale_index]
        a = image_array(info.x, self.edge)
        numbers["image_hw"] = list(a.shape[:2])
        self.slot.put(a, (numbers, point))  # the newest image; every update's numbers, in order
        if self.full is not None:
            self.full.offer(info.x)
        self.spent.append(time.perf_counter() - t0)

    def _numbers(self, info: StepInfo, now: float) -> dict:
        ladder = self._ladder(info)
        planned = sum(sc["steps"] for sc in ladder)
        budget = None
        if self.settings is not None and self.settings.time_budget is not None:
            from .budget import budget_margin

            b = self.settings.time_budget
            budget = {"budget_s": b, "margin_s": budget_margin(b),
                      "calibration_s": None if self.t_plan is None else self.t_plan - self.t_start}
        return {"status": "running", "step": info.render_step, "steps_planned": planned, "scale": info.scale_index,
                "scale_step": info.step, "scale_steps": info.steps, "steps_per_s": info.steps_per_s,
                "losses": info.losses, "hw": list(info.x.shape[-2:]), "elapsed_s": now - self.t_start,
                "time": time.time(), "ladder": ladder, "budget": budget, "ranks": self.tiles,
                "device": str(info.x.device)}

    def _ladder(self, info: StepInfo) -> list[dict]:
        if not self.plans:
            h, w = info.x.shape[-2:]
            return [{"size": max(h, w), "hw": [h, w], "steps": info.steps, "planned_s": None, "actual_s": None,
                     "steps_run": None}]
        out = []
        now = info.scale_index
        for k, (sc, done) in enumerate(zip(self.plans, self.outcomes)):
            steps = info.steps if k == now else (done.steps_run if k < now else sc.steps)
            out.append({"size": sc.size, "hw": list(sc.hw), "steps": steps,
                        "planned_steps": sc.initial_steps or sc.steps,
                        "planned_s": (sc.initial_planned_s or sc.planned_s) or None,
                        "actual_s": done.actual_s if k < now else None,
                        "steps_run": done.steps_run if k < now else None,
                        "step_s": sc.cost.step_s or None, "why": done.why or None})
        return out


def _tile_info(settings, hw: tuple[int, int], world: int) -> dict | None:
    """Ranks and tiles where the settings fix them (--tile, --distributed); None when the
    memory plan decides alone (it may still tile a render too large for the device)."""
    if settings is None or (not settings.tile and world <= 1):
        return None
    from .tiling import rank_tile, tiles_for

    taps, net = settings.taps(), settings.network
    tile = settings.tile or rank_tile(hw, world, taps, net)
    n = len(tiles_for(hw, tile, taps, net))
    return {"world": world, "tile": tile, "tiles": n, "per_rank": [len(range(r, n, world)) for r in range(world)]}


class _Encoder(threading.Thread):
    """Takes the render's updates from the slot, encodes each image once and hands the
    result to the page's Hub and the progress file. Ends at the slot's end mark."""

    def __init__(self, slot: _Slot, hub: Hub | None, sink: ProgressFile | None, run_info: dict):
        super().__init__(name="nst-live-encoder", daemon=True)
        self.slot, self.hub, self.sink, self.run_info = slot, hub, sink, run_info
        self.last: dict = {}

    def run(self) -> None:
        while True:
            a, updates, end = self.slot.take(1.0)
            if a is not None or updates:
                self._publish(a, updates)
            if end is not None:
                self._publish(None, [(dict(self.last, status="ended", note=end), None)])
                if self.hub is not None:
                    self.hub.close(end)
                if self.sink is not None:
                    self.sink.close()
                return

    def _publish(self, a: np.ndarray | None, updates: list) -> None:
        """One Hub update (the newest state, every new point, the newest image encoded once)
        and one progress-file line per update."""
        png = encode_png(a) if a is not None else None
        lines, points = [], []
        for numbers, point in updates:
            self.last = {**self.run_info, **numbers}
            pts = [] if point is None else [json.dumps(point)]
            lines.append((json.dumps(self.last), pts))
            points += pts
        text = lines[-1][0] if lines else json.dumps(self.last)
        if self.hub is not None:
            self.hub.update(text, points, png)
        if self.sink is not None:
            self.sink.offer(lines, png)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it there (no fsync: a preview, rewritten often)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ProgressFile(threading.Thread):
    """``--progress FILE``: one JSON line per update ({"format", "points", "state"}), and
    FILE.png beside it (rewritten atomically). Its own thread writes: a slow disk delays
    the file, never the render; a failed write is said once and the render goes on."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(name="nst-progress-file", daemon=True)
        self.path = write_target(path, "--progress")
        self.image_path = write_target(f"{path}.png", "--progress (its image)")
        try:
            self.f = open(self.path, "w", encoding="utf-8")  # a new render: the file starts again
        except OSError as e:
            raise OutputError(f"--progress {path}: cannot write it ({e.strerror or e})") from None
        self.slot, self.failed = _Slot(), False
        self.start()

    def offer(self, lines: list[tuple[str, list[str]]], png: bytes | None) -> None:
        """(state JSON, point JSONs) per line, and the newest image (None: unchanged)."""
        for line in lines:
            self.slot.put(extra=line)
        self.slot.put(png)

    def close(self) -> None:
        self.slot.put(end="")

    def run(self) -> None:
        while True:
            png, lines, end = self.slot.take(1.0)
            try:
                for state_json, points in lines:
                    self.f.write(f'{{"format":"{FORMAT}","points":[{",".join(points)}],"state":{state_json}}}\n')
                self.f.flush()
                if png is not None:
                    _write_atomic(self.image_path, png)
            except OSError as e:
                if not self.failed:
                    print(f"nst: warning: --progress {self.path}: {e.strerror or e}; the render goes on",
                          file=sys.stderr)
                self.failed = True
            if end is not None:
                with contextlib.suppress(OSError):
                    self.f.close()
                return


class Live:
    """A render's live page and/or progress file: ``callback`` and ``on_schedule`` go to the
    render (None when neither was asked for); ``close(note)`` ends them (idempotent)."""

    def __init__(self, server: LiveServer | None, sink: ProgressFile | None, publisher: Publisher | None,
                 encoder: _Encoder | None, full: _FullImage | None):
        self.server, self.sink, self.publisher, self.encoder, self.full = server, sink, publisher, encoder, full
        self.callback = publisher
        self.on_schedule = publisher.on_schedule if publisher is not None else None
        self.url = server.url if server is not None else None
        self._closed = False

    def close(self, note: str = "the render ended") -> None:
        if self._closed:
            return
        self._closed = True
        if self.full is not None:
            self.full.close()
        if self.encoder is not None:
            self.encoder.slot.put(end=note)
            self.encoder.join(5.0)  # after the render: the last line and the page's "ended"
        if self.sink is not None:
            self.sink.join(5.0)
        if self.server is not None:
            self.server.close(note)

    def __enter__(self) -> Live:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.close("stopped" if issubclass(kind, KeyboardInterrupt) else "the render failed")


def _say(line: str) -> None:
    print(line, flush=True)  # at once, also into a pipe: a script may be waiting for the URL


def open_live(serve: str | None = None, progress: str | os.PathLike | None = None, settings=None,
              t_start: float | None = None, announce=_say) -> Live:
    """Start what ``--serve [HOST:]PORT`` and ``--progress FILE`` ask for, before any work:
    a port in use or a progress file that cannot be written is an InputError here. The
    page's URL (with its token) goes to ``announce``. ``t_start``: the budget's clock."""
    t_start = time.perf_counter() if t_start is None else t_start
    if serve is None and progress is None:
        return Live(None, None, None, None, None)
    hub = Hub() if serve is not None else None
    full = _FullImage() if serve is not None else None
    can_stop = _can_interrupt()
    server = None
    if serve is not None:
        server = LiveServer(serve, hub, PAGE, full=full.get, stop=interrupt_main if can_stop else None)
    try:
        sink = ProgressFile(progress) if progress is not None else None
    except InputError:
        if server is not None:
            server.close()
        raise
    slot = _Slot()
    run_info = _run_info(settings, can_stop and server is not None)
    encoder = _Encoder(slot, hub, sink, run_info)
    encoder.start()
    if server is not None:
        _announce(server, announce)
    if sink is not None:
        announce(f"nst: progress: {sink.path} (and {sink.image_path.name}); follow it with: nst watch {sink.path}")
    return Live(server, sink, Publisher(slot, full, settings, t_start), encoder, full)


def _run_info(settings, can_stop: bool) -> dict:
    weights = getattr(settings, "weights", "") or ""
    return {"kind": "render", "run": secrets.token_hex(6), "can_stop": can_stop, "weights": weights,
            "random_weights": weights.startswith("random"),
            "time_budget": getattr(settings, "time_budget", None),
            "term_weights": [getattr(settings, k, 1.0) for k in ("content_weight", "style_weight", "tv_weight")]}


def _announce(server: LiveServer, announce, watching: bool = False) -> None:
    urls = server.urls
    more = f" (on this machine: {urls[1]})" if len(urls) > 1 else ""
    announce(f"nst: live page: {urls[0]}{more}")
    if server.explicit and server.host not in ("127.0.0.1", "localhost", "::1"):
        can = "watch" if watching else "watch and stop"
        announce(f"nst: the page listens on {server.host}:{server.port}: whoever has the URL, token included, "
                 f"can {can} the render")
    if server.stop_fn is None and not watching:
        announce("nst: the page cannot stop this render: it does not run on the main thread, or SIGINT is not "
                 "handled by Python in this process")


class Follower(threading.Thread):
    """``nst watch FILE``: tails a progress file (and reads FILE.png when it changes) and
    feeds the Hub the same states the render's own page gets. A file started again (a new
    render: another run id, or shorter than what was read) starts the page's history again."""

    def __init__(self, path: str | os.PathLike, hub: Hub, poll_s: float = 0.2):
        super().__init__(name="nst-follower", daemon=True)
        self.path, self.image_path = Path(path), Path(f"{path}.png")
        self.hub, self.poll_s, self.halt = hub, poll_s, threading.Event()
        self.pos, self.buf, self.run_id, self.image_key, self.lines = 0, b"", None, None, 0

    def stop(self) -> None:
        self.halt.set()
        self.join(5.0)

    def run(self) -> None:
        while not self.halt.wait(self.poll_s):
            with contextlib.suppress(OSError):
                self.poll()

    def poll(self) -> None:
        """Read what was appended since the last poll and publish it (one Hub update)."""
        size = self.path.stat().st_size
        if size < self.pos:
            self._restart()
        chunk = b""
        if size > self.pos:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read(size - self.pos)
            self.pos += len(chunk)
        *complete, self.buf = (self.buf + chunk).split(b"\n")
        state, points = None, []
        for raw in complete:
            rec = _record(raw)
            if rec is None:
                continue
            if rec["state"].get("run") != self.run_id:
                if self.run_id is not None:
                    self.hub.reset()
                    points = []
                self.run_id = rec["state"].get("run")
            state, self.lines = rec["state"], self.lines + 1
            points.extend(json.dumps(p) for p in rec.get("points", ()))
        png = self._image()
        if state is not None or png is not None:
            self.hub.update(self._state_text(state), points, png)

    def _restart(self) -> None:
        self.pos, self.buf, self.run_id, self.image_key = 0, b"", None, None
        self.hub.reset()

    def _image(self) -> bytes | None:
        try:
            st = self.image_path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key == self.image_key:
                return None
            data = self.image_path.read_bytes()
        except OSError:
            return None
        self.image_key = key
        return data if data.startswith(b"\x89PNG") else None

    def _state_text(self, state: dict | None) -> str:
        if state is None:
            return self.hub.state_json  # only the image changed
        state = {**state, "kind": "watch", "can_stop": False, "source": str(self.path)}
        return json.dumps(state)


def _record(raw: bytes) -> dict | None:
    """One progress-file line, or None for one that is not ours (or was cut short)."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("state"), dict):
        return None
    return rec


def watch(path: str | os.PathLike, serve: str = "127.0.0.1:0", announce=_say) -> int:
    """``nst watch FILE``: serve the page of the render that writes the progress file
    ``path`` until Ctrl-C (or SIGTERM); returns 0."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise InputError(f"{path} is not a file: name the --progress FILE of a render")
    if not p.parent.is_dir() and str(p.parent):
        raise InputError(f"{path}: the directory {p.parent} does not exist")
    hub = Hub()
    server = LiveServer(serve, hub, PAGE)
    follower = Follower(p, hub)
    try:
        _announce(server, announce, watching=True)
        if not p.exists():
            announce(f"nst: waiting for {path} (the --progress FILE of a render)")
        follower.start()
        while True:
            time.sleep(3600)  # Ctrl-C (or SIGTERM under nst's handlers) ends the watch
    except KeyboardInterrupt:
        return 0
    finally:
        follower.stop()
        server.close("no longer watching")
