"""ONNX Runtime's Adam step (step.onnx, `nst export --formats step`) against the engine's
own CPU step, at one size, in one process, interleaved step by step so that both see the
same machine load.

    python -m nst.bench.onnx_step --size 512 --steps 7 --threads 2 --out bench/results/onnx-step-cpu-512

The engine's step is its CPU fast path (engine/session.py prepare with StylizeSettings(
device='cpu', weights='random:0', size=SIZE), stepper.step(), the loss read on the host);
ONNX Runtime's is OnnxAdamStep.step() (engine/onnx_runtime.py) on the same weights,
targets and start image. Speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch


def _images(size: int):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, size, size, generator=gen), torch.rand(3, size, size, generator=gen)


def _steppers(size: int, threads: int, export_dir: Path):
    from nst.engine.onnx_runtime import load_step_graphs, make_onnx_stepper, onnx_targets
    from nst.engine.session import prepare
    from nst.engine.settings import StylizeSettings
    from nst.export import ExportSettings, export_extractor

    export_extractor(ExportSettings(out=export_dir, weights="random:0", formats=("step",), trace_size="64x64",
                                    check_size="80x48"))
    content, style = _images(size)
    settings = StylizeSettings(device="cpu", weights="random:0", size=size)
    p = prepare(content, [(style, 1.0)], settings)
    graphs = load_step_graphs(export_dir, threads=threads)
    content_layers, style_layers = settings.layer_weights()
    targets = onnx_targets(graphs, p.content_img.cpu(), [(style[None], 1.0)], content_layers, style_layers)
    x = p.x.detach().clone().cpu().contiguous()  # the same start image (the content)
    return p, make_onnx_stepper(graphs, targets, settings, x), tuple(p.out_hw)


def measure(size: int, steps: int, threads: int) -> dict:
    """Median seconds per step of each runtime; the steps alternate between the two."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        p, onnx_stepper, hw = _steppers(size, threads, Path(d))
        times = {"engine": [], "onnxruntime": []}
        runs = {"engine": lambda: float(p.stepper.step()[0]), "onnxruntime": lambda: float(onnx_stepper.step()[0])}
        for name, run in runs.items():  # warm-up: first-call allocations, ONNX Runtime's arena
            run()
        for _ in range(steps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size_hw": list(hw), "steps_timed": steps, "threads": threads, "plan": str(p.plan),
            "seconds_per_step": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "onnxruntime_over_engine": round(med["onnxruntime"] / med["engine"], 3)}


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {d: metadata.version(d) for d in ("torch", "onnx", "onnxruntime", "onnxscript")}
    return {"cpu": cpu, "python": platform.python_version(), "versions": versions,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def write(result: dict, out: Path) -> None:
    """``out``.json and ``out``.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, r = result["machine"], result
    h, w = r["size_hw"]
    ratio = r["onnxruntime_over_engine"]
    lines = [f"# The Adam step in ONNX Runtime against the engine, CPU, {w}x{h} px", "",
             f"{m['date']}; {m['cpu']}, {r['threads']} threads; Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
             f"Median of {r['steps_timed']} steps each after one warm-up step, the two runtimes alternating step by "
             "step in one process; weights `random:0`; the loss read on the host after every step (both).", "",
             "| runtime | what runs | median s/step | steps (s) |", "| --- | --- | ---: | --- |",
             f"| engine | {r['plan']}, stepper.step() | {r['median_s']['engine']:.3f} | "
             + ", ".join(f"{t:.2f}" for t in r["seconds_per_step"]["engine"]) + " |",
             f"| ONNX Runtime | step.onnx (CPUExecutionProvider), OnnxAdamStep.step() | "
             f"{r['median_s']['onnxruntime']:.3f} | " + ", ".join(f"{t:.2f}" for t in r["seconds_per_step"]["onnxruntime"])
             + " |", "",
             f"ONNX Runtime / engine time per step: **{ratio:.2f}x** ("
             + ("ONNX Runtime faster" if ratio < 1 else "the engine faster") + ")."]
    if r.get("note"):
        lines += ["", r["note"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/onnx-step-cpu-512"))
    ap.add_argument("--note", default="", help="a sentence for the report (the machine's load, say)")
    a = ap.parse_args(argv)
    result = {**measure(a.size, a.steps, a.threads), "machine": _machine(), "note": a.note}
    write(result, a.out)
    print(json.dumps({k: result[k] for k in ("size_hw", "median_s", "onnxruntime_over_engine")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
