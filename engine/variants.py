"""Which step runs on a GPU, chosen by measurement: ``trial`` is the entry point (called by
engine/session.py ``choose_step``, which also reads and writes the cache here).

Kernels written without a GPU at hand must never make the engine slower, so on CUDA the
engine does not trust a default: at the first render for a (GPU model, torch version,
size bucket, precision, step settings) it builds each candidate step (the variants below),
runs each one's warm-up (compile, capture), times a fixed number of steps of each, checks
that each one's losses agree with the first candidate's at the start image and after the
same number of steps, and runs the fastest that passed. The choice, every candidate's ms
per step and the reason go into ``--stats``, ``nst bench`` and a small cache file, so later
renders skip the trial.

The variants (``--step-variant``; engine/steppers.py builds them):

    eager     the step as it is written, eagerly                         (CPU default)
    graph     the eager step captured in one CUDA graph and replayed
    compiled  the objective under torch.compile, the step captured in one CUDA graph
    kernels   compiled, with the Triton kernels of engine/kernels.py (style taps, image update)

Sizes are bucketed by the square root of the area rounded to a power of two, so that other
aspect ratios and nearby sizes reuse a choice (a multi-scale render's scales, about 1.4x
apart, share one in pairs). The cache file is JSON
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
WARMUP = 4  # steps every candidate runs before it is timed: at least any stepper's warmup_steps
            # (a CUDA graph: 3 eager steps and the capture, engine/steppers.py)


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


def _agree(a, b, rtol: float, weights=(1.0, 1.0, 1.0, 1.0)) -> bool:
    """Losses (4,) a and b ([total, content, style, tv]) finite and equal to ``rtol``: the
    total relative to the larger of the two, each part, times its weight, relative to the
    larger total. A part's own relative error would be noise where it is nearly zero (the
    content loss at the content image is bf16 rounding alone), yet what matters is its share
    of the objective."""
    import torch

    w = torch.tensor(weights, dtype=torch.float64)
    a, b = a.detach().double().cpu() * w, b.detach().double().cpu() * w
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = torch.maximum(a[0].abs(), b[0].abs()).clamp_min(1e-30)
    return bool(((a - b).abs() / scale <= rtol).all())


def trial(candidates: list[Candidate], timer, rtol: float, replays: int = REPLAYS, warmup: int = WARMUP,
          weights=(1.0, 1.0, 1.0, 1.0)):
    """Build, warm up and time every candidate; the fastest whose losses agree with the first
    working candidate's, both at the start image and after the last timed step (every
    candidate runs the same ``warmup`` + ``replays`` steps from the same image, so the second
    check covers the backward and the update, not only the forward). ``weights``: the
    content, style and TV weights after a 1 for the total (``_agree``). Returns (Choice, the
    winner's stepper). Each candidate runs on its own image; only the best so far is kept
    (GPU memory), the others are freed."""
    ms, errors, best, ref = {}, {}, None, None
    for cand in candidates:
        stepper = out = replay = None  # the previous candidate, unless it is the best, is freed before this one builds
        try:
            stepper = cand.build()
            if stepper.warmup_steps > warmup:
                raise RuntimeError(f"it needs {stepper.warmup_steps} warm-up steps, the trial gives {warmup}")
            first = stepper.step().detach().clone()  # the start image's losses
            for _ in range(warmup - 1):  # compile, capture
                stepper.step()
            out = []

            def replay(stepper=stepper):
                for _ in range(replays):
                    out[:] = [stepper.step()]

            seconds = timer(replay)
            last = out[0].detach().clone()  # (4,) the losses of the last timed step (a graph's output buffer)
        except Exception as e:  # a candidate that cannot run here is not chosen; the render goes on
            ms[cand.name], errors[cand.name] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            continue
        ms[cand.name] = round(seconds / replays * 1e3, 4)
        if not (_agree(first, first, rtol, weights) and _agree(last, last, rtol, weights)):
            errors[cand.name] = "its losses are not finite"
            continue
        ref = ref or (cand.name, first, last)  # the first candidate that ran is the reference
        if not _agree(first, ref[1], rtol, weights):
            errors[cand.name] = f"its first losses differ from {ref[0]}'s by more than {rtol:g}"
            continue
        if not _agree(last, ref[2], rtol, weights):
            errors[cand.name] = f"its losses after {warmup + replays} steps differ from {ref[0]}'s by more than {rtol:g}"
            continue
        if best is None or ms[cand.name] < ms[best[0]]:
            best = (cand.name, stepper)
    if best is None:
        raise RuntimeError("no step variant ran: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    timed = ", ".join(f"{k} {v:.3g} ms" for k, v in ms.items() if v is not None)
    return Choice(best[0], f"fastest of the candidates that passed the parity check ({timed})", ms, errors), best[1]
