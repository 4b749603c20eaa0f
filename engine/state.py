"""Resumable renders (``--state FILE``, ``--resume``): the image and the optimiser's state
at a progress interval, in one file, so that a multi-hour render can continue where it
stopped (a crash, a lost rank, a machine taken back).

A state file holds the scale and step it was written after, the image (1, 3, H, W)
float32, the stepper's state (Adam's moments and step count, or L-BFGS's history) and a
fingerprint of what the render computes: the settings that shape the loss and the
optimiser, and a hash of the input images. Resuming with another fingerprint is refused;
settings that only change how the steps run (device, precision, tiles, ranks, the
progress interval, and --steps of a single-scale render with a constant learning rate)
may differ. Resumed, a render continues with the same steps it
would have run: the image and the optimiser state are restored exactly (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .fsutil import OutputError, atomic_path

FORMAT = "nst-render-state-1"
# How a render runs, not what it computes: these may change between a run and its resume.
RUN_FIELDS = frozenset({
    "steps", "progress_every", "time_limit", "time_budget", "device", "precision", "memory_format", "reference",
    "cuda_graph", "compile", "loss_scale", "tile", "checkpointing", "memory_limit", "distributed", "rank_timeout",
    "budget_plan", "move_on", "runtime", "step_variant", "variant_cache",
})


@dataclass
class RenderState:
    scale_index: int  # which scale (0 for a single-scale render)
    step: int  # steps done at that scale
    before: int  # steps of the earlier scales
    image: torch.Tensor  # (1, 3, H, W) float32, after ``step`` steps
    optimizer: dict  # the stepper's state_dict()
    fingerprint: dict


def fingerprint(settings, content: torch.Tensor, styles) -> dict:
    """What a render computes: the settings outside RUN_FIELDS and a hash of the inputs."""
    out = {}
    for f in dataclasses.fields(settings):
        if f.name not in RUN_FIELDS:
            v = getattr(settings, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    if settings.lr_schedule != "constant" or len(settings.scale_sizes()) > 1:
        # A schedule's length (its rate at every step depends on it), or the steps of every
        # scale before the last.
        out["steps"] = settings.steps
    h = hashlib.sha256()
    for img, w in [(content, 1.0)] + list(styles):
        t = img.detach().float().cpu().contiguous()
        h.update(repr((tuple(t.shape), float(w))).encode())
        h.update(t.numpy().tobytes())
    out["inputs"] = h.hexdigest()
    return out


def save_state(path: str | Path, state: RenderState) -> None:
    """Write atomically: an interrupted write leaves the previous state file whole."""
    payload = {"format": FORMAT, "scale": state.scale_index, "step": state.step, "before": state.before,
               "image": state.image.detach().float().cpu().contiguous(), "optimizer": state.optimizer,
               "fingerprint": state.fingerprint}
    with atomic_path(path, label="--state") as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as e:  # torch's writer reports a full disk as a RuntimeError
            raise OutputError(f"cannot write --state {path}: {str(e).splitlines()[0][:120]}") from None


def load_state(path: str | Path, expected: dict) -> RenderState:
    """The state in ``path``, checked against the fingerprint of the render to resume."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--resume: no state file {path} (it is written at progress intervals with --state {path})")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: pickle, zip and torch all raise their own
        raise InputError(f"--resume: {path} is not a readable state file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"--resume: {path} is not an nst render state ({FORMAT})")
    saved = d["fingerprint"]
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            what = "the input images differ" if key == "inputs" else \
                f"--{key.replace('_', '-')} was {saved.get(key)!r}, now {expected.get(key)!r}"
            raise InputError(f"--resume: {path} belongs to another render ({what})")
    return RenderState(int(d["scale"]), int(d["step"]), int(d["before"]), d["image"], d["optimizer"], saved)
