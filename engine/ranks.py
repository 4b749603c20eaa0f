"""Tiled steps across ranks (``--distributed``, issue #15): torch.distributed, NCCL on
GPUs and gloo on CPUs, launched by torchrun.

The split. Rank 0 (the *lead*) runs the render as a single process would: the plan, the
budget and its clock, the loop, the optimiser, the progress report, the state file and
the output. The other ranks (*workers*, engine/worker.py) hold the network and the
targets and compute their share of the tiles (every ``world``-th tile) when the lead asks:

    lead:    Prepare (the scale's settings and plan) -> targets, tiled, each rank its share, summed
    per evaluation of the objective (engine/tiles.py SharedTiles):
    lead:    Evaluate (with or without gradient), broadcast x    (1, 3, H, W) float32
    all:     pass 1 over own tiles -> all-reduce Gram and content sums
    all:     pass 2 over own tiles -> image gradient, reduced to the lead
    lead:    TV, the optimiser step, the clock; Stop at the end

The messages are typed values (``Prepare``, ``Evaluate``, ``Stop``): ``Ranks.send`` on the
lead, ``Ranks.receive`` on a worker.

So every decision that reads a clock (time budget, time limit, adaptive plan) is taken
once, on the lead: ranks cannot disagree on when to stop. The alternative, each rank
stepping its own copy of the image on an all-reduced gradient, moves as many bytes (an
all-reduce is a reduce and a broadcast); measured with two gloo ranks on the CPU, the two
differ by less than 10% either way, 0.02-0.4 s per step at 1024-4096 px against seconds to
minutes for a tiled step there (bench/results/tiles-cpu-*.md).

Failure: every collective runs under the process group's timeout (``--rank-timeout``); a
lost rank raises ``RankLostError`` on the others (gloo: at once, on the closed connection;
NCCL: at the timeout, with TORCH_NCCL_BLOCKING_WAIT set here; not tested on GPUs). On the
lead the loop (engine/loop.py) is the one place that handles it: the render stops with the
best image so far (stats.stopped "rank-lost"); a worker ends with one line on stderr. Workers ignore stop signals (they leave on STOP or a lost lead);
the lead holds them through each exchange, so that no rank is left inside a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError, NSTError, RankLostError


class RanksDisagree(InputError):
    """The ranks of a distributed render do not render the same thing, or one could not start."""


@dataclass(frozen=True)
class Stop:
    """The render is done: the workers leave."""


@dataclass(frozen=True)
class Prepare:
    """Build the objective of a scale (engine/session.py build_objective), every rank with
    its share of the targets' tiles."""

    settings: object  # the scale's StylizeSettings
    plan: object  # its StepPlan (engine/plan.py), decided by the lead
    out_hw: tuple[int, int]
    style_hws: tuple


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the objective at the image the lead broadcasts next."""

    with_grad: bool
    hw: tuple[int, int]


_KINDS = (Stop, Prepare, Evaluate)  # a message's kind travels as its index here


def launched_ranks() -> int:
    """The world size torchrun (or a caller setting RANK/WORLD_SIZE) launched this process
    with; 1 outside such a launch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _first_line(e: BaseException) -> str:
    """The backend's message, short: its first sentence, without gloo's source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split("\n")[0]
    text = text.split(". ")[0].rstrip(".")
    return text[:160] or type(e).__name__


@dataclass
class Ranks:
    """This process's place among the ranks, and the collectives the engine uses."""

    rank: int
    world: int
    device: torch.device  # where collective tensors live: cuda for NCCL, cpu for gloo
    stopped: bool = False  # the lead has sent Stop
    lost: bool = False  # a collective failed: another rank is gone (nothing more is sent)
    agreed: bool = False  # the ranks agreed on what they render (``agree``): messages may follow
    refused: bool = False  # the ranks refused together at the agreement: they leave together

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def agree(self, mine: dict | None, failure: BaseException | None = None) -> None:
        """Before any work, every rank's fingerprint of what it renders (engine/state.py:
        the settings that define the render, its decoded inputs, the network's parameters),
        or why it could not start (``failure``), gathered on every rank (one all-gather of
        small objects). Refused on every rank, with the first difference from the lead's or
        the first failure, so that no rank renders something else, or waits for one that
        will never come."""
        from .state import first_difference

        entries: list = [None] * self.world
        mine = {"print": mine, "failure": None if failure is None else str(failure)}
        self._call(dist.all_gather_object, entries, mine)
        failed = [(r, e["failure"]) for r, e in enumerate(entries) if e["failure"] is not None]
        if failed:
            self.refused = True
            if failure is not None:
                raise failure
            r, why = failed[0]
            raise RanksDisagree(f"rank {r} of {self.world} could not start ({why}): no rank renders")
        for r, e in enumerate(entries[1:], 1):
            why = first_difference(entries[0]["print"], e["print"])
            if why:
                self.refused = True
                raise RanksDisagree(f"rank {r} of {self.world} would render something else than the lead (rank 0): "
                                    f"{why}; every rank needs the same input files, weights and settings")
        self.agreed = True

    def stop_workers(self) -> None:
        """The lead tells the workers to stop (once; as soon as the render is done, so that
        they do not wait through the writing of the image)."""
        if self.lead and self.agreed and not self.stopped and not self.lost:
            self.stopped = True
            self.send(Stop())

    def mine(self, items: list) -> list:
        """This rank's share: every world-th item. Border tiles are smaller than inner ones;
        interleaving spreads them over the ranks."""
        return items[self.rank::self.world]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo: "Connection closed by peer"; NCCL/gloo timeouts (DistBackendError)
            self.lost = True
            who = "a worker rank" if self.lead else "the lead rank (0)"
            raise RankLostError(f"rank {self.rank} of {self.world}: {who} stopped answering ({_first_line(e)})") \
                from None

    def together(self) -> None:
        """Wait for every rank (a barrier)."""
        self._call(dist.barrier)

    def send(self, msg) -> None:
        """The lead sends a message (Stop, Prepare or Evaluate) to every worker."""
        self._exchange(msg)

    def receive(self):
        """A worker's next message from the lead."""
        return self._exchange(None)

    def _exchange(self, msg):
        # A head of four integers (kind, with_grad, H, W) for every message; a Prepare's
        # settings follow as one pickled object.
        head = torch.zeros(4, dtype=torch.int64, device=self.device)
        if self.lead:
            kind = _KINDS.index(type(msg))
            grad, (h, w) = (int(msg.with_grad), msg.hw) if isinstance(msg, Evaluate) else (0, (0, 0))
            head.copy_(torch.tensor([kind, grad, h, w], dtype=torch.int64))
        self._call(dist.broadcast, head, 0)
        kind, grad, h, w = (int(v) for v in head.tolist())
        if _KINDS[kind] is Prepare:
            box = [msg]
            self._call(dist.broadcast_object_list, box, 0, device=self.device if self.device.type == "cuda" else None)
            return box[0]
        return Evaluate(bool(grad), (h, w)) if _KINDS[kind] is Evaluate else Stop()

    def share_image(self, x: torch.Tensor | None, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The lead's image (1, 3, H, W) float32, on every rank."""
        if self.lead:
            buf = x.detach().float().contiguous().to(self.device)
        else:
            buf = torch.empty(1, 3, *hw, dtype=torch.float32, device=self.device)
        self._call(dist.broadcast, buf, 0)
        return buf.to(device)

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks (float32, one all-reduce for all of them)."""
        if not tensors:
            return tensors
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]).to(self.device)
        self._call(dist.all_reduce, flat)
        out, k = [], 0
        for t in tensors:
            out.append(flat[k:k + t.numel()].view(t.shape).to(t.device))
            k += t.numel()
        return out

    def sum_to_lead(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, on the lead (the workers' copies are left as they are)."""
        buf = t.contiguous().to(self.device)
        self._call(dist.reduce, buf, 0)
        if self.lead:
            t.copy_(buf)  # into the caller's layout (channels-last stays channels-last)
        return t


_CURRENT: list = []  # the one Ranks of this process's group: its stopped/lost flags are the process's


def current() -> Ranks | None:
    """The ranks of the default process group (one object per group, shared by everything
    in the process), or None without one."""
    if not (dist.is_available() and dist.is_initialized()):
        _CURRENT.clear()
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if _CURRENT and (_CURRENT[0].rank, _CURRENT[0].world) == (rank, world):
        return _CURRENT[0]
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _CURRENT[:] = [Ranks(rank, world, device)]
    return _CURRENT[0]


def for_settings(settings) -> Ranks | None:
    """The ranks a render with these settings runs on: None unless --distributed."""
    if not settings.distributed:
        return None
    ranks = current()
    if ranks is None:
        raise InputError("--distributed needs a torch.distributed process group: launch with torchrun "
                         "--nproc-per-node N -m nst stylize ... (the command line joins the group itself)")
    return ranks


@contextlib.contextmanager
def joined(device_type: str, timeout_s: float):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK in the environment): NCCL for ``device_type`` cuda, else gloo.
    On leaving, the lead tells the workers to stop."""
    if dist.is_initialized():
        raise InputError("a torch.distributed process group is already set up in this process")
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InputError(f"--distributed runs under torchrun (no {missing[0]} in the environment): torchrun "
                         "--nproc-per-node N -m nst stylize ... --distributed")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InputError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; launch "
                             "at most that many ranks per machine")
        torch.cuda.set_device(local)  # torch.device("cuda") is this rank's GPU from here on
        backend = "nccl"
        # Waits on the host, so that a collective past the timeout raises (RankLostError)
        # instead of NCCL's watchdog aborting the process.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise NSTError(f"could not join the ranks ({backend}): {_first_line(e)}") from None
    ranks = current()
    try:
        yield ranks
    except BaseException:
        # An error or a signal here: the workers are told to stop; no rank waits for another.
        # Ranks that refused together at the agreement leave together. With a rank lost
        # nothing more is sent, and tearing the group down could wait on it: the process
        # exits instead.
        if not ranks.lost:
            with contextlib.suppress(RankLostError):
                if ranks.refused:
                    ranks.together()
                else:
                    ranks.stop_workers()
            dist.destroy_process_group()
        _CURRENT.clear()
        raise
    # Done: every rank leaves the group together (a rank tearing down its connections while
    # another still uses them can abort that one, seen with gloo on torch 2.11).
    with contextlib.suppress(RankLostError):
        ranks.stop_workers()
        ranks.together()
    dist.destroy_process_group()
    _CURRENT.clear()
