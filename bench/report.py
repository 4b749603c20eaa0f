"""Benchmark results as a markdown table and a plot."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("nst")


RESULTS = Path("bench/results")


def results_dir(out: str | None, quick: bool) -> Path:
    """Where a benchmark writes: ``--out``; else bench/results/, the committed results,
    except for --quick runs, which prove the script and measure nothing: they go to a new
    temporary directory, so that a check never overwrites a measurement."""
    if out:
        return Path(out)
    if quick:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="nst-bench-quick-"))
    return RESULTS


def _mb(b):
    return f"{b / 2**20:,.0f} MiB" if b else "-"


def _x(v):
    return f"{v:.2f}x" if v else "-"


def _header(results: dict) -> list[str]:
    env, cfg, peaks = results["environment"], results["settings"], results["peaks_flops"]
    return [
        f"# nst benchmark: {env['device']}",
        "",
        f"{env['date']}; torch {env['torch']}, torchvision {env.get('torchvision')}, onnxruntime "
        f"{env.get('onnxruntime')}; Python {env['python']}; {env['threads']} CPU threads"
        + (f"; CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver')}" if "cuda" in env else ""),
        f"Median of {cfg['repeats']} repeats of {cfg['steps']} steps after {cfg['warmup']} warm-up steps; square "
        f"images; weights `{cfg['weights']}` (speed does not depend on the values).",
        "Measured matmul peaks (best of 7, measured at the start and at the end, the larger kept): "
        + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()) + ".",
        "",
    ] + ([f"**Partial results**: the run stopped before it finished ({results['partial']}).", ""]
         if results.get("partial") else [])


def _row_line(r: dict) -> str:
    if not r.get("applicable", True):
        return f"| {r['label']} | n/a | | | | | | | | | | {r.get('reason', '')} |"
    if r.get("oom"):
        return f"| {r['label']} | | | out of memory | | | | | | | | |"
    pf = f"{100 * r['peak_fraction']:.0f}% {r.get('peak_key', '')}" if r.get("peak_fraction") else "-"
    dtype = r.get("dtype", "") + (f" ({r['float32_math']})" if r.get("float32_math") else "")
    first = f"{r['first_step_s']:.2f}" if r.get("first_step_s") is not None else "-"
    return (f"| {r['label']} | {dtype} | {r.get('memory_format', '')} | {r['steps_per_s']:.3f} | "
            f"{r['ms_per_step']:.1f} | {r['tflops']:.3f} | {pf} | {_mb(r.get('peak_mem_bytes'))} | {first} | "
            f"{_x(r.get('speedup_vs_naive'))} | {_x(r.get('speedup_vs_eager'))} | "
            f"{_x(r.get('speedup_vs_best_baseline'))} |")


def _size_section(size: str, entry: dict) -> list[str]:
    lines = [f"## {size} x {size} px", "",
             "| row | dtype | layout | steps/s | ms/step | TFLOP/s | % of peak | peak mem | first step (s) | vs naive "
             "| vs eager | vs fastest baseline |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [_row_line(r) for r in entry["rows"]]
    best = next((r.get("best_baseline") for r in entry["rows"] if r.get("best_baseline")), None)
    if best:
        label = next(r["label"] for r in entry["rows"] if r["key"] == best)
        lines += ["", f"Fastest baseline at this size: {label}. First step: set-up excluded; a cold compile "
                  "(empty compiler caches) where anything compiles; not in the timings."]
    capt = [r for r in entry["rows"] if r.get("capture_s")]
    if capt:
        lines += ["", "CUDA graph capture (not in the timings): " +
                  ", ".join(f"{r['label']} {r['capture_s'] * 1e3:.0f} ms" for r in capt)]
    comp = [r for r in entry["rows"] if r.get("compile_s")]
    if comp:
        lines += ["", "torch.compile, the first compiled call (not in the timings): " +
                  ", ".join(f"{r['label']} {r['compile_s']:.1f} s" for r in comp)]
    eng = next((r for r in entry["rows"] if r["key"] == "engine" and r.get("step_variant")), None)
    if eng:
        c = eng.get("variant_choice")
        how = "" if not c else (" (cached)" if c.get("cached") else " (chosen by measurement: " + ", ".join(
            f"{k} {v:.3g} ms" if v is not None else f"{k} failed" for k, v in c.get("ms", {}).items()) + ")")
        lines += ["", f"The engine defaults ran the step variant {eng['step_variant']}{how}."]
        if c and c.get("errors"):
            lines[-1] += " Not chosen: " + "; ".join(f"{k}: {v}" for k, v in c["errors"].items()) + "."
    ort = next((r for r in entry["rows"] if r["key"] == "onnxruntime" and r.get("speedup_vs_engine")), None)
    if ort:
        lines += ["", f"The step in ONNX Runtime: {ort['ms_per_step']:.1f} ms against the engine defaults' "
                  f"{ort['ms_per_step'] * ort['speedup_vs_engine']:.1f} ms ({ort['speedup_vs_engine']:.2f}x the "
                  "engine's steps/s)."]
    o = entry.get("onnx_targets")
    if o and "error" not in o:
        lines += ["", f"Targets (one forward at content size + one at style size): eager PyTorch on "
                  f"{o['eager_device']} {o['eager_ms']:.1f} ms, ONNX Runtime ({o['onnxruntime_provider']}) "
                  f"{o['onnxruntime_ms']:.1f} ms ({o['onnxruntime_vs_eager']:.2f}x eager)."]
    elif o:
        lines += ["", f"ONNX Runtime timing failed: {o['error']}"]
    return lines + [""]


def _goals_section(results: dict) -> list[str]:
    t = results.get("targets") or {}
    if not t:
        return []
    lines = ["## Targets", "", "| target | wanted | got | met |", "| --- | ---: | ---: | --- |"]
    for k, v in t.items():
        got = "-" if v["got"] is None else f"{v['got']:.2f}"
        margin = "" if v["margin"] is None else f" ({100 * v['margin']:+.0f}%)"
        wanted = ("at most " if v.get("direction") == "max" else "") + f"{v['target']:.2f}"
        lines.append(f"| {k} | {wanted} | {got} | {'yes' if v['met'] else 'no'}{margin} |")
    lines.append("")
    missed = [k for k, v in t.items() if not v["met"]]
    prof = results.get("profile")
    if missed and prof and "error" not in prof:
        peak = max(results["peaks_flops"].values())
        g = prof["groups"]

        def eff(name):
            fl = g[name].get("flops_per_s")
            return f"{100 * fl / peak:.0f}% of peak" if fl else "n/a"

        conv_share = g["convolution forward"]["share"] + g["convolution input-gradient"]["share"]
        rest = sum(g[k]["share"] for k in ("pooling/activation", "losses", "optimizer", "copies", "other"))
        lines += [f"Missed: {', '.join(missed)}. What is in the way, from the profile at {prof['size']} px: "
                  f"convolutions take {100 * conv_share:.0f}% of the time and run at {eff('convolution forward')} "
                  f"(forward) and {eff('convolution input-gradient')} (input gradient); the Grams and their "
                  f"backward take {100 * g['Gram and its backward']['share']:.0f}% at "
                  f"{eff('Gram and its backward')}; the memory-bound rest (pooling/activation "
                  f"{100 * g['pooling/activation']['share']:.0f}%, losses {100 * g['losses']['share']:.0f}%, "
                  f"optimizer {100 * g['optimizer']['share']:.0f}%, copies {100 * g['copies']['share']:.0f}%, "
                  f"other {100 * g['other']['share']:.0f}%) takes {100 * rest:.0f}%.", ""]
    return lines


def _time_to_image_section(results: dict) -> list[str]:
    tti = results.get("time_to_image")
    if not tti:
        return []
    lines = ["## Time to image", "", tti["method"], "", "| render | command | cold (s) | warm (s) |",
             "| --- | --- | ---: | ---: |"]
    for render, entry in tti["renders"].items():
        for cmd, v in entry.items():
            if v.get("error"):
                lines.append(f"| {render} | {cmd} | failed: {v['error']} | |")
            else:
                lines.append(f"| {render} | {cmd} | {v['cold_s']:.1f} | {v['warm_s']:.1f} |")
    return lines + [""]


def _profile_section(results: dict) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    if "error" in prof:
        return [f"Profile failed: {prof['error']}", ""]
    peak = max(results["peaks_flops"].values())
    lines = [f"## Where the time goes: engine defaults at {prof['size']} px ({prof['clock']}, "
             f"{prof['steps_profiled']} steps, CUDA graph {prof.get('graph', 'n/a')})", "",
             "Each kernel (CUDA) or operator's own time (CPU) is attributed to the operators that launched it "
             "(bench/profile.py), not guessed from its name.", "",
             "| group | ms/step | share | achieved TFLOP/s | of best matmul peak |", "| --- | ---: | ---: | ---: | ---: |"]
    for g, v in prof["groups"].items():
        fl = v.get("flops_per_s")
        lines.append(f"| {g} | {v['s_per_step'] * 1e3:.1f} | {100 * v['share']:.0f}% | "
                     f"{'-' if not fl else f'{fl / 1e12:.3f}'} | {'-' if not fl else f'{100 * fl / peak:.0f}%'} |")
    return lines + ["", "Top operators: " + "; ".join(f"{o['name']} ({o['group']}) {100 * o['share']:.0f}%"
                                                       for o in prof["top_ops"][:8]), ""]


def markdown(results: dict) -> str:
    """The benchmark's results as a markdown page: one table per size, goals, profile."""
    lines = _header(results)
    for size, entry in results["sizes"].items():
        lines += _size_section(size, entry)
    lines += _time_to_image_section(results) + _goals_section(results) + _profile_section(results)
    notes = results.get("notes")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["FLOPs per step are counted from the layer shapes: 2 x the forward conv FLOPs (forward + input-"
              "gradient backward) + Gram forward/backward; the naive row also counts its two extra forward passes. "
              "Speed-ups compare steps/s."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'nst[bench]')")
        return None
    return plt


def plot(results: dict, path: Path) -> Path | None:
    """Steps/s against size, one line per row."""
    plt = pyplot()
    if plt is None:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for size, entry in results["sizes"].items():
        for r in entry["rows"]:
            if r.get("steps_per_s"):
                series.setdefault(r["label"], []).append((int(size), r["steps_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image size (px, square)")
    ax.set_ylabel("steps / s")
    ax.set_title(f"nst: steps/s on {results['environment']['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
