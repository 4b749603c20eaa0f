"""The live page's server (standard library only: http.server and server-sent events).

Why the standard library: the page needs one HTML document, two PNG images, a stream of
small JSON messages and one POST; ``http.server.ThreadingHTTPServer`` with server-sent
events does all of it, works offline, adds no dependency to install (or to audit), and
keeps the one thread per client that a slow or stalled client may hold away from the
render thread, which never touches this module (engine/live.py hands it the numbers and
the encoded image through ``Hub.update`` from its own thread).

Safety (issue #28): it listens on 127.0.0.1 unless the user names a host; every run has a
random token, printed in the URL, that a request from off loopback and the stop request
from anywhere must carry (a loopback server is reachable from any page in the user's
browser: no forged stop); the Host header must name this server (DNS rebinding); only
the fixed routes below are served, never a path taken from the request.
"""

from __future__ import annotations

import errno
import hmac
import http.server
import ipaddress
import json
import secrets
import socket
import threading
import time
import urllib.parse

from .errors import InputError

MAX_CLIENTS = 32  # long-lived requests (the event stream, the full-size image) at once
KEEPALIVE_S = 15.0  # a comment line on an idle event stream, so that proxies keep it open
SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long is dropped (its thread ends)
FULL_WAIT_S = 120.0  # a full-size image is copied at the next progress interval: wait this long for one
SNDBUF = 64 << 10  # kernel send buffer per client: a stalled client holds this much, no more
MAX_POINTS = 4096  # loss history kept for the plot; past it every other point is dropped
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def parse_address(spec: str, label: str = "--serve") -> tuple[str, int, bool]:
    """``[HOST:]PORT`` -> (host, port, whether the host was given). Without a host the
    server listens on 127.0.0.1; an IPv6 host goes in brackets ([::1]:8000)."""
    s = str(spec).strip()
    host, port, explicit = "127.0.0.1", s, False
    if s.startswith("["):
        end = s.find("]")
        if end > 1 and s[end + 1:end + 2] == ":":
            host, port, explicit = s[1:end], s[end + 2:], True
        else:
            port = ""
    elif ":" in s:
        host, port = s.rsplit(":", 1)
        explicit = True
        if not host or ":" in host:
            port = ""
    if not port.isdigit() or int(port) > 65535:
        raise InputError(f"{label} {spec}: expected [HOST:]PORT, e.g. 8000, 127.0.0.1:0 (0: a free port), "
                         "0.0.0.0:8000 or [::1]:8000")
    return host, int(port), explicit


def is_loopback(addr: str) -> bool:
    """Whether a client address is this machine's loopback (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    """A Host header -> (name in lower case, port; 80 when absent), or ("", None) if malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = v[:end + 1], v[end + 1:]
    else:
        name, _, port = v.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return "", None
    return name, int(rest[1:]) if rest else 80


class Hub:
    """The newest state of the render for every client: the numbers (as JSON text), the loss
    history (one JSON text per point) and the newest PNG. Written by one producer thread
    (engine/live.py's encoder, or the follower of a progress file), read by the client
    threads; the lock is held for assignments and slices only."""

    def __init__(self):
        self._cond = threading.Condition()
        self.seq = 0  # bumped at every update
        self.gen = 0  # bumped when the history is thinned or reset: clients then get it whole
        self.state_json = "{}"
        self.points: list[str] = []
        self.png, self.png_seq = b"", 0
        self.closed, self.note = False, ""

    def update(self, state_json: str, points: list[str] = (), png: bytes | None = None) -> None:
        with self._cond:
            self.points.extend(points)
            if len(self.points) > MAX_POINTS:
                self.points = self.points[:-1:2] + self.points[-1:]  # every other one, the newest kept
                self.gen += 1
            self.seq += 1
            if png is not None:
                self.png, self.png_seq = png, self.seq
            self.state_json = state_json
            self._cond.notify_all()

    def reset(self) -> None:
        """A new render in the followed file: the history starts again."""
        with self._cond:
            self.points, self.gen, self.png, self.png_seq = [], self.gen + 1, b"", 0
            self.seq += 1
            self._cond.notify_all()

    def close(self, note: str = "") -> None:
        with self._cond:
            self.closed, self.note = True, note
            self._cond.notify_all()

    def image(self) -> tuple[bytes, int]:
        with self._cond:
            return self.png, self.png_seq

    def next_message(self, seen: int, gen: int, sent: int, timeout: float):
        """Wait (a client thread) for an update after ``seen``; return (seq, gen, points
        held, message text or None on a timeout or at the end, closed). The message carries
        the newest state and the history points the client does not have yet (all of them
        after a thinning or a reset)."""
        with self._cond:
            self._cond.wait_for(lambda: self.seq != seen or self.closed, timeout)
            if self.seq == seen:
                return seen, gen, sent, None, self.closed
            start = sent if gen == self.gen else 0
            points = ",".join(self.points[start:])
            seq, gen, n, state, image = self.seq, self.gen, len(self.points), self.state_json, self.png_seq
        msg = (f'{{"gen":{gen},"from":{start},"sent":{time.time():.3f},"image":{image},'
               f'"points":[{points}],"state":{state}}}')
        return seq, gen, n, msg, False


class LiveServer:
    """One page, its images and its event stream, on ``host:port`` (port 0: a free one).
    ``full(timeout)`` returns the full-size PNG (None: not available now); ``stop()`` ends
    the render (None: the page cannot stop it, as when following a file). Binding happens
    here, so that a port in use is refused before any work."""

    def __init__(self, spec: str, hub: Hub, page: str, full=None, stop=None, label: str = "--serve"):
        host, port, explicit = parse_address(spec, label)
        self.hub, self.page_template, self.full_fn, self.stop_fn = hub, page, full, stop
        self.token = secrets.token_urlsafe(18)
        self.nonce = secrets.token_urlsafe(12)
        self.explicit = explicit
        self._stop_lock, self.stopping = threading.Lock(), False
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.httpd = _bind(host, port, spec, label)
        self.httpd.live = self
        self.host, self.port = host, self.httpd.server_address[1]
        self.allowed = self._allowed_hosts()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="nst-live-server", daemon=True)
        self._thread.start()

    def _allowed_hosts(self) -> set[str]:
        names = {"127.0.0.1", "localhost", f"[{self.host}]" if ":" in self.host else self.host.lower()}
        if not is_loopback_host(self.host):
            names.add("[::1]")
        if self.wildcard:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return names

    @property
    def wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")

    def host_ok(self, value: str | None) -> bool:
        """The Host header names this server, with its port: 127.0.0.1, localhost or the
        host it listens on; on a wildcard host (0.0.0.0, ::) also this machine's names and
        any IP literal (a DNS-rebinding page can only send a name it controls)."""
        if not value:
            return False
        name, port = _split_host(value)
        if port != self.port or not name:
            return False
        return name in self.allowed or (self.wildcard and _is_ip(name))

    @property
    def urls(self) -> list[str]:
        """The page's address with the token (for a wildcard host: this machine's name, then loopback)."""
        q = f"/?t={self.token}"
        if self.wildcard:
            return [f"http://{socket.gethostname()}:{self.port}{q}", f"http://127.0.0.1:{self.port}{q}"]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"http://{host}:{self.port}{q}"]

    @property
    def url(self) -> str:
        return self.urls[0]

    def stop(self) -> str:
        """The stop request: at most once per run."""
        if self.stop_fn is None:
            return "this page cannot stop the render (it follows a progress file)"
        with self._stop_lock:
            if self.stopping:
                return "already stopping"
            self.stopping = True
        self.stop_fn()
        return "stopping: the render writes its image and ends, as after Ctrl-C"

    def page(self) -> bytes:
        return self.page_template.replace("{{NONCE}}", self.nonce).encode("utf-8")

    def close(self, note: str = "") -> None:
        """Tell the clients the render ended, stop listening (client threads are daemons:
        a stalled one is not waited for)."""
        self.hub.close(note)
        self.httpd.shutdown()
        self.httpd.server_close()


def is_loopback_host(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and is_loopback(host))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stalled client's thread never keeps the process alive
    live: LiveServer

    def handle_error(self, request, client_address):
        pass  # a client that went away or sent garbage is its own business, not the render's


class _Server6(_Server):
    address_family = socket.AF_INET6


def _bind(host: str, port: int, spec: str, label: str) -> _Server:
    cls = _Server6 if ":" in host else _Server
    try:
        return cls((host, port), _Handler)
    except socket.gaierror as e:
        raise InputError(f"{label} {spec}: unknown host {host} ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"{label} {spec}: port {port} on {host} is in use; pick another PORT, or 0 for a free "
                             "one") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"{label} {spec}: {host} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise InputError(f"{label} {spec}: not allowed to listen on port {port} (ports below 1024 need "
                             "privileges)") from None
        raise InputError(f"{label} {spec}: cannot listen there ({e.strerror or e})") from None


def check_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def query_token(path: str) -> str | None:
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("t")
    return values[0] if values else None


# path -> (method, handler, whether the token is needed from loopback too). Nothing else is served.
ROUTES = {
    "/": ("GET", "_page", False),
    "/events": ("GET", "_events", False),
    "/image.png": ("GET", "_image", False),
    "/full.png": ("GET", "_full", False),
    "/stop": ("POST", "_stop", True),
}
_SAFE_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                 ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
                 ("Cross-Origin-Resource-Policy", "same-origin"))


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request: the Host header, then the route, then the token; one response."""

    server_version, sys_version = "nst-live", ""
    timeout = SEND_TIMEOUT_S  # socket reads and writes: a stalled client times out
    server: _Server

    def log_message(self, format, *args):
        pass  # requests are not the render's log

    def do_GET(self):
        self._route()

    do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _route(self) -> None:
        live = self.server.live
        self.close_connection = True
        if not live.host_ok(self.headers.get("Host")):
            return self._text(403, "refused: the Host header does not name this server")
        route = ROUTES.get(self.path.split("?", 1)[0])  # the raw path: "//host/" is no route
        if route is None or (route[1] == "_stop" and live.stop_fn is None):
            return self._text(404, "not found")
        method, name, always = route
        if self.command != method:
            return self._text(405, f"use {method}", (("Allow", method),))
        given = self.headers.get("X-NST-Token") if always else (query_token(self.path)
                                                                 or self.headers.get("X-NST-Token"))
        if (always or not is_loopback(self.client_address[0])) and not check_token(given, live.token):
            return self._text(403, "refused: this request needs the token of the printed URL")
        getattr(self, name)(live)

    def _send(self, code: int, body: bytes, ctype: str, headers=()) -> None:
        try:
            self.send_response(code)
            for k, v in (("Content-Type", ctype), ("Content-Length", str(len(body))), *_SAFE_HEADERS, *headers):
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass  # the client went away

    def _text(self, code: int, text: str, headers=()) -> None:
        self._send(code, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8", headers)

    def _page(self, live: LiveServer) -> None:
        n = live.nonce
        csp = (f"default-src 'none'; script-src 'nonce-{n}'; style-src 'nonce-{n}'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        self._send(200, live.page(), "text/html; charset=utf-8", (("Content-Security-Policy", csp),))

    def _image(self, live: LiveServer) -> None:
        png, seq = live.hub.image()
        if not png:
            return self._text(503, "no image yet")
        self._send(200, png, "image/png", (("X-NST-Image-Seq", str(seq)),))

    def _full(self, live: LiveServer) -> None:
        if live.full_fn is None:
            return self._image(live)  # following a file: its image is the only one
        if not live._slots.acquire(blocking=False):
            return self._text(503, "too many clients")
        try:
            png = live.full_fn(FULL_WAIT_S)
        finally:
            live._slots.release()
        if png is None:
            return self._text(503, "no full-size image: it is copied at the next progress interval, and none came")
        self._send(200, png, "image/png")

    def _stop(self, live: LiveServer) -> None:
        try:
            self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1024))
        except (OSError, ValueError):
            pass
        self._text(202, live.stop())

    def _events(self, live: LiveServer) -> None:
        if not live._slots.acquire(blocking=False):
            return self._text(503, "too many clients")
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            self.send_response(200)
            for k, v in (("Content-Type", "text/event-stream; charset=utf-8"), *_SAFE_HEADERS):
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            self._stream(live.hub)
        except OSError:
            pass  # gone, or stalled past SEND_TIMEOUT_S
        finally:
            live._slots.release()

    def _stream(self, hub: Hub) -> None:
        """Each update as one event with the newest state (never a queue of old ones)."""
        seen, gen, sent = -1, -1, 0
        while True:
            seen, gen, count, msg, closed = hub.next_message(seen, gen, sent, KEEPALIVE_S)
            if msg is not None:
                self.wfile.write(f"event: state\ndata: {msg}\n\n".encode("utf-8"))
                sent = count
            elif closed:
                self.wfile.write(f"event: end\ndata: {json.dumps(hub.note)}\n\n".encode("utf-8"))
                return
            else:
                self.wfile.write(b": idle\n\n")
