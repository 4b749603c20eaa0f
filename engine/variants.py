"""Which step runs on a GPU, chosen by measurement: ``choose`` is the entry point.

Kernels written without a GPU at hand must never make the engine slower, so on CUDA the
engine does not trust a default: at the first render for a (GPU model, torch version,
size bucket, precision, step settings) it builds each candidate step (the variants below),
runs each one's warm-up (compile, capture), times a fixed number of steps of each, checks
that each one's first losses agree with the first candidate's, and runs the fastest that
passed. The choice, every candidate's ms per step and the reason go into ``--stats``,
``nst bench`` and a small cache file, so later renders skip the trial.

The variants (``--step-variant``; engine/steppers.py builds them):

    eager     the step as it is written, eagerly                         (CPU default)
    graph     the eager step captured in one CUDA graph and replayed
    compiled  the objective under torch.compile, the step captured in one CUDA graph
    kernels   compiled, with the Triton kernels of engine/kernels.py (style taps, image update)

Sizes are bucketed by the square root of the area rounded to a power of two, so that other
aspect ratios and the scales of a multi-scale render reuse a choice. The cache file is JSON
(``NST_CACHE_DIR``, else ``$XDG_CACHE_HOME/nst``, else ``~/.cache/nst``, then
``step-variants.json``; ``--variant-cache FILE`` overrides it); an unreadable one is ignored
and rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FORMAT = "nst-step-variants-1"
REPLAYS = 10  # timed steps per candidate (after its warm-up)


def cache_path(override: str | None = None) -> Path:
    """Where the choices are kept."""
    if override:
        return Path(override)
    base = os.environ.get("NST_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "nst") if xdg else str(Path.home() / ".cache" / "nst")
    return Path(base) / "step-variants.json"


def device_name(device) -> str:
    """The GPU model (or the CPU's), for the key of a choice."""
    import torch

    from .device import cpu_name

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def size_bucket(hw: tuple[int, int]) -> int:
    """sqrt(H W) rounded to the nearest power of two (in log terms): 512x384 -> 512."""
    return 2 ** round(math.log2(math.sqrt(hw[0] * hw[1])))


def choice_key(device_name: str, torch_version: str, hw: tuple[int, int], precision: str, step: dict) -> str:
    """The key of a choice: what the speed of the candidates depends on."""
    parts = [device_name, f"torch {torch_version}", f"~{size_bucket(hw)} px", precision]
    parts += [f"{k}={step[k]}" for k in sorted(step)]
    return " | ".join(parts)


@dataclass
class Choice:
    """A variant chosen for a key, and why."""

    variant: str
    reason: str
    ms: dict = field(default_factory=dict)  # candidate -> ms per step (None: it failed; see errors)
    errors: dict = field(default_factory=dict)  # candidate -> why it was not eligible
    cached: bool = False  # read from the cache file, not measured now
    key: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
        return {}
    return data["choices"]


def cached_choice(key: str, path: Path) -> Choice | None:
    """The choice recorded for ``key``, if any."""
    entry = _read(path).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("variant"), str):
        return None
    return Choice(entry["variant"], entry.get("reason", ""), entry.get("ms", {}), entry.get("errors", {}), True, key)


def record(choice: Choice, path: Path) -> None:
    """Add a choice to the cache file (written atomically; a cache that cannot be written
    costs a trial next time, nothing else)."""
    from .fsutil import atomic_write_text

    choices = _read(path)
    choices[choice.key] = {"variant": choice.variant, "reason": choice.reason, "ms": choice.ms,
                           "errors": choice.errors, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": FORMAT, "choices": choices}, indent=1) + "\n")
    except OSError:
        pass
    except Exception as e:  # the engine's own OutputError (a full disk, a read-only directory)
        if type(e).__name__ != "OutputError":
            raise


@dataclass
class Candidate:
    """A step variant to try: ``build()`` makes a stepper on its own copy of the start image."""

    name: str
    build: Callable[[], object]


def default_timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    from .device import sync

    def timer(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    return timer


def _agree(a, b, rtol: float) -> bool:
    """Losses (4,) a and b finite and equal to ``rtol`` (relative to the larger of each pair)."""
    import torch

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
    return bool(((a - b).abs() / scale <= rtol).all())


def trial(candidates: list[Candidate], timer, rtol: float, replays: int = REPLAYS):
    """Build, warm up and time every candidate; the fastest whose first losses agree with
    the first working candidate's. Returns (Choice, the winner's stepper). Each candidate
    runs on its own image; only the best so far is kept (GPU memory), the others are freed."""
    ms, errors, best, ref = {}, {}, None, None
    for cand in candidates:
        try:
            stepper = cand.build()
            first = stepper.step().detach().clone()  # the start image's losses
            for _ in range(max(0, stepper.warmup_steps - 1)):  # compile, capture
                stepper.step()
            seconds = timer(lambda: [stepper.step() for _ in range(replays)])
        except Exception as e:  # a candidate that cannot run here is not chosen; the render goes on
            ms[cand.name], errors[cand.name] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            continue
        ms[cand.name] = round(seconds / replays * 1e3, 4)
        if ref is None and _agree(first, first, rtol):
            ref = first
        if ref is None or not _agree(first, ref, rtol):
            errors[cand.name] = f"its first losses differ from {candidates[0].name}'s by more than {rtol:g}"
            continue
        if best is None or ms[cand.name] < ms[best[0]]:
            best = (cand.name, stepper)
    if best is None:
        raise RuntimeError("no step variant ran: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    timed = ", ".join(f"{k} {v:.3g} ms" for k, v in ms.items() if v is not None)
    return Choice(best[0], f"fastest of the candidates that passed the parity check ({timed})", ms, errors), best[1]
