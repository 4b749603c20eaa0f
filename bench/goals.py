"""The project's speed goals, checked against a benchmark's results, with the margin.

Speed goals are stated against the fastest baseline row (issue #14): a user who can
write a compiled loop in twenty lines is not helped by a speed-up over eager.
"""

from __future__ import annotations

# (device type, size, row key, measure, wanted, direction): "min" goals want at least the
# value, "max" goals at most. Speed-ups are over the fastest baseline row; peak fractions
# are of the measured matmul peak in the row's own dtype.
GOALS = (
    ("cpu", 256, "engine", "speedup_vs_best_baseline", 1.0, "min"),
    ("cpu", 256, "engine", "peak_fraction", 0.85, "min"),
    ("cuda", 512, "engine", "speedup_vs_best_baseline", 1.3, "min"),
    ("cuda", 1024, "engine", "speedup_vs_best_baseline", 1.3, "min"),
    ("cuda", 2048, "engine", "speedup_vs_best_baseline", 1.3, "min"),
    ("cuda", 2048, "engine", "peak_fraction", 0.45, "min"),
    # "No slower than today" at 4096 px: 140 ms/step, measured on an H100 (issue #14).
    ("cuda", 4096, "engine", "ms_per_step", 140.0, "max"),
)
# Time to image (bench/time_to_image.py): (device type, render, command, wanted seconds, warm
# caches). Issue #14: at most 5 s on an H100, compiler caches warm.
TIME_GOALS = (("cuda", "512 px / 500 steps", "engine defaults", 5.0),)
_NAMES = {"speedup_vs_best_baseline": "vs_fastest_baseline", "peak_fraction": "peak_fraction",
          "ms_per_step": "ms_per_step"}


def check_goals(results: dict, device) -> dict:
    """{goal name: {target, got, met, margin, direction}} for every goal measured on this device."""
    out = {}
    sizes = results["sizes"]
    for dev, size, key, measure, wanted, direction in GOALS:
        if dev != device.type:
            continue
        row = next((r for r in sizes.get(str(size), {}).get("rows", []) if r["key"] == key), {})
        if not row.get("steps_per_s"):
            continue
        got = row.get(measure)
        met = got is not None and (got >= wanted if direction == "min" else got <= wanted)
        margin = None if got is None else (got / wanted - 1.0 if direction == "min" else wanted / got - 1.0)
        out[f"{'gpu' if dev == 'cuda' else 'cpu'}_{size}_{_NAMES[measure]}"] = {
            "target": wanted, "got": got, "met": met, "margin": margin, "direction": direction}
    return out


def check_time_goals(results: dict, device) -> dict:
    """The time-to-image goals measured on this device (warm caches), as check_goals' entries."""
    out = {}
    renders = (results.get("time_to_image") or {}).get("renders", {})
    for dev, render, command, wanted in TIME_GOALS:
        got = renders.get(render, {}).get(command, {}).get("warm_s")
        if dev != device.type or got is None:
            continue
        out[f"gpu_{render.split()[0]}_time_to_image_warm_s"] = {
            "target": wanted, "got": got, "met": got <= wanted, "margin": wanted / got - 1.0, "direction": "max"}
    return out
