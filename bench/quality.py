"""``nst bench-quality``: the full-resolution loss reached in a fixed time budget, multi-
scale against single-scale rendering, and the single-scale time needed to match it.

All three runs optimise the same function at the final size (same targets), so their
final losses compare directly. The single-scale "time to match" run goes on for up to
``--match-factor`` budgets and reports when its loss first reached the multi-scale one
(from its per-step losses and its measured time per step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import torch

from nst.engine.device import resolve_device
from nst.engine.features import build_extractor
from nst.engine.fsutil import atomic_write_text
from nst.engine.multiscale import render
from nst.engine.settings import StylizeSettings

from .inputs import content_and_style
from .report import results_dir
from .settings import QualitySettings

log = logging.getLogger("nst")


def run_quality(cfg: QualitySettings) -> dict:
    device = resolve_device(cfg.device).type
    gpu = device == "cuda"
    if cfg.quick:
        cfg = dataclasses.replace(cfg, size=cfg.size or 128, budget=cfg.budget or 7.0, scales="64",
                                  match_factor=min(cfg.match_factor, 1.5))
    cfg = dataclasses.replace(cfg, size=cfg.size or (2048 if gpu else 512), budget=cfg.budget or (30.0 if gpu else 60.0))
    content, style, c_src, s_src = content_and_style(cfg.content, cfg.style)
    net = build_extractor(cfg.weights)
    base = StylizeSettings(size=cfg.size, device=device, weights=cfg.weights, steps=10**6, progress_every=10)
    results = {"size": cfg.size, "budget_s": cfg.budget, "device": device, "weights": cfg.weights,
               "content": c_src, "style": s_src, "torch": torch.__version__}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def one(label, settings):
        t0 = time.perf_counter()
        r = render(content, [(style, 1.0)], settings, extractor=net, t_start=t0)
        took = time.perf_counter() - t0
        log.info("%s: final loss %.4g in %.1f s", label, r.stats.final_loss, took)
        return r, took

    multi, t_multi = one("multi-scale", dataclasses.replace(base, scales=cfg.scales, scale_factor=cfg.scale_factor,
                                                            time_budget=cfg.budget))
    single, t_single = one("single-scale", dataclasses.replace(base, time_budget=cfg.budget))
    results["multi_scale"] = {"final_loss": multi.stats.final_loss, "seconds": t_multi, "scales": multi.stats.scales}
    results["single_scale"] = {"final_loss": single.stats.final_loss, "seconds": t_single,
                               "steps": single.stats.steps_run}
    # Single scale, longer: when does it reach the multi-scale loss?
    long_run, t_long = one("single-scale, matching", dataclasses.replace(
        base, time_budget=cfg.budget * cfg.match_factor))
    st = long_run.stats
    per_step = st.loop_s / max(1, st.steps_run)
    hit = next((i for i, v in enumerate(st.loss) if v <= multi.stats.final_loss), None)
    # Time to reach it: everything before the loop (calibration, targets), then the steps.
    before = t_long - st.loop_s
    results["single_scale_to_match"] = {
        "target_loss": multi.stats.final_loss,
        "reached": hit is not None,
        "seconds": None if hit is None else before + (hit + 1) * per_step,
        "steps": None if hit is None else hit + 1,
        "searched_seconds": t_long,
        "final_loss": st.final_loss,
    }
    results["ratio_single_over_multi_loss"] = single.stats.final_loss / multi.stats.final_loss
    return results


def markdown(r: dict) -> str:
    m, s, x = r["multi_scale"], r["single_scale"], r["single_scale_to_match"]
    lines = [
        f"# Quality at equal time: {r['size']} px, {r['budget_s']:g} s budget, {r.get('gpu', r['device'])}",
        "",
        f"Content {r['content']}, style {r['style']}, weights `{r['weights']}`, torch {r['torch']}. "
        "All renders end at the same size with the same targets, so the losses compare directly.",
        "",
        "| render | full-resolution loss | seconds |",
        "| --- | ---: | ---: |",
        f"| multi-scale ({', '.join(str(sc['size']) for sc in m['scales'])}) | {m['final_loss']:.4g} | {m['seconds']:.1f} |",
        f"| single-scale | {s['final_loss']:.4g} | {s['seconds']:.1f} |",
    ]
    if x["reached"]:
        lines.append(f"| single-scale until it matches multi-scale | {x['target_loss']:.4g} | {x['seconds']:.1f} |")
    else:
        lines.append(f"| single-scale, {x['searched_seconds']:.0f} s: did not match | {x['final_loss']:.4g} | "
                     f"{x['searched_seconds']:.1f} |")
    lines += ["", f"Single-scale loss / multi-scale loss at equal time: {r['ratio_single_over_multi_loss']:.2f}.", ""]
    lines += ["Multi-scale plan and outcome:", "", "| scale | steps planned | steps run | planned s | actual s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for sc in m["scales"]:
        lines.append(f"| {sc['hw'][1]}x{sc['hw'][0]} | {sc['steps_planned']} | {sc['steps_run']} | "
                     f"{sc['planned_s']:.1f} | {sc['actual_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main_from_args(cfg: QualitySettings) -> int:
    r = run_quality(cfg)
    out = results_dir(cfg.out, cfg.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = cfg.name or f"quality-{r['device']}-{r['size']}"
    atomic_write_text(out / f"{stem}.json", json.dumps(r, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(r))
    print(markdown(r))
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}")
    return 0
