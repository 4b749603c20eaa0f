"""Error metrics and tolerances for the export self-check."""

from __future__ import annotations

import torch

# Largest allowed relative error (max |artefact - eager| / max |eager|, worst tap).
# fp32 artefacts run the same or equivalent kernels as eager, so they agree to rounding
# (observed ~1e-6 for ONNX Runtime); half-precision ones can differ in accumulation order.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}


def max_errors(got, ref) -> dict:
    """Worst absolute and relative error over a sequence of tensors (or arrays)."""
    worst_abs, worst_rel = 0.0, 0.0
    got, ref = list(got), list(ref)
    if len(got) != len(ref):
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "note": f"{len(got)} outputs, expected {len(ref)}"}
    for g, r in zip(got, ref):
        g = torch.as_tensor(g).detach().to("cpu", torch.float64)
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        if g.shape != r.shape:
            return {"max_abs_err": float("inf"), "max_rel_err": float("inf"),
                    "note": f"shape {tuple(g.shape)}, expected {tuple(r.shape)}"}
        diff = (g - r).abs().max().item() if g.numel() else 0.0
        if diff != diff:  # NaN
            diff = float("inf")
        scale = r.abs().max().item() if r.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return {"max_abs_err": worst_abs, "max_rel_err": worst_rel}


class SizeRefused(Exception):
    """An artefact raised on an input size it should accept."""


def forward_errors(run, eager, xs) -> dict:
    """The worst forward error of ``run`` (an artefact's forward) against ``eager`` over the
    inputs ``xs``, and the size (H, W) where it was worst."""
    worst = None
    for x in xs:
        with torch.no_grad():
            try:
                got = run(x)
            except Exception as exc:  # an artefact that refuses a size the manifest promises
                line = (str(exc).strip().splitlines() or [""])[0][:200]
                raise SizeRefused(f"it does not run on a {x.shape[-1]}x{x.shape[-2]} input (WxH) "
                                  f"({type(exc).__name__}: {line})") from exc
            e = max_errors(got, eager(x))
        if worst is None or not e["max_rel_err"] <= worst["max_rel_err"]:
            worst = {**e, "worst_at": list(x.shape[-2:])}
    return worst


def check_sizes(check_hw: tuple[int, int], min_side: int) -> list[tuple[int, int]]:
    """The sizes every artefact is checked at: ``check_hw`` first, then two whose sides and
    all their halvings down to the deepest tap are odd (63x94 and 62x63 for relu5_1, whose
    stride is 16). An exporter that specialised the traced size's parity fails them."""
    s = max(1, min_side // 2)  # the deepest tap's stride
    extra = [(4 * s - 1, 6 * s - 2), (4 * s - 2, 4 * s - 1)]
    return [tuple(check_hw)] + [hw for hw in extra if min(hw) >= min_side and hw != tuple(check_hw)]
