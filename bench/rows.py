"""The waterfall's rows (one per technique) and how each is set up, warmed up and timed.

Order: the baselines a user could write (naive, fair eager, and the strongest: the same
loop compiled, bench/user_loop.py), then the engine's techniques added one at a time,
then the engine's defaults (also on the exported TorchScript file). Speed goals are
stated against the fastest baseline row, not against eager.
Rows that do not apply to the device are listed as not applicable, never dropped.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass

import torch

from nst.engine.device import float32_math_now, sync
from nst.engine.plan import resolve_plan
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings

from . import flops as flops_mod
from .baselines import TutorialLoop, vgg19_features
from .inputs import drawn_pair
from .timing import RSSPeak, time_steps, trim
from .user_loop import UserLoop, vgg19_cut

log = logging.getLogger("nst")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    technique: str
    kind: str  # "baseline" | "engine"
    settings: dict | None = None  # StylizeSettings overrides for engine rows
    needs_cuda: bool = False
    torchscript: bool = False
    compile_mode: str | None = None  # the compiled user loop's torch.compile mode
    whole: bool = False  # the user loop's whole step under torch.compile (loss, backward, Adam, clamp)
    onnx_step: bool = False  # the export's step graphs in ONNX Runtime (--runtime onnxruntime; CPU)


ROWS = [
    Row("naive", "naive eager (targets every step)", "baseline: recomputes content/style features each step", "baseline"),
    Row("eager", "eager (targets once)", "baseline: fair tutorial loop, fp32 NCHW", "baseline"),
    Row("user_compile", "user loop + torch.compile", "baseline: bf16 autocast on GPUs, channels-last, compiled loss, "
        "fused Adam (bench/user_loop.py)", "baseline", compile_mode="default"),
    Row("user_compile_ro", "user loop + torch.compile reduce-overhead", "baseline: the same, compiled with "
        "mode=\"reduce-overhead\" (CUDA graphs)", "baseline", needs_cuda=True, compile_mode="reduce-overhead"),
    Row("user_whole", "user loop, whole step compiled", "baseline: loss, backward, fused Adam and clamp under one "
        "torch.compile call (GPUs only: a minute of compiling that no CPU user would wait for)", "baseline",
        needs_cuda=True, compile_mode="default", whole=True),
    Row("user_whole_ro", "user loop, whole step compiled reduce-overhead", "baseline: the same with "
        "mode=\"reduce-overhead\"", "baseline", needs_cuda=True, compile_mode="reduce-overhead", whole=True),
    Row("targets", "engine: precomputed targets", "engine reference path: fp32 NCHW eager", "engine",
        {"reference": True}),
    Row("channels_last", "+ channels-last", "fp32, channels-last network and image", "engine",
        {"precision": "fp32", "memory_format": "channels_last", "cuda_graph": False}),
    Row("tf32", "+ TF32 (instead of IEEE float32)", "fp32 convolutions and matmuls on TF32 tensor cores", "engine",
        {"precision": "tf32", "memory_format": "channels_last", "cuda_graph": False}, needs_cuda=True),
    Row("bf16", "+ bf16 autocast", "bf16 convolutions, fp32 Grams/losses/image", "engine",
        {"precision": "bf16", "memory_format": "channels_last", "cuda_graph": False}, needs_cuda=True),
    Row("fp16", "+ fp16 autocast (instead of bf16)", "fp16 convolutions with static loss scaling", "engine",
        {"precision": "fp16", "memory_format": "channels_last", "cuda_graph": False}, needs_cuda=True),
    Row("graph", "+ CUDA graph (--step-variant graph)", "bf16 + whole Adam step captured in one CUDA graph", "engine",
        {"precision": "bf16", "memory_format": "channels_last", "step_variant": "graph"}, needs_cuda=True),
    Row("compile", "+ compiled objective (--step-variant compiled)", "the objective under torch.compile (then "
        "captured in the CUDA graph on GPUs)", "engine", {"step_variant": "compiled"}),
    Row("kernels", "+ Triton kernels (--step-variant kernels)", "compiled, with the style taps' ReLU + Gram + loss "
        "fused and the image update (normalisation backward, TV, Adam, clamp) in one kernel", "engine",
        {"step_variant": "kernels"}, needs_cuda=True),
    Row("torchscript", "engine defaults on the exported TorchScript", "same as 'engine defaults', network from "
        "extractor.ts", "engine", {}, torchscript=True),
    Row("engine", "engine defaults", "what `nst stylize` runs on this device (on a GPU: the step variant chosen by "
        "measurement, the trial on an empty choice cache; its choice is recorded)", "engine", {}),
    Row("onnxruntime", "the step in ONNX Runtime (step.onnx)", "the exported step graphs (a hand-written adjoint, no "
        "autograd) in ONNX Runtime's CPU provider: --runtime onnxruntime", "engine", {"runtime": "onnxruntime"},
        onnx_step=True),
]


def _row_format(row: Row, device) -> dict:
    """dtype, memory format and (CUDA) float32 math mode of a row. The baselines run with
    torch's defaults, as a user's loop would: on CUDA, cuDNN convolutions in TF32."""
    if row.kind == "baseline":
        math = float32_math_now() if device.type == "cuda" else None
        if row.compile_mode and device.type == "cuda":
            return {"dtype": "bf16", "memory_format": "channels_last", "float32_math": None, "peak_key": "bf16"}
        return {"dtype": "fp32", "memory_format": "channels_last" if row.compile_mode else "contiguous",
                "float32_math": None if math is None else f"conv {math['cudnn_conv']}, matmul {math['cuda_matmul']}",
                "peak_key": "tf32" if math and math["cudnn_conv"] == "tf32" else "fp32"}
    if row.onnx_step:
        return {"dtype": "fp32", "memory_format": "contiguous", "float32_math": None, "peak_key": "fp32"}
    p = resolve_plan(StylizeSettings(device=device.type, **(row.settings or {})))
    return {"dtype": p.precision, "memory_format": p.memory_format, "float32_math": p.float32_math,
            "peak_key": p.precision}


def _make_step(row: Row, size: int, device, eager_net, weights, ts_dir, cfg):
    """The row's step function and its stepper (None for the baselines)."""
    content, style = drawn_pair(size)
    if row.kind == "baseline":
        base = StylizeSettings()
        if row.compile_mode:
            loop = UserLoop(vgg19_cut(weights.state, device), content[None].to(device), style[None].to(device),
                            base.learning_rate, base.content_weight, base.style_weight, base.tv_weight,
                            mode=row.compile_mode, whole=row.whole)
            return loop.step, None, None
        loop = TutorialLoop(vgg19_features(weights.state, device), content[None].to(device), style[None].to(device),
                            base.learning_rate, base.content_weight, base.style_weight, base.tv_weight,
                            naive=(row.key == "naive"))
        return loop.step, None, None
    exported = row.torchscript or row.onnx_step
    network = {"extractor": str(ts_dir)} if exported else {"weights": cfg.weights}
    settings = StylizeSettings(size=size, device=device.type, **network, **(row.settings or {}))
    p = prepare(content, [(style, 1.0)], settings, extractor=None if exported else eager_net)
    return p.stepper.step, p.stepper, p


def build_row(row: Row, size: int, device, eager_net, weights, ts_dir, cfg) -> tuple[dict, object]:
    """Set a row up and warm it up; return its record and its step function (None if n/a)."""
    out = {"key": row.key, "label": row.label, "technique": row.technique, "kind": row.kind, "applicable": True}
    if row.needs_cuda and device.type != "cuda":
        out.update(applicable=False, reason="needs CUDA")
        return out, None
    if row.torchscript and ts_dir is None:
        out.update(applicable=False, reason="TorchScript export failed or was skipped")
        return out, None
    if row.onnx_step and device.type != "cpu":
        out.update(applicable=False, reason="ONNX Runtime's CPU provider only (onnxruntime-gpu is not a dependency)")
        return out, None
    if row.onnx_step and (ts_dir is None or not (ts_dir / "step.onnx").exists()):
        out.update(applicable=False, reason="the step graphs were not exported (--no-onnx, or the export failed)")
        return out, None
    out.update(_row_format(row, device))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trim()  # return freed heap to the OS, so the RSS increase below is this row's own
    rss_before = RSSPeak.rss()
    with RSSPeak() as rss:
        t_setup = time.perf_counter()
        step, stepper, prepared = _make_step(row, size, device, eager_net, weights, ts_dir, cfg)
        sync(device)
        out["setup_s"] = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        step()  # the first step: compiles, where anything compiles
        sync(device)
        out["first_step_s"] = time.perf_counter() - t0
        for _ in range(cfg.warmup - 1):
            step()
        sync(device)
        out["warmup_s"] = time.perf_counter() - t0
        out["capture_s"] = stepper.capture_s if stepper is not None else 0.0
    if prepared is not None:
        out["step_variant"] = prepared.plan.variant if prepared.plan.path == "fast" else prepared.plan.path
        out["compile_s"] = getattr(prepared.objective, "compile_s", 0.0)
        out["variant_choice"] = prepared.choice.to_dict() if prepared.choice is not None else None
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


def run_size(size: int, device, eager_net, weights, ts_dir, cfg, on_row=None) -> list[dict]:
    """Every row at one size: built (and, on a GPU, timed) one by one, then timed round-robin.
    ``on_row(rows so far)`` after each row that is timed on its own (not round-robin)."""
    rows, built = [], []
    for row in (r for r in ROWS if not cfg.rows or r.key in cfg.rows):
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
        if on_row is not None and not cfg.interleave:
            on_row(rows)
    if cfg.interleave:
        log.info("size %d: timing %d rows round-robin", size, sum(1 for _, s in built if s is not None))
        time_rows(built, device, cfg)
    built.clear()
    gc.collect()
    return rows


def derive(rows: list[dict], peaks: dict) -> None:
    """Speed-ups against the baselines (each, and the fastest) and the fraction of the
    matching matmul peak."""
    by = {r["key"]: r for r in rows}
    timed = [r for r in rows if r["kind"] == "baseline" and r.get("steps_per_s")]
    best = max(timed, key=lambda r: r["steps_per_s"], default=None)
    for r in rows:
        if not r.get("steps_per_s"):
            continue
        if best is not None:
            r["speedup_vs_best_baseline"] = r["steps_per_s"] / best["steps_per_s"]
            r["best_baseline"] = best["key"]
        for base in ("naive", "eager"):
            b = by.get(base, {})
            if b.get("steps_per_s"):
                r[f"speedup_vs_{base}"] = r["steps_per_s"] / b["steps_per_s"]
        if by.get("engine", {}).get("steps_per_s"):
            r["speedup_vs_engine"] = r["steps_per_s"] / by["engine"]["steps_per_s"]
        peak_key = r.get("peak_key", r.get("dtype", "fp32"))
        if peak_key in peaks:
            r["peak_fraction"] = r["tflops"] * 1e12 / peaks[peak_key]
