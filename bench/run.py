"""``nst bench``: steps per second of the engine against eager PyTorch, in one process.

Protocol (../shared/DESIGN.md): same device, size and step count for every row; warm-up
first (compile/capture time reported separately); synchronise, time with CUDA events on
GPUs and ``perf_counter`` on the CPU; median over repeats. Rows that do not apply to the
device are listed as not applicable. Results: ``bench/results/<device>.json`` and
``.md``, and a plot of steps/s against size.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.config import option
from engine.errors import NSTError
from engine.features import VGGFeatures
from engine.fsutil import atomic_write_text
from engine.imageio import pil_to_tensor, resize_to
from engine.optimize import GRAPH_WARMUP_STEPS, prepare, resolve_plan, sync
from engine.settings import StylizeSettings
from engine.weights import resolve_weights

from . import flops as flops_mod
from .baselines import TutorialLoop, torchvision_features

log = logging.getLogger("nst")

CPU_SIZES = (128, 256)
GPU_SIZES = (256, 512, 1024, 2048, 4096)


@dataclass
class BenchSettings:
    sizes: tuple[int, ...] = option((), help="square sizes in px (default: 128 256 on CPU; 256 512 1024 2048 4096 on GPU)",
                                    parse=int, metavar="PX")
    steps: int = option(0, help="steps per timed repeat (default: 4 on CPU, 20 on GPU)")
    repeats: int = option(5, help="timed repeats; the median is reported")
    warmup: int = option(0, help=f"untimed steps first (default: 2 on CPU, {GRAPH_WARMUP_STEPS + 3} on GPU, "
                         "which covers the CUDA graph capture)")
    device: str = option("auto", help="auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    weights: str = option("random:0", help="weights spec; speed does not depend on the values, and the "
                          "default needs no download", metavar="SPEC")
    out: str = option("bench/results", help="directory for the JSON, markdown and plot", metavar="DIR")
    name: str | None = option(None, help="file stem for the results (default: from the device name)")
    interleave: bool | None = option(None, help="time the rows round-robin (default: on the CPU, where a shared "
                                     "machine's slow moments should hit every row alike; not on GPUs)")
    onnx: bool = option(True, help="also time target computation with ONNX Runtime against eager PyTorch")
    profile: bool = option(True, help="profile the engine's default step at the largest size and record where "
                           "the time goes (kernel groups, their share and achieved FLOP/s)")
    quick: bool = option(False, help="tiny size and few steps: proves the script works end to end, measures nothing")


# -- measurement helpers -------------------------------------------------------------

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


def _trim() -> None:
    """glibc's malloc_trim(0): give freed memory back to the OS (no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_steps(step, device, warmup: int, steps: int, repeats: int) -> dict:
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


# -- rows ----------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    label: str
    technique: str
    kind: str  # "baseline" | "engine"
    settings: dict | None = None  # StylizeSettings overrides for engine rows
    needs_cuda: bool = False
    torchscript: bool = False


ROWS = [
    Row("naive", "naive eager (targets every step)", "baseline: recomputes content/style features each step", "baseline"),
    Row("eager", "eager (targets once)", "baseline: fair tutorial loop, fp32 NCHW", "baseline"),
    Row("targets", "engine: precomputed targets", "engine reference path: fp32 NCHW eager", "engine",
        {"reference": True}),
    Row("channels_last", "+ channels-last", "fp32, channels-last network and image", "engine",
        {"precision": "fp32", "memory_format": "channels_last", "cuda_graph": False}),
    Row("bf16", "+ bf16 autocast", "bf16 convolutions, fp32 Grams/losses/image", "engine",
        {"precision": "bf16", "memory_format": "channels_last", "cuda_graph": False}, needs_cuda=True),
    Row("fp16", "+ fp16 autocast (instead of bf16)", "fp16 convolutions with static loss scaling", "engine",
        {"precision": "fp16", "memory_format": "channels_last", "cuda_graph": False}, needs_cuda=True),
    Row("graph", "+ CUDA graph", "bf16 + whole Adam step captured in one CUDA graph", "engine",
        {"precision": "bf16", "memory_format": "channels_last", "cuda_graph": True}, needs_cuda=True),
    Row("torchscript", "engine defaults on the exported TorchScript", "same as 'engine defaults', network from "
        "extractor.ts", "engine", {}, torchscript=True),
    Row("engine", "engine defaults", "what `nst stylize` runs on this device", "engine", {}),
]


@functools.lru_cache(maxsize=None)
def _images(size: int):
    """The demo's drawings at size x size (drawn once per size; no row changes them)."""
    from engine.demo import make_content, make_style

    content = resize_to(pil_to_tensor(make_content()), (size, size))
    style = resize_to(pil_to_tensor(make_style(seed=1)), (size, size))
    return content, style


def _row_dtype(row: Row, device) -> tuple[str, str]:
    if row.kind == "baseline":
        return "fp32", "contiguous"
    p = resolve_plan(StylizeSettings(device=device.type, **(row.settings or {})))
    return p.precision, "channels_last" if p.channels_last else "contiguous"


def build_row(row: Row, size: int, device, eager_net: VGGFeatures, weights, ts_dir, cfg) -> tuple[dict, object]:
    """Set a row up and warm it up; return its record and its step function (None if n/a)."""
    content, style = _images(size)
    base = StylizeSettings()
    out = {"key": row.key, "label": row.label, "technique": row.technique, "kind": row.kind, "applicable": True}
    if row.needs_cuda and device.type != "cuda":
        out.update(applicable=False, reason="needs CUDA")
        return out, None
    if row.torchscript and ts_dir is None:
        out.update(applicable=False, reason="TorchScript export failed or was skipped")
        return out, None
    precision, memory_format = _row_dtype(row, device)
    out.update(dtype=precision, memory_format=memory_format)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _trim()  # return freed heap to the OS, so the RSS increase below is this row's own
    rss_before = RSSPeak.rss()
    with RSSPeak() as rss:
        t_setup = time.perf_counter()
        runner = None
        if row.kind == "baseline":
            net = torchvision_features(weights, device)
            loop = TutorialLoop(net, content[None].to(device), style[None].to(device), base.learning_rate,
                                base.content_weight, base.style_weight, base.tv_weight, naive=(row.key == "naive"))
            step = loop.step
        else:
            settings = StylizeSettings(size=size, device=device.type, weights=cfg.weights, **(row.settings or {}))
            if row.torchscript:
                settings.extractor = str(ts_dir)
            p = prepare(content, [(style, 1.0)], settings, extractor=None if row.torchscript else eager_net)
            runner = p.runner
            step = runner.step
        sync(device)
        out["setup_s"] = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            step()
        sync(device)
        out["warmup_s"] = time.perf_counter() - t0
        out["capture_s"] = getattr(runner, "capture_s", 0.0) if runner is not None else 0.0
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated (setup, warm-up and timed steps)"
    else:
        out["peak_mem_bytes"] = max(rss.peak - rss_before, 1)
        out["peak_mem_kind"] = "increase of process RSS over setup and warm-up (sampled)"
    out["flops_per_step"] = flops_mod.step_flops(size, size, extra_forwards=2 if row.key == "naive" else 0)
    return out, step


def time_rows(built: list[tuple[dict, object]], device, cfg) -> None:
    """Time every applicable row; fill in steps/s and the derived numbers.

    On the CPU the repeats go round-robin over the rows (row 1, row 2, ..., row 1, ...),
    so that a slow moment of a shared machine hits every row alike; on a GPU, where rows
    cannot all stay in memory at large sizes, each row is timed in turn.
    """
    live = [(rec, step) for rec, step in built if step is not None]
    per_step: dict[int, list[float]] = {id(rec): [] for rec, _ in live}
    if cfg.interleave:
        for _ in range(cfg.repeats):
            for rec, step in live:
                per_step[id(rec)] += time_steps(step, device, 0, cfg.steps, 1)["repeats_s_per_step"]
    else:
        for rec, step in live:
            per_step[id(rec)] = time_steps(step, device, 0, cfg.steps, cfg.repeats)["repeats_s_per_step"]
    for rec, _ in live:
        ts = per_step[id(rec)]
        med = statistics.median(ts)
        rec.update(steps_per_s=1.0 / med, ms_per_step=med * 1e3, repeats_ms_per_step=[t * 1e3 for t in ts],
                   tflops=rec["flops_per_step"] / med / 1e12)
        if device.type == "cuda":
            rec["peak_mem_bytes"] = max(rec["peak_mem_bytes"], torch.cuda.max_memory_allocated(device))


def run_size(size: int, device, eager_net, weights, ts_dir, cfg) -> list[dict]:
    rows, built = [], []
    for row in ROWS:
        log.info("size %d: %s", size, row.label)
        try:
            rec, step = build_row(row, size, device, eager_net, weights, ts_dir, cfg)
            built.append((rec, step))
            if not cfg.interleave and step is not None:
                time_rows([(rec, step)], device, cfg)
                built[-1] = (rec, None)  # timed: let it go before the next row
                del step
        except torch.cuda.OutOfMemoryError:
            rec = {"key": row.key, "label": row.label, "technique": row.technique, "kind": row.kind,
                   "applicable": True, "oom": True, "reason": "out of GPU memory"}
            built.append((rec, None))
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(built[-1][0])
    if cfg.interleave:
        log.info("size %d: timing %d rows round-robin", size, sum(1 for _, s in built if s is not None))
        time_rows(built, device, cfg)
    built.clear()
    gc.collect()
    return rows


def _onnx_targets(size: int, device, eager_net, onnx_path, cfg) -> dict:
    """Time to compute the targets (one forward at content size, one at style size)."""
    import onnxruntime as ort

    content, style = _images(size)
    c, s = content[None], style[None]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    net = eager_net.to(device)
    cd, sd = c.to(device), s.to(device)

    def eager():
        with torch.no_grad():
            net(cd)
            net(sd)

    def onnx():
        sess.run(None, {"image": c.numpy()})
        sess.run(None, {"image": s.numpy()})

    reps = max(3, cfg.repeats)
    e = time_steps(eager, device, 1, 1, reps)
    o = time_steps(onnx, torch.device("cpu"), 1, 1, reps)
    return {"size": size, "eager_ms": e["s_per_step"] * 1e3, "eager_device": device.type,
            "onnxruntime_ms": o["s_per_step"] * 1e3, "onnxruntime_provider": "CPUExecutionProvider",
            "onnxruntime_vs_eager": e["s_per_step"] / o["s_per_step"]}


_CONV_KEYS = ("convolution", "conv2d", "mkldnn_conv", "cudnn_conv", "conv_")
_MATMUL_KEYS = ("aten::mm", "aten::bmm", "gemm", "sgemm", "cutlass", "xmma", "ampere_", "sm90_")


def profile_engine(size: int, device, eager_net, cfg) -> dict:
    """Where one engine step spends its time, by kernel group, with achieved FLOP/s.

    Groups: convolution backward (input gradient), convolution forward, Gram matmuls, and
    everything else (ReLU, pooling and their backward, normalisation, losses, Adam).
    """
    from torch.profiler import ProfilerActivity, profile

    content, style = _images(size)
    settings = StylizeSettings(size=size, device=device.type, weights=cfg.weights)
    p = prepare(content, [(style, 1.0)], settings, extractor=eager_net)
    step = p.runner.step
    for _ in range(cfg.warmup):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = max(2, min(cfg.steps, 5))
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    use_cuda = device.type == "cuda"
    groups = {"convolution backward": 0.0, "convolution forward": 0.0, "Gram matmuls": 0.0, "other": 0.0}
    ops = []
    for ev in prof.key_averages():
        t = (getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)) if use_cuda \
            else ev.self_cpu_time_total
        if t <= 0:
            continue
        name = ev.key
        low = name.lower()
        if "backward" in low and ("conv" in low or "wgrad" in low or "dgrad" in low):
            g = "convolution backward"
        elif any(k in low for k in _CONV_KEYS):
            g = "convolution forward"
        elif any(k in low for k in _MATMUL_KEYS):
            g = "Gram matmuls"
        else:
            g = "other"
        groups[g] += t
        ops.append((t, name, g))
    total = sum(groups.values()) or 1.0
    conv_f = flops_mod.conv_forward_flops(size, size)
    gram_f = flops_mod.gram_flops(size, size, flops_mod.STYLE_LAYERS)
    per_step = {k: v / 1e6 / n for k, v in groups.items()}  # seconds per step
    out = {"size": size, "steps_profiled": n, "clock": "CUDA kernel time" if use_cuda else "CPU self time",
           "groups": {k: {"s_per_step": v, "share": groups[k] / total} for k, v in per_step.items()},
           "top_ops": [{"name": name[:80], "s_per_step": t / 1e6 / n, "share": t / total, "group": g}
                       for t, name, g in sorted(ops, reverse=True)[:12]]}
    for g, f in (("convolution forward", conv_f), ("convolution backward", conv_f), ("Gram matmuls", gram_f)):
        if per_step[g] > 0:
            out["groups"][g]["flops_per_s"] = f / per_step[g]
    return out


def environment(device) -> dict:
    from importlib import metadata

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    for dist in ("torchvision", "onnxruntime", "onnx"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_bytes=props.total_memory, driver=_driver(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device"] = f"CPU: {env['cpu']} ({torch.get_num_threads()} threads)"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _driver() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def run(cfg: BenchSettings) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          (cfg.device if cfg.device != "auto" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NSTError("--device cuda: no CUDA GPU is available to PyTorch")
    gpu = device.type == "cuda"
    if cfg.quick:
        cfg = dataclasses.replace(cfg, sizes=cfg.sizes or (64,), steps=cfg.steps or 2, repeats=min(cfg.repeats, 2),
                                  warmup=cfg.warmup or (GRAPH_WARMUP_STEPS + 1 if gpu else 1))
    cfg = dataclasses.replace(
        cfg,
        sizes=tuple(cfg.sizes) or (GPU_SIZES if gpu else CPU_SIZES),
        steps=cfg.steps or (20 if gpu else 4),
        warmup=cfg.warmup or (GRAPH_WARMUP_STEPS + 3 if gpu else 2),
    )
    if cfg.interleave is None:
        cfg = dataclasses.replace(cfg, interleave=not gpu)
    if cfg.repeats < 1 or cfg.steps < 1:
        raise NSTError("--repeats and --steps must be at least 1")
    env = environment(device)
    weights = resolve_weights(cfg.weights, "vgg19")
    log.info("bench on %s, sizes %s, %d steps x %d repeats (median), warm-up %d", env["device"], cfg.sizes,
             cfg.steps, cfg.repeats, cfg.warmup)
    if weights.is_random:
        log.info("weights %s: random values; speed does not depend on them", weights.source)

    # Peaks: a large matmul per dtype, measured here, now.
    n = 4096 if gpu else (512 if cfg.quick else 2048)
    peaks = {"fp32": matmul_peak(device, torch.float32, n)}
    if gpu:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_peak(device, torch.float32, n)
        torch.backends.cuda.matmul.allow_tf32 = old
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, n)
        peaks["fp16"] = matmul_peak(device, torch.float16, n)
    log.info("matmul peaks (%dx%d): %s", n, n, ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))

    eager_net = VGGFeatures(weights)
    tmp = tempfile.TemporaryDirectory(prefix="nst-bench-")
    ts_dir, onnx_path = None, None
    try:
        from export import ExportSettings, export_extractor

        ts_dir = Path(tmp.name) / "export"
        formats = ("torchscript", "onnx") if cfg.onnx else ("torchscript",)
        export_extractor(ExportSettings(out=ts_dir, weights=cfg.weights, formats=formats, trace_size="64x64",
                                        check_size="48x80"), module=eager_net)
        onnx_path = ts_dir / "extractor.onnx" if cfg.onnx else None
    except NSTError as e:
        log.warning("export for the TorchScript/ONNX rows failed: %s", e)
        ts_dir = None

    results = {"environment": env, "settings": dataclasses.asdict(cfg), "peaks_flops": peaks,
               "flops_formula": flops_mod.__doc__.strip(), "sizes": {}}
    try:
        for size in cfg.sizes:
            rows = run_size(size, device, eager_net, weights, ts_dir, cfg)
            _derive(rows, peaks, device)
            entry = {"rows": rows}
            if onnx_path is not None:
                try:
                    entry["onnx_targets"] = _onnx_targets(size, device, eager_net, onnx_path, cfg)
                except Exception as e:  # report, do not crash the whole benchmark
                    entry["onnx_targets"] = {"error": f"{type(e).__name__}: {e}"}
            results["sizes"][str(size)] = entry
    finally:
        tmp.cleanup()
    if cfg.profile:
        size = 256 if (not gpu and 256 in cfg.sizes) else max(cfg.sizes) if not gpu else (
            1024 if 1024 in cfg.sizes else max(cfg.sizes))
        log.info("profiling the engine step at %d px", size)
        try:
            results["profile"] = profile_engine(size, device, eager_net, cfg)
        except Exception as e:  # the profile is a diagnosis, never a reason to lose the results
            results["profile"] = {"error": f"{type(e).__name__}: {e}"}
    # The peak again, at the end: the larger of the two is used for every fraction.
    for key, before in list(peaks.items()):
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[key]
        if key == "tf32":
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
        after = matmul_peak(device, dtype, n)
        if key == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = old
        results.setdefault("peak_measurements", {})[key] = [before, after]
        peaks[key] = max(before, after)
    for entry in results["sizes"].values():
        _derive(entry["rows"], peaks, device)
    results["targets"] = _targets(results, device)
    return results


def _derive(rows: list[dict], peaks: dict, device) -> None:
    by = {r["key"]: r for r in rows}
    for r in rows:
        if not r.get("steps_per_s"):
            continue
        for base in ("naive", "eager"):
            b = by.get(base, {})
            if b.get("steps_per_s"):
                r[f"speedup_vs_{base}"] = r["steps_per_s"] / b["steps_per_s"]
        dtype = r.get("dtype", "fp32")
        # On CUDA, fp32 convolutions run in TF32 by default (cudnn.allow_tf32): compare with that peak.
        peak_key = "tf32" if device.type == "cuda" and dtype == "fp32" and torch.backends.cudnn.allow_tf32 else dtype
        if peak_key in peaks:
            r["peak_key"] = peak_key
            r["peak_fraction"] = r["tflops"] * 1e12 / peaks[peak_key]


def _targets(results: dict, device) -> dict:
    """The issue's speed targets, and by how much each was met or missed."""
    out = {}
    sizes = results["sizes"]

    def row(size, key):
        return next((r for r in sizes.get(str(size), {}).get("rows", []) if r["key"] == key), {})

    if device.type == "cpu" and "256" in sizes:
        e = row(256, "engine")
        if e.get("steps_per_s"):
            out["cpu_256_vs_eager"] = {"target": 1.0, "got": e.get("speedup_vs_eager")}
            out["cpu_256_vs_naive"] = {"target": 1.9, "got": e.get("speedup_vs_naive")}
            out["cpu_256_peak_fraction"] = {"target": 0.85, "got": e.get("peak_fraction")}
    if device.type == "cuda":
        for size, tgt in ((512, 3.0), (2048, 2.0)):
            e = row(size, "engine")
            if e.get("steps_per_s"):
                out[f"gpu_{size}_vs_eager"] = {"target": tgt, "got": e.get("speedup_vs_eager")}
        for size in (1024, 2048, 4096):
            e = row(size, "engine")
            if e.get("steps_per_s"):
                out[f"gpu_{size}_peak_fraction"] = {"target": 0.5, "got": e.get("peak_fraction")}
    for v in out.values():
        got = v["got"]
        v["met"] = got is not None and got >= v["target"]
        v["margin"] = None if got is None else got / v["target"] - 1.0
    return out


def write(results: dict, out_dir: Path, name: str | None) -> list[Path]:
    from .report import markdown, plot

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or _slug(results["environment"]["device"])
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=1, default=float) + "\n")
    atomic_write_text(paths[1], markdown(results))
    png = plot(results, out_dir / f"{stem}.png")
    if png:
        paths.append(png)
    return paths


def main_from_args(cfg: BenchSettings) -> int:
    results = run(cfg)
    paths = write(results, Path(cfg.out), cfg.name)
    from .report import markdown

    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0

