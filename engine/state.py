"""Resumable renders (``--state FILE``, ``--resume``): the image and the optimiser's state
after a whole number of steps, in one file, so that a multi-hour render can continue where
it stopped (a crash, a lost rank, a signal, a time limit, a machine taken back).

A state file holds the scale and step it was written after, the image (1, 3, H, W)
float32, the stepper's state (Adam's moments and step count, or L-BFGS's history), the
render's record so far (its first loss, and its best image: the loss, the step and, when it
is not the state's own image, the image) and a fingerprint of what the render computes: the
settings that shape the loss and the optimiser, a hash of the decoded input images and a
hash of the network's parameters. Resuming with another fingerprint is refused; settings
that only change how the steps run (device, precision, tiles, ranks, the progress interval,
and --steps of a single-scale render with a constant learning rate) may differ. Resumed, a
render continues with the same steps it would have run and ends on the image the render
that was never stopped ends on (tested).

A state is checked when it is read: a CRC-32 over its contents (a file changed or torn
after it was written), then its shapes, ranges and step counts; a state that fails is
refused in one line. The same fingerprint, with the network's hash, is what the ranks of a
distributed render agree on before the first step (engine/ranks.py ``Ranks.agree``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .fsutil import OutputError, atomic_path

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock (README)
    fcntl = None
from .settings import DEFAULT_LR

FORMAT = "nst-render-state-2"
# How a render runs, not what it computes: these may change between a run and its resume.
RUN_FIELDS = frozenset({
    "steps", "progress_every", "time_limit", "time_budget", "device", "precision", "memory_format", "reference",
    "cuda_graph", "compile", "loss_scale", "tile", "checkpointing", "memory_limit", "distributed", "rank_timeout",
    "budget_plan", "move_on", "runtime", "step_variant", "variant_cache",
    "weights", "extractor",  # where the network came from: the fingerprint hashes the network itself
})
# Fingerprint keys that are not settings, and how a difference in them reads.
_NAMED = {"inputs": "the input images differ", "network": "the network's weights differ",
          "style_weights": "the style images' weights differ"}


@dataclass
class RenderState:
    scale_index: int  # which scale (0 for a single-scale render)
    step: int  # steps done at that scale
    before: int  # steps of the earlier scales
    image: torch.Tensor  # (1, 3, H, W) float32, after ``step`` steps
    optimizer: dict  # the stepper's state_dict()
    fingerprint: dict
    # The scale's record so far (engine/loop.py): the loss of its first evaluation, and its best
    # image (its loss, how many steps it had had, and the image itself unless it is ``image``).
    first_loss: float = math.nan
    best_loss: float = math.inf
    best_step: int = -1
    best_image: torch.Tensor | None = None  # (1, 3, H, W) float32, or None: the best is ``image``
    extra: dict = field(default_factory=dict)


def network_sha256(extractor) -> str:
    """A hash of the network a render runs: its parameters (an eager extractor or any
    module), or for an export the manifest's hash of the weights it was made from. The same
    weights from a .pth and a .safetensors file, rebuilt from random:SEED or exported, hash
    alike."""
    if hasattr(extractor, "weights_sha256"):
        return extractor.weights_sha256()
    tensors = getattr(extractor, "manifest", {}).get("weights", {}).get("tensors_sha256")
    if tensors:
        # An export (TorchScript or the step graphs), its files checked against this manifest
        # when loaded: the hash of the float32 weights it was made from, which is the eager
        # extractor's. So a state resumes in either runtime and from the weights themselves.
        return tensors
    if hasattr(extractor, "sessions"):  # engine/onnx_runtime.py StepGraphs: files checked against the manifest
        entry = extractor.manifest["artefacts"]["step"]
        files = {g: v.get("sha256") for g, v in entry["graphs"].items()}
        files["weights"] = entry["weights_file"].get("sha256")
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    module = getattr(extractor, "scripted", extractor)  # a ScriptedExtractor's TorchScript module
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def fingerprint(settings, content: torch.Tensor, styles, network: str | None = None) -> dict:
    """What a render computes: the settings outside RUN_FIELDS (the learning rate as the
    rate it is, so that --lr 0.02 and Adam's default are one render), a hash of the decoded
    inputs and ``network`` (``network_sha256``)."""
    out = {}
    for f in dataclasses.fields(settings):
        if f.name not in RUN_FIELDS:
            v = getattr(settings, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    out["lr"] = settings.learning_rate
    if settings.lr_schedule != "constant" or len(settings.scale_sizes()) > 1:
        # A schedule's length (its rate at every step depends on it), or the steps of every
        # scale before the last.
        out["steps"] = settings.steps
    out["inputs"] = _images_sha256([content] + [img for img, _ in styles])
    out["style_weights"] = [float(w) for _, w in styles]
    if network is not None:
        out["network"] = network
    return out


def _images_sha256(images) -> str:
    h = hashlib.sha256()
    for img in images:
        t = img.detach().float().cpu().contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def first_difference(saved: dict, now: dict) -> str | None:
    """The first key in which two fingerprints differ, as words; None when they agree."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            if key in _NAMED:
                return _NAMED[key]
            return f"--{key.replace('_', '-')} was {_shown(key, saved.get(key))}, now {_shown(key, now.get(key))}"
    return None


def _shown(key: str, v) -> str:
    if key == "lr" and isinstance(v, float) and v in DEFAULT_LR.values():
        return f"{v:g} (the default for {next(k for k, d in DEFAULT_LR.items() if d == v)})"
    if v is None:
        return "not given"
    return f"{v:g}" if isinstance(v, float) else repr(v)


def _digest(obj, h) -> None:
    """Feed ``obj`` (tensors, numbers, strings, None, and dicts and lists of them) into
    ``h`` in one canonical order, without copying tensors' bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _digest(k, h)
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{obj!r};".encode())


class _CRC:
    """CRC-32 with hashlib's update(): it catches a file changed or torn after it was
    written, at twice SHA-256's speed (2.8 against 1.25 GB/s measured here), which counts
    at every progress interval of a large render."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)


def _checksum(payload: dict) -> str:
    h = _CRC()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return f"crc32:{h.value:08x}"


class _Tracked:
    """A file for torch.save that keeps what went wrong in a write: torch reports a full
    disk as "unexpected pos ..." (a RuntimeError: the file took fewer bytes than it was
    given), which says nothing to a user."""

    def __init__(self, f):
        self.f, self.error, self.short = f, None, False

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        if n is not None and n < len(memoryview(b)):
            self.short = True
        return n

    def flush(self) -> None:
        self.f.flush()

    def why(self, e: BaseException, directory: Path) -> str:
        if isinstance(self.error, OSError) and self.error.errno == errno.ENOSPC or self.short \
                or "unexpected pos" in str(e):
            try:
                st = os.statvfs(directory)
                full = st.f_bavail * st.f_frsize < (1 << 20)
            except (OSError, AttributeError):
                full = True
            return "no space left on the device" if full else "the file took fewer bytes than it was given " \
                "(a quota, or a full disk)"
        return str(self.error or e).splitlines()[0][:120]


def save_state(path: str | Path, state: RenderState) -> None:
    """Write atomically: an interrupted write leaves the previous state file whole."""
    payload = {"format": FORMAT, "scale": state.scale_index, "step": state.step, "before": state.before,
               "image": state.image.detach().float().cpu().contiguous(), "optimizer": state.optimizer,
               "first_loss": float(state.first_loss), "best_loss": float(state.best_loss),
               "best_step": int(state.best_step),
               "best_image": None if state.best_image is None else state.best_image.detach().float().cpu().contiguous(),
               "fingerprint": state.fingerprint}
    payload["checksum"] = _checksum(payload)
    with atomic_path(path, label="--state") as tmp:
        with open(tmp, "wb") as f:
            out = _Tracked(f)
            try:
                torch.save(payload, out)
                f.flush()
                os.fsync(f.fileno())
            except (RuntimeError, OSError) as e:  # torch's writer reports a full disk as a RuntimeError
                raise OutputError(f"cannot write --state {path}: {out.why(e, tmp.parent)}") from None


def read_state(path: str | Path, label: str = "--resume") -> dict:
    """The checked contents of a state file (its checksum, keys and types); InputError in
    one line for anything else."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{label}: no state file {path} (it is written at progress intervals with --state {path})")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: pickle, zip and torch all raise their own
        raise InputError(f"{label}: {path} is not a readable state file ({type(e).__name__})") from None
    if not isinstance(d, dict) or not str(d.get("format", "")).startswith("nst-render-state-"):
        raise InputError(f"{label}: {path} is not an nst render state ({FORMAT})")
    if d["format"] != FORMAT:
        raise InputError(f"{label}: {path} was written by another version of nst ({d['format']}; this one reads "
                         f"{FORMAT}): it cannot be resumed here")
    if d.get("checksum") != _checksum(d):
        raise InputError(f"{label}: {path} is damaged (its checksum does not match its contents): it was changed or "
                         "torn after it was written; it cannot be resumed")
    try:
        _check_contents(d, path, label)
    except (TypeError, ValueError, AttributeError, KeyError, RuntimeError) as e:
        # A value of a type no check foresaw (a file with a valid checksum, edited by hand).
        raise InputError(f"{label}: {path} is not a valid state: its contents are not a render state's "
                         f"({type(e).__name__})") from None
    return d


def _check_contents(d: dict, path, label: str) -> None:
    """Shapes, ranges and step counts: what a file with a valid checksum may still get wrong
    (written by hand, or by a bug)."""
    def bad(what: str):
        return InputError(f"{label}: {path} is not a valid state: {what}")

    for key, kind in (("scale", int), ("step", int), ("before", int), ("image", torch.Tensor), ("optimizer", dict),
                      ("fingerprint", dict), ("first_loss", float), ("best_loss", float), ("best_step", int)):
        if not isinstance(d.get(key), kind):
            raise bad(f"its {key!r} is missing or not a {kind.__name__}")
    if "best_image" not in d:  # written always (None: the best is ``image``)
        raise bad("its 'best_image' is missing")
    if min(d["scale"], d["step"], d["before"]) < 0:
        raise bad(f"a negative count (scale {d['scale']}, step {d['step']}, earlier steps {d['before']})")
    if not -1 <= d["best_step"] <= d["step"]:
        raise bad(f"its best image is from step {d['best_step']}, outside 0..{d['step']}")
    for key in ("image", "best_image"):
        img = d.get(key)
        if img is None and key == "best_image":
            continue
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or tuple(img.shape[:2]) != (1, 3) \
                or img.dtype != torch.float32 or img.shape != d["image"].shape:
            raise bad(f"its {key} is not a (1, 3, H, W) float32 image")
        if not bool(torch.isfinite(img).all()) or float(img.min()) < 0 or float(img.max()) > 1:
            raise bad(f"its {key} has values outside [0, 1]")
    _check_optimizer(d["optimizer"], d["image"], d["step"], bad)


def _check_optimizer(opt: dict, image: torch.Tensor, step: int, bad) -> None:
    """Adam's moments have the image's size, are finite (the second one not negative) and
    count the state's steps; L-BFGS's history vectors have the image's size and are finite."""
    n = image.numel()
    tensors = []
    if "adam" in opt:
        if not isinstance(opt["adam"], dict) or not all(isinstance(st, dict) for st in opt["adam"].values()):
            raise bad("its Adam state is not a table of moments")
        for st in opt["adam"].values():
            moments = [st.get("exp_avg"), st.get("exp_avg_sq")]
            if any(not isinstance(m, torch.Tensor) or m.numel() != n for m in moments):
                raise bad("its Adam moments do not have the image's size")
            if float(moments[1].min()) < 0:
                raise bad("its Adam second moment is negative")
            count = st.get("step")
            if count is None or float(count) != step:
                raise bad(f"its Adam state counts {count if count is None else float(count):g} steps, the state {step}")
            tensors += moments
    elif "lbfgs" in opt:
        for st in opt["lbfgs"].values():
            for k, v in st.items():
                vs = v if isinstance(v, list) else [v]
                for t in vs:
                    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() not in (n, 1):
                        raise bad(f"its L-BFGS {k} does not have the image's size")
                    if isinstance(t, torch.Tensor):
                        tensors.append(t)
    elif opt:
        raise bad("its optimizer state is neither Adam's nor L-BFGS's")
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        raise bad("its optimizer state is not finite")


def load_state(path: str | Path, expected: dict) -> RenderState:
    """The state in ``path``, checked (``read_state``) and against the fingerprint of the
    render to resume."""
    d = read_state(path)
    why = first_difference(d["fingerprint"], expected)
    if why:
        raise InputError(f"--resume: {path} belongs to another render ({why})")
    return RenderState(d["scale"], d["step"], d["before"], d["image"], d["optimizer"], d["fingerprint"],
                       d["first_loss"], d["best_loss"], d["best_step"], d["best_image"])


def describe(d: dict) -> str:
    """Where a state stands, in words: 'step 40 (scale 2)'."""
    where = f"step {d['before'] + d['step']}"
    return where + (f" (step {d['step']} of scale {d['scale'] + 1})" if d["scale"] else "")


def peek(path: str | Path) -> dict | None:
    """Where the state in ``path`` stands (its scale, step and earlier steps), read without
    loading its tensors; None when ``path`` is not an nst render state."""
    try:
        d = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything unreadable is not a state
        return None
    if not isinstance(d, dict) or not str(d.get("format", "")).startswith("nst-render-state-"):
        return None
    if not all(isinstance(d.get(k), int) for k in ("scale", "step", "before")):
        return None
    return {k: d[k] for k in ("format", "scale", "step", "before")}


def lock_path(path: str | Path) -> Path:
    """The sidecar that a render holds while it owns a state file: FILE.lock beside the
    file the state is written to (a symlink's target)."""
    target = Path(path)
    target = target.resolve() if target.is_symlink() else target
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold ``lock_path(path)`` (an exclusive flock) for the block: a second render on the
    same state is refused, in one line naming the holder's process id. The lock is the
    sidecar's, not the state's: the state is replaced by a rename at every save. The
    sidecar is removed at the end."""
    if fcntl is None:
        yield
        return
    lp = lock_path(path)
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"--state {path}: cannot create its lock file {lp} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"--state {path} is in use by another render (process {holder}; its lock is {lp}): "
                             "wait for it to end, or give this render another --state FILE") from None
        # Its last holder may have removed the sidecar between our open and our lock: hold
        # the file that is at the path.
        try:
            if os.stat(lp).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)
