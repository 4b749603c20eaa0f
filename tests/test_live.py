"""The live page (issue #28): a real render watched in a real browser (Debian's headless
Chromium driven by playwright-core, tests/browser/), the server's refusals (Host header,
paths, token), a stalled client against the render thread, a port in use, and `nst watch`
following a progress file as it grows. Renders use seeded random weights."""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main
from nst.engine import live_server
from nst.engine.errors import InputError
from nst.engine.live import FORMAT, image_array, open_live
from nst.engine.live_page import PAGE
from nst.engine.live_server import Hub, LiveServer, parse_address
from nst.engine.multiscale import render
from nst.engine.settings import StylizeSettings

ROOT = Path(__file__).resolve().parents[1]
BROWSER = ROOT / "tests" / "browser"
DRIVER = [sys.executable, "-m", "nst"]
W = "random:0"
ENV = dict(os.environ, NST_OFFLINE="1")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.BICUBIC) \
        .save(tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path


def _stylize(d: Path, *extra: str) -> list[str]:
    return ["-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o", str(d / "out.png"), "--weights", W,
            "--size", "48", "--device", "cpu", "--style-weight", "1e8", *extra]


class _Lines:
    """A process's stdout, line by line, read by a thread (so a test can wait with a timeout)."""

    def __init__(self, p: subprocess.Popen):
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.q.put(line) for line in p.stdout], daemon=True).start()

    def wait_for(self, prefix: str, timeout: float = 240) -> str:
        t_end = time.time() + timeout
        while time.time() < t_end:
            try:
                line = self.q.get(timeout=max(0.01, t_end - time.time()))
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} in {self.seen}")


def _url(line: str) -> str:
    return line.split("live page: ", 1)[1].split()[0]


def _settings(**kw) -> StylizeSettings:
    return StylizeSettings(**{**dict(size=48, steps=8, weights=W, device="cpu", progress_every=2, style_weight=1e8),
                              **kw})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 48, 48, generator=g), [(torch.rand(3, 48, 48, generator=g), 1.0)]


def _request(port: int, path: str, method: str = "GET", host: str | None = None, headers=None, addr="127.0.0.1"):
    """(status, body) of one request; ``host`` replaces the Host header."""
    c = http.client.HTTPConnection(addr, port, timeout=30)
    c.putrequest(method, path, skip_host=True)
    c.putheader("Host", host if host is not None else f"{addr}:{port}")
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    body = r.read() if path.split("?")[0] != "/events" else r.read1(4096)
    c.close()
    return r.status, body


# ---------------------------------------------------------------------------------------
# A real render in a real browser


@pytest.mark.slow
def test_a_render_in_a_real_browser_updates_and_stops(images, tmp_path):
    """The page shows at least two image updates after the first, the image and the plot
    change, a click shows the full-size image, and the stop button ends the render as
    Ctrl-C does: exit 130, the image written, the state written (and resumable)."""
    assert (BROWSER / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in tests/browser (CI does)"
    assert shutil.which("node") and Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists(), \
        "needs node and Debian's chromium (apt-get install -y chromium; CI installs it)"
    state = images / "st.pt"
    cmd = [*DRIVER, *_stylize(images, "--steps", "100000", "--progress-every", "2", "--state", str(state),
                              "--serve", "127.0.0.1:0")]
    with open(tmp_path / "stderr", "w") as err_file:
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        url = _url(_Lines(p).wait_for("nst: live page: "))
        assert url.startswith("http://127.0.0.1:") and "?t=" in url and ":0/" not in url
        port = int(url.split(":")[2].split("/")[0])
        assert _request(port, "/stop", "POST")[0] == 403  # no token, no stop: the browser still finds it running
        r = subprocess.run(["node", "live_page.js", "check", url, str(tmp_path)], cwd=BROWSER, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        found = json.loads(r.stdout.strip().splitlines()[-1])
        code = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    err = (tmp_path / "stderr").read_text()
    assert "failure" not in found, found
    assert found["images"][1] >= found["images"][0] + 2 and found["steps"][1] > found["steps"][0], found
    assert found["image_changed"] and found["plot_changed"], found
    assert "seeded random weights" in found["warning"] and "48×48" in found["ladder"]
    assert found["full"] == [48, 48, [48, 48]], found  # the full-size image, as large as the render's
    assert found["stop_enabled"] and found["stop_answer"].startswith("stopping"), found
    assert "ended" in found["final_status"] or "lost" in found["final_status"], found
    assert found["offsite"] == [] and found["errors"] == [], found  # offline: nothing from elsewhere, no errors
    assert code == 130, err
    assert "stopped early (interrupted by SIGINT)" in err and "Traceback" not in err, err
    with Image.open(images / "out.png") as im:
        assert im.size == (48, 48)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] > 0 and saved["image"].shape == (1, 3, 48, 48)
    # Written at the stop, not at the last progress interval: --resume continues from there.
    stopped_at = int(err.split("stopped early (interrupted by SIGINT) after ")[1].split(" ")[0])
    assert saved["step"] == stopped_at and f"continues from step {stopped_at}" in err, err
    more = saved["step"] + 2  # the state continues the render
    r = subprocess.run([sys.executable, "-m", "nst", *_stylize(images, "--steps", str(more), "--progress-every", "2",
                                                               "--state", str(state), "--resume")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert torch.load(state, weights_only=True)["step"] == more


# ---------------------------------------------------------------------------------------
# What the server refuses


@pytest.fixture
def server():
    hub = Hub()
    hub.update(json.dumps({"step": 3, "status": "running"}), [json.dumps([0, 1.0, 0.5, 0.4, 0.1, 0])],
               b"\x89PNG fake")
    stops = []
    s = LiveServer("127.0.0.1:0", hub, PAGE, full=lambda timeout: b"\x89PNG full", stop=lambda: stops.append(1))
    s.stops = stops
    yield s
    s.close()


def test_the_host_header_must_name_this_server(server):
    port = server.port
    assert _request(port, "/")[0] == 200
    assert _request(port, "/", host=f"localhost:{port}")[0] == 200
    for bad in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"192.0.2.9:{port}",
                f"127.0.0.1.evil.example:{port}", f"localhost:{port}:1", ""):
        status, body = _request(port, "/", host=bad)
        assert status == 403 and b"Host" in body, bad
        assert _request(port, "/image.png", host=bad)[0] == 403, bad
    # A request with no Host header at all (HTTP/1.0 style).
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.0 403")


def test_only_its_own_routes_are_served(server, tmp_path):
    port = server.port
    for path in ("/etc/passwd", "/../engine/live.py", "/%2e%2e/%2e%2e/etc/passwd", "/image.png/../x", "//etc/passwd",
                 "/index.html", "/static/app.js", "/favicon.ico", "/events/x", "/live_page.py", "/image.png.bak"):
        assert _request(port, path)[0] == 404, path
    status, body = _request(port, "/?t=x")
    assert status == 200 and b"<title>nst: live render</title>" in body
    assert _request(port, "/image.png")[1] == b"\x89PNG fake"
    assert _request(port, "/full.png")[1] == b"\x89PNG full"
    # Only the stop request changes anything, and only it takes a POST.
    for path in ("/", "/events", "/image.png", "/full.png"):
        assert _request(port, path, "POST", headers={"X-NST-Token": server.token})[0] == 405, path
    for method in ("PUT", "DELETE", "OPTIONS", "HEAD"):
        assert _request(port, "/stop", method, headers={"X-NST-Token": server.token})[0] == 405, method
    assert _request(port, "/stop")[0] == 405 and server.stops == []


def test_stop_needs_the_token_from_anywhere(server):
    port = server.port
    assert _request(port, "/stop", "POST")[0] == 403
    assert _request(port, "/stop", "POST", headers={"X-NST-Token": "wrong"})[0] == 403
    assert _request(port, "/stop", "POST", headers={"X-NST-Token": server.token + "x"})[0] == 403
    assert _request(port, "/stop", "POST", headers={"X-NST-Token": "é"})[0] == 403
    # In the query only (a form or a link could carry it): refused, the header is required.
    assert _request(port, f"/stop?t={server.token}", "POST")[0] == 403
    assert server.stops == []
    status, body = _request(port, "/stop", "POST", headers={"X-NST-Token": server.token})
    assert status == 202 and body.startswith(b"stopping") and server.stops == [1]
    status, body = _request(port, "/stop", "POST", headers={"X-NST-Token": server.token})
    assert status == 202 and b"already" in body and server.stops == [1]  # once per run


def test_the_stop_button_is_off_where_it_could_not_be_a_ctrl_c():
    """The stop is a SIGINT to the main thread: off when the page is opened on another
    thread (the render would not see it) or where SIGINT is ignored."""
    opened = {}
    t = threading.Thread(target=lambda: opened.update(live=open_live("127.0.0.1:0", None, _settings(),
                                                                    announce=lambda line: None)))
    t.start()
    t.join(30)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ignored = open_live("127.0.0.1:0", None, _settings(), announce=lambda line: None)
    finally:
        signal.signal(signal.SIGINT, old)
    for live in (opened["live"], ignored):
        try:
            assert live.server.stop_fn is None
            assert _request(live.server.port, "/stop", "POST", headers={"X-NST-Token": live.server.token})[0] == 404
        finally:
            live.close()
    here = open_live("127.0.0.1:0", None, _settings(), announce=lambda line: None)
    here.close()
    assert here.server.stop_fn is not None


def _outside_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def _handle_from(server: LiveServer, client: tuple[str, int], raw: bytes) -> bytes:
    """One request through the server's handler as if it came from ``client``."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=live_server._Handler, args=(b, client, server.httpd), daemon=True)
        t.start()
        a.settimeout(30)
        head = a.recv(1 << 16)  # the status line comes first; an event stream would go on
        b.shutdown(socket.SHUT_RDWR)  # ends the handler, whatever it was doing
        t.join(30)
        return head


def test_the_token_is_needed_off_loopback():
    """Every route needs the token for a client that is not on loopback: through a real
    non-loopback interface when this machine has one, and through the handler with an
    outside client address (always)."""
    hub = Hub()
    hub.update(json.dumps({"step": 1}), [], b"\x89PNG fake")
    outside = _outside_address()
    s = LiveServer(f"{outside or '127.0.0.1'}:0", hub, PAGE, stop=lambda: None)
    try:
        port, tok = s.port, s.token
        host = f"{outside or '127.0.0.1'}:{port}"
        for path in ("/", "/events", "/image.png", "/full.png"):
            raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            assert _handle_from(s, ("192.0.2.77", 40000), raw).startswith(b"HTTP/1.0 403"), path
            q = "&" if "?" in path else "?"
            raw = f"GET {path}{q}t={tok} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            assert _handle_from(s, ("192.0.2.77", 40000), raw).startswith(b"HTTP/1.0 200"), path
        if outside is not None:
            assert _request(port, "/", addr=outside)[0] == 403
            assert _request(port, "/image.png", addr=outside)[0] == 403
            assert _request(port, f"/?t={tok}", addr=outside)[0] == 200
            assert _request(port, f"/image.png?t={tok}", addr=outside)[1] == b"\x89PNG fake"
            assert _request(port, "/", addr=outside, headers={"X-NST-Token": tok})[0] == 200
            assert _request(port, f"/?t={tok}", addr=outside, host=f"evil.example:{port}")[0] == 403
    finally:
        s.close()


def test_serve_addresses():
    assert parse_address("8000") == ("127.0.0.1", 8000, False)
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0, True)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080, True)
    assert parse_address("[::1]:9000") == ("::1", 9000, True)
    for bad in ("", "x", ":80", "host:", "1.2.3.4:99999", "::1:80", "[::1]", "[::1]80", "80:host", "-1"):
        with pytest.raises(InputError, match=r"expected \[HOST:\]PORT"):
            parse_address(bad)


# ---------------------------------------------------------------------------------------
# The render thread never waits on the page

STALL_BOUND_S = 0.25  # the render thread's time per progress interval spent on the page, at most


@pytest.mark.slow
def test_a_stalled_client_does_not_slow_the_render(monkeypatch, tmp_path):
    """Clients that connect to the event stream (and one to the image) and never read:
    their server threads block once the kernel buffers are full (SNDBUF is 64 KiB in the
    server, 4 KiB here, so that a short render fills them), and the render thread's time
    spent publishing each update stays under STALL_BOUND_S; a client that reads gets every
    update to the end."""
    monkeypatch.setattr(live_server, "SNDBUF", 4096)
    content, styles = _inputs()
    settings = _settings(steps=32, progress_every=1)
    live = open_live("127.0.0.1:0", tmp_path / "p.jsonl", settings, announce=lambda line: None)
    port, stalled, got = live.server.port, [], []
    try:
        for path in ["/events"] * 6 + ["/image.png"]:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            stalled.append(s)
        reader = threading.Thread(target=_read_events, args=(port, got), daemon=True)
        reader.start()
        render(content, styles, settings, callback=live.callback, on_schedule=live.on_schedule)
        spent = list(live.publisher.spent)
        live.close("done")
        reader.join(30)
        held = [_pending_bytes(s) for s in stalled[:-1]]
    finally:
        live.close()
        for s in stalled:
            s.close()
    assert len(spent) == 33  # the opening and 32 progress intervals
    assert max(spent) < STALL_BOUND_S, spent
    print(f"render thread per update: median {statistics.median(spent) * 1e3:.2f} ms, max {max(spent) * 1e3:.2f} ms")
    received = sum(len(m) for m in got)
    assert got and json.loads(got[-1])["state"]["status"] == "ended"
    print(f"a stalled client holds {max(map(len, held))} bytes; the reading one got {received}")
    # The stalled clients were really stalled: their server threads blocked in a send while
    # the render went on (when a send got through, only the newest state went next), so
    # they were handed far less than the client that read everything.
    assert all(len(h) < 0.8 * received for h in held), ([len(h) for h in held], received)


def _read_events(port: int, got: list) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("GET", "/events")
    r = c.getresponse()
    for line in r:
        if line.startswith(b"data: {"):
            got.append(line[6:])
        if line.startswith(b"event: end"):
            return


def _pending_bytes(s: socket.socket) -> bytes:
    """What the kernel has delivered to a client that never read."""
    s.setblocking(False)
    data = b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    return data


def test_the_preview_is_downscaled_before_the_copy_and_the_full_image_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 300, 1100, generator=g)
    a = image_array(x)
    assert a.shape == (140, 512, 3) and a.dtype == np.uint8
    ref = torch.nn.functional.interpolate(x, size=(140, 512), mode="area")[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(a.astype(np.float64) - ref).max() <= 0.5 + 1e-3
    full = image_array(x, None)
    assert full.shape == (300, 1100, 3)
    assert np.array_equal(full, np.floor(x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    small = torch.rand(1, 3, 40, 30, generator=g) * 1.4 - 0.2  # out of range: clamped
    s = image_array(small)
    assert s.shape == (40, 30, 3) and s.min() == 0 and s.max() == 255


# ---------------------------------------------------------------------------------------
# A port in use, bad addresses


def test_a_port_in_use_is_refused_at_once(images, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is in use"):
            open_live(f"127.0.0.1:{port}", None, _settings())
        assert time.perf_counter() - t0 < 1.0
        assert main(["watch", str(images / "p.jsonl"), "--serve", f"127.0.0.1:{port}"]) == 1
        err = capsys.readouterr().err
        assert err.count("nst: error:") == 1 and "is in use" in err
        r = subprocess.run([*DRIVER, *_stylize(images, "--steps", "5", "--serve", str(port))], env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"nst: error: --serve {port}: port {port} on 127.0.0.1 is in use; pick another PORT, or 0 for a "
                     "free one"], r.stderr
    assert not (images / "out.png").exists() and "random" not in r.stderr  # before any work: no weights were made
    assert main(_stylize(images, "--serve", "nowhere")) == 1
    assert "expected [HOST:]PORT" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# A progress file, and `nst watch` following one


def _progress_file(path: Path, steps: int = 8) -> list[bytes]:
    content, styles = _inputs()
    settings = _settings(steps=steps)
    live = open_live(None, path, settings, announce=lambda line: None)
    render(content, styles, settings, callback=live.callback, on_schedule=live.on_schedule)
    live.close("wrote it")
    return path.read_bytes().splitlines(keepends=True)


def test_the_progress_file_has_a_line_per_interval_and_an_image(tmp_path):
    lines = _progress_file(tmp_path / "p.jsonl")
    recs = [json.loads(line) for line in lines]
    assert all(r["format"] == FORMAT for r in recs)
    states = [r["state"] for r in recs]
    # The opening, steps 1, 3, 5, 7 (progress intervals every 2 and the last step), 8, then the end.
    assert [s["step"] for s in states] == [0, 1, 3, 5, 7, 8, 8]
    assert [s["status"] for s in states][-2:] == ["running", "ended"] and states[-1]["note"] == "wrote it"
    points = [p for r in recs for p in r["points"]]
    assert [p[0] for p in points] == [0, 2, 4, 6, 7] and all(len(p) == 6 for p in points)
    assert states[1]["steps_planned"] == 8 and states[1]["ladder"][0]["hw"] == [48, 48]
    with Image.open(tmp_path / "p.jsonl.png") as im:
        assert im.size == (48, 48) and im.format == "PNG"
    assert not list(tmp_path.glob(".*partial"))


def test_the_python_api_serves_and_writes_progress_too(images, capsys):
    """nst.engine.stylize(serve=, progress_file=): the page's URL is printed, the progress file
    gets a line per interval, and a port in use is refused before any image is read."""
    import nst.engine

    result = nst.engine.stylize(images / "c.png", images / "s.png", weights=W, size=48, steps=4, device="cpu",
                                progress_every=2, serve="127.0.0.1:0", progress_file=images / "run.jsonl")
    assert tuple(result.image.shape) == (3, 48, 48)
    assert "nst: live page: http://127.0.0.1:" in capsys.readouterr().out
    steps = [json.loads(line)["state"]["step"] for line in (images / "run.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 4 and (images / "run.jsonl.png").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(InputError, match="in use"):
            nst.engine.stylize(images / "missing.png", images / "s.png", weights=W, size=48, steps=1, device="cpu",
                               serve=f"127.0.0.1:{busy.getsockname()[1]}")


@pytest.mark.slow
def test_watch_follows_a_progress_file_as_it_grows(tmp_path):
    src = tmp_path / "src.jsonl"
    lines = _progress_file(src)
    followed = tmp_path / "w.jsonl"
    with open(tmp_path / "stderr", "w") as err_file:
        p = subprocess.Popen([sys.executable, "-m", "nst", "watch", str(followed), "--serve", "127.0.0.1:0"],
                             env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)
    history: list = []  # the page's loss history, as a page keeps it from the messages
    try:
        out = _Lines(p)
        port = int(_url(out.wait_for("nst: live page: ")).split(":")[2].split("/")[0])
        out.wait_for("nst: waiting for ")
        events = queue.Queue()
        threading.Thread(target=_read_events_to, args=(port, events), daemon=True).start()
        with open(followed, "wb") as f:
            for k, line in enumerate(lines):
                half = len(line) // 2
                f.write(line[:half])  # a line written in two parts is read once whole
                f.flush()
                time.sleep(0.3)
                f.write(line[half:])
                f.flush()
                m = _next_state(events, json.loads(line)["state"]["step"], json.loads(line)["state"]["status"],
                                history)
                assert m["state"]["kind"] == "watch" and m["state"]["can_stop"] is False
                if k == 1:
                    shutil.copy(src.with_name("src.jsonl.png"), tmp_path / "w.jsonl.png")
        assert history == [p for line in lines for p in json.loads(line)["points"]] and len(history) == 5
        assert _request(port, "/image.png")[1] == (tmp_path / "w.jsonl.png").read_bytes()
        assert _request(port, "/stop", "POST", headers={"X-NST-Token": "x"})[0] == 404  # it cannot stop that render
        # A new render in the same file: the page's history starts again.
        followed.write_bytes(_progress_file(tmp_path / "again.jsonl", steps=4)[0])
        m = _next_state(events, 0, "running", history)
        assert history == [] and m["state"]["run"] != json.loads(lines[0])["state"]["run"]
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=60)
    assert code == 0, (tmp_path / "stderr").read_text()


def _read_events_to(port: int, q: queue.Queue) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("GET", "/events")
    for line in c.getresponse():
        if line.startswith(b"data: {"):
            q.put(json.loads(line[6:]))


def _next_state(events: queue.Queue, step: int, status: str, history: list, timeout: float = 30) -> dict:
    """The next message with this step and status; ``history`` follows every message on the way."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        m = events.get(timeout=max(0.01, t_end - time.time()))
        del history[m["from"]:]
        history.extend(m["points"])
        if m["state"].get("step") == step and m["state"].get("status") == status:
            return m
    raise AssertionError(f"no state of step {step} ({status})")
