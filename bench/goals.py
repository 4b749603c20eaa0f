"""The project's speed goals, checked against a benchmark's results, with the margin."""

from __future__ import annotations

# (device type, size, row key, measure, wanted): speed-ups over a baseline row, or the
# fraction of the measured matmul peak in the row's own dtype.
GOALS = (
    ("cpu", 256, "engine", "speedup_vs_eager", 1.0),
    ("cpu", 256, "engine", "speedup_vs_naive", 1.9),
    ("cpu", 256, "engine", "peak_fraction", 0.85),
    ("cuda", 512, "engine", "speedup_vs_eager", 3.0),
    ("cuda", 2048, "engine", "speedup_vs_eager", 2.0),
    ("cuda", 1024, "engine", "peak_fraction", 0.5),
    ("cuda", 2048, "engine", "peak_fraction", 0.5),
    ("cuda", 4096, "engine", "peak_fraction", 0.5),
)
_NAMES = {"speedup_vs_eager": "vs_eager", "speedup_vs_naive": "vs_naive", "peak_fraction": "peak_fraction"}


def check_goals(results: dict, device) -> dict:
    """{goal name: {target, got, met, margin}} for every goal measured on this device."""
    out = {}
    sizes = results["sizes"]
    for dev, size, key, measure, wanted in GOALS:
        if dev != device.type:
            continue
        row = next((r for r in sizes.get(str(size), {}).get("rows", []) if r["key"] == key), {})
        if not row.get("steps_per_s"):
            continue
        got = row.get(measure)
        out[f"{'gpu' if dev == 'cuda' else 'cpu'}_{size}_{_NAMES[measure]}"] = {
            "target": wanted, "got": got, "met": got is not None and got >= wanted,
            "margin": None if got is None else got / wanted - 1.0}
    return out
