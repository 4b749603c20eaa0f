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
