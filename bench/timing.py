"""Timing and memory measurement for the benchmarks: synchronised step timing (CUDA
events on GPUs), a matmul peak, and a sampler of the process's peak resident memory."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import torch

from nst.engine.device import sync


class RSSPeak:
    """Peak resident set size of this process while in the block (sampled every 5 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def trim() -> None:
    """glibc's malloc_trim(0): give freed memory back to the OS (no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_steps(step, device, warmup: int, steps: int, repeats: int) -> dict:
    """Median seconds per ``step()`` over ``repeats`` runs of ``steps`` calls, after warm-up."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    per_step = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            per_step.append((time.perf_counter() - t) / steps)
    med = statistics.median(per_step)
    return {"s_per_step": med, "repeats_s_per_step": per_step, "warmup_s": warm_s}


def matmul_peak(device, dtype, n: int) -> float:
    """Measured FLOP/s of an n x n matmul in ``dtype``: the best of 7 repeats after warm-up.

    The best, not the median: a peak is what the hardware can do, and on a shared machine
    a busy moment only ever makes it look slower (which would flatter every fraction).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    r = time_steps(lambda: a @ b, device, 2, 3 if device.type == "cpu" else 20, 7)
    return 2 * n**3 / min(r["repeats_s_per_step"])
