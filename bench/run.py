"""``nst bench``: steps per second of the engine against eager PyTorch, in one process.

Protocol (docs/design.md): same device, size and step count for every row; warm-up first
(compile/capture time reported separately); synchronise, time with CUDA events on GPUs and
``perf_counter`` on the CPU; median over repeats. The rows are bench/rows.py's; results go
to ``bench/results/<device>.json`` and ``.md``, with a plot of steps/s against size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from nst.engine.device import float32_math, resolve_device
from nst.engine.errors import NSTError
from nst.engine.features import VGGFeatures
from nst.engine.fsutil import atomic_write_text
from nst.engine.weights import resolve_weights

from . import flops as flops_mod
from .goals import check_goals, check_time_goals
from .inputs import drawn_pair
from .probes import environment, slug
from .profile import profile_engine
from .report import results_dir
from .rows import ROWS, derive, run_size
from .settings import BenchSettings
from .time_to_image import compile_cache_env, time_to_image
from .timing import matmul_peak, time_steps

log = logging.getLogger("nst")

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def onnx_targets(size: int, device, eager_net, onnx_path, cfg) -> dict:
    """Time to compute the targets (one forward at content size, one at style size)."""
    import onnxruntime as ort

    content, style = drawn_pair(size)
    c, s = content[None], style[None]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    net = eager_net.placed(device, channels_last=False)
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


def measure_peak(device, key: str, n: int) -> float:
    """The matmul peak of ``key`` (fp32 as IEEE float32, tf32, bf16, fp16)."""
    mode = ("tf32" if key == "tf32" else "ieee") if device.type == "cuda" else None
    with float32_math(mode):
        return matmul_peak(device, _DTYPES[key], n)


def _export_for_rows(cfg: BenchSettings, eager_net, tmp: Path, device) -> tuple[Path | None, Path | None]:
    """A TorchScript (and ONNX: the extractor, and on the CPU the step graphs) export of the
    benchmark's network, for the rows that use it."""
    from nst.export import ExportSettings, export_extractor

    out = tmp / "export"
    formats = ("torchscript", "onnx") + (("step",) if device.type == "cpu" else ()) if cfg.onnx else ("torchscript",)
    try:
        export_extractor(ExportSettings(out=out, weights=cfg.weights, formats=formats, trace_size="64x64",
                                        check_size="80x48"), module=eager_net)
    except NSTError as e:
        log.warning("export for the TorchScript/ONNX rows failed: %s", e)
        return None, None
    return out, (out / "extractor.onnx" if cfg.onnx else None)


def _size_entry(size: int, device, eager_net, weights, ts_dir, onnx_path, cfg, on_row=None) -> dict:
    entry = {"rows": run_size(size, device, eager_net, weights, ts_dir, cfg, on_row)}
    if onnx_path is not None:
        try:
            entry["onnx_targets"] = onnx_targets(size, device, eager_net, onnx_path, cfg)
        except Exception as e:  # report, do not crash the whole benchmark
            entry["onnx_targets"] = {"error": f"{type(e).__name__}: {e}"}
    return entry


def _profile(device, eager_net, cfg) -> dict:
    gpu = device.type == "cuda"
    size = (1024 if 1024 in cfg.sizes else max(cfg.sizes)) if gpu else (256 if 256 in cfg.sizes else max(cfg.sizes))
    log.info("profiling the engine step at %d px", size)
    try:
        return profile_engine(size, device, eager_net, cfg)
    except Exception as e:  # the profile is a diagnosis, never a reason to lose the results
        return {"error": f"{type(e).__name__}: {e}"}


@contextlib.contextmanager
def _fresh_compile_caches(tmp: Path):
    """Empty inductor and Triton caches for the rows, so that a row's first step is a cold
    compile whatever earlier runs left on this machine (time to image measures warm too)."""
    fresh = compile_cache_env(tmp / "inductor")
    saved = {k: os.environ.get(k) for k in fresh}
    os.environ.update(fresh)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _derive_all(results: dict, peaks: dict, device) -> None:
    """The speed-ups, peak fractions and goals of the sizes measured so far."""
    for entry in results["sizes"].values():
        derive(entry["rows"], peaks)
    results["targets"] = {**check_goals(results, device), **check_time_goals(results, device)}


def run(cfg: BenchSettings, on_progress=None) -> dict:
    """The benchmark's results. ``on_progress(results)``, if given, is called after each row
    timed on its own (a GPU's rows), each size and each time-to-image command with what is
    measured so far (``results["partial"]`` says what is not): a run stopped by a timeout (a
    GPU machine's call limit) keeps what it did."""
    unknown = [k for k in cfg.rows if k not in {r.key for r in ROWS}]
    if unknown:
        raise NSTError(f"--rows: no row {unknown[0]!r}; the rows are {' '.join(r.key for r in ROWS)}")
    device = resolve_device(cfg.device)
    gpu = device.type == "cuda"
    cfg = cfg.resolved(gpu)
    env = environment(device)
    weights = resolve_weights(cfg.weights, "vgg19")
    log.info("bench on %s, sizes %s, %d steps x %d repeats (median), warm-up %d", env["device"], cfg.sizes,
             cfg.steps, cfg.repeats, cfg.warmup)
    if weights.is_random:
        log.info("weights %s: random values; speed does not depend on them", weights.source)
    # Peaks: a large matmul per dtype, measured here, now (and again at the end).
    n = 4096 if gpu else (512 if cfg.quick else 2048)
    peaks = {key: measure_peak(device, key, n) for key in (("fp32", "tf32", "bf16", "fp16") if gpu else ("fp32",))}
    log.info("matmul peaks (%dx%d): %s", n, n, ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    eager_net = VGGFeatures(weights)
    results = {"environment": env, "settings": dataclasses.asdict(cfg), "peaks_flops": peaks,
               "flops_formula": flops_mod.__doc__.strip(), "sizes": {}}
    later = ["time to image"] * cfg.time_to_image + ["the profile"] * cfg.profile + ["the peaks at the end"]

    def progress(missing: list[str]) -> None:  # what is measured so far, written
        if on_progress is None:
            return
        results["partial"] = "not measured yet: " + ", ".join(missing)
        _derive_all(results, peaks, device)
        try:
            on_progress(results)
        except Exception as e:  # a side task: the measurements go on, the final write says if it fails too
            log.warning("could not write the partial results: %s", e)

    with tempfile.TemporaryDirectory(prefix="nst-bench-") as tmp, _fresh_compile_caches(Path(tmp)):
        if cfg.waterfall:
            ts_dir, onnx_path = _export_for_rows(cfg, eager_net, Path(tmp), device)
            for i, size in enumerate(cfg.sizes):
                missing = [f"{s} px" for s in cfg.sizes[i + 1:]] + later

                def row_done(rows: list[dict], size=size, missing=missing) -> None:
                    results["sizes"][str(size)] = {"rows": rows}
                    progress([f"the rest of {size} px"] + missing)

                results["sizes"][str(size)] = _size_entry(size, device, eager_net, weights, ts_dir, onnx_path, cfg,
                                                          row_done)
                progress(missing)
        if cfg.time_to_image:
            def tti_progress(tti: dict) -> None:
                results["time_to_image"] = tti
                progress(["the rest of time to image"] + later[1:])

            results["time_to_image"] = time_to_image(device, weights.state, Path(tmp), cfg.quick,
                                                     renders=cfg.render_list(), on_command=tti_progress)
    if cfg.profile:
        results["profile"] = _profile(device, eager_net, cfg)
    # The peak again, at the end: the larger of the two is used for every fraction.
    for key, before in list(peaks.items()):
        after = measure_peak(device, key, n)
        results.setdefault("peak_measurements", {})[key] = [before, after]
        peaks[key] = max(before, after)
    results.pop("partial", None)
    _derive_all(results, peaks, device)
    return results


def write(results: dict, out_dir: Path, name: str | None, plot_it: bool = True) -> list[Path]:
    """The JSON and the markdown table, and (``plot_it``) the plot; a partial write removes
    an earlier run's plot instead, which no longer matches the tables."""
    from .report import markdown, plot

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or slug(results["environment"]["device"])
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=1, default=float) + "\n")
    atomic_write_text(paths[1], markdown(results))
    if not plot_it:
        (out_dir / f"{stem}.png").unlink(missing_ok=True)
        return paths
    png = plot(results, out_dir / f"{stem}.png")
    if png:
        paths.append(png)
    return paths


def main_from_args(cfg: BenchSettings) -> int:
    out_dir = results_dir(cfg.out, cfg.quick)
    results = run(cfg, on_progress=lambda partial: write(partial, out_dir, cfg.name, plot_it=False))
    paths = write(results, out_dir, cfg.name)
    from .report import markdown

    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
