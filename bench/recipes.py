"""``nst bench-recipes``: each recipe on the engine against its original loop.

For every recipe (engine/recipes.py) and its faithful re-implementation (bench/originals.py):

1. parity: both start from the same image with the same weights, and their first loss
   must agree (relative error <= 1e-4); the original is built with non-in-place ReLUs for
   this check, so that its conv taps are the convolutions' outputs, as in the engine;
2. speed: the original as it runs (in-place ReLUs and all) and the engine's default path,
   at the recipe's size and steps, timed round-robin (original, engine, original, ...) on
   the CPU; the median of the repeats. A step is one loss + gradient evaluation and one
   update: L-BFGS originals do up to 20 per ``optimizer.step`` call (the ones that ran are
   counted), and the engine is timed over 20.

Both get the demo's drawn images at the recipe's output size; the style image at the
same size (the course notebook and the blog loop resize it to the content's shape).
Results: ``bench/results/recipes-<device>.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from nst.engine import recipes
from nst.engine.demo import make_content, make_style
from nst.engine.device import resolve_device, sync
from nst.engine.errors import InputError, NSTError
from nst.engine.fsutil import atomic_write_text
from nst.engine.imageio import pil_to_tensor, resize_to
from nst.engine.session import prepare
from nst.engine.sizes import wxh
from nst.engine.weights import resolve_weights

from .originals import ORIGINALS
from .probes import environment, slug
from .report import pyplot, results_dir
from .settings import RecipeBenchSettings

log = logging.getLogger("nst")

PARITY_RTOL = 1e-4

# What each original recomputes or wastes per step, for the table.
WHAT = {
    "gatys": "all 37 VGG19 layers (to pool5) per evaluation; L-BFGS 20 per call",
    "gatys-code": "all 37 VGG19 layers (to pool5) per evaluation; L-BFGS 20 per call",
    "udacity": "all 37 VGG19 modules per step (no early exit)",
    "plain-adam": "3 forward passes per step (generated, content, style) + weight gradients",
    "vgg16": "stops at the deepest tap; StepLR; clamps (a fair loop)",
    "lbfgs-normalised": "loss modules in an nn.Sequential, trimmed after conv3_1; L-BFGS 20 per call",
}


def _inputs(s, quick: bool):
    content = pil_to_tensor(make_content())  # (3, 240, 320)
    if quick:
        hw = s.resize_hw()
        s = dataclasses.replace(s, size=64, resize=f"{round(64 * hw[1] / max(hw))}x{round(64 * hw[0] / max(hw))}"
                                if hw else None)
    hw = s.output_hw(tuple(content.shape[-2:]))
    c = resize_to(content, hw)[None]
    st = resize_to(pil_to_tensor(make_style(seed=1)), hw)[None]
    if s.init == "noise":
        start = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(s.seed))
    else:
        start = c.clone()
    return s, c, st, start


def _time(call, device, n: int) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        call()
    sync(device)
    return time.perf_counter() - t


def bench_recipe(name: str, cfg: RecipeBenchSettings, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    s = recipes.settings(name, weights=cfg.weights, device=device.type)
    s, content, style, start = _inputs(s, cfg.quick)
    state = resolve_weights(cfg.weights, s.network).state
    content, style, start = content.to(device), style.to(device), start.to(device)
    Original = ORIGINALS[name]
    rec = {"recipe": name, "title": recipes.get(name).title, "size": list(content.shape[-2:]),
           "optimizer": s.optimizer, "network": s.network, "original_recomputes": WHAT[name]}

    # 1. parity of the first loss
    check = Original(state, content, style, start, s, inplace=False)
    p = prepare(content[0].cpu(), [(style[0].cpu(), 1.0)], s, init=start[0].cpu())
    with torch.no_grad():
        engine_loss = float(p.objective.losses(p.x.detach())[0])
    orig_loss = check.first_loss()
    rel = abs(engine_loss - orig_loss) / max(abs(orig_loss), 1e-30)
    rec["parity"] = {"original_first_loss": orig_loss, "engine_first_loss": engine_loss, "rel_err": rel,
                     "rtol": PARITY_RTOL, "passed": rel <= PARITY_RTOL}
    del check

    # 2. speed, round-robin
    orig = Original(state, content, style, start, s, inplace=True)
    lbfgs = s.optimizer == "lbfgs"
    calls = 1 if lbfgs else (1 if cfg.quick else cfg.adam_steps or (20 if gpu else 3))
    evals = calls * orig.evals_per_call  # the engine runs as many steps as the original's calls can
    repeats = 1 if cfg.quick else cfg.repeats or (5 if gpu else 4)
    if lbfgs:
        orig.first_loss()  # warm-up: one forward (a whole call would be 20 evaluations)
    else:
        orig.call()
    p.stepper.step()
    t_orig, t_eng, orig_evals = [], [], []
    for r in range(repeats):
        log.info("%s: repeat %d/%d", name, r + 1, repeats)
        before = orig.evals
        t = _time(orig.call, device, calls)
        orig_evals.append(orig.evals - before)
        t_orig.append(t / max(1, orig_evals[-1]))
        t_eng.append(_time(p.stepper.step, device, evals) / evals)
    o, e = statistics.median(t_orig), statistics.median(t_eng)
    rec.update(steps_timed=evals, original_evals_run=orig_evals, repeats=repeats, original_steps_per_s=1 / o,
               engine_steps_per_s=1 / e,
               speedup=o / e, original_s_per_step=t_orig, engine_s_per_step=t_eng,
               engine_path=f"{p.plan.path} {p.plan.precision} {'channels_last' if p.plan.channels_last else 'NCHW'}"
               f"{' cuda-graph' if p.plan.cuda_graph else ''}")
    return rec


def run(cfg: RecipeBenchSettings) -> dict:
    names = list(cfg.recipes) or list(recipes.RECIPES)
    for n in names:
        recipes.get(n)
    if cfg.adam_steps < 0 or cfg.repeats < 0:
        raise InputError("--adam-steps and --repeats must be >= 0")
    device = resolve_device(cfg.device)
    rows = []
    for n in names:
        log.info("recipe %s", n)
        rows.append(bench_recipe(n, cfg, device))
    return {"environment": environment(device), "settings": dataclasses.asdict(cfg), "rows": rows}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# Recipes: engine against the original loops, {env['device']}", "",
        f"{env['date']}; torch {env['torch']}, torchvision {env.get('torchvision')}; Python {env['python']}; "
        f"{env['threads']} CPU threads" + (f"; CUDA {env.get('cuda')}" if "cuda" in env else "")
        + f". Weights `{results['settings']['weights']}` (speed does not depend on the values).",
        "A step is one loss + gradient evaluation and one update. Median of the repeats, timed round-robin.",
        "Parity: first loss of the engine against the original (non-in-place ReLUs), same start image.", "",
        "| recipe | size (WxH) | optimizer | original steps/s | engine steps/s | speed-up | parity (rel. err.) "
        "| the original per step |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        par = r["parity"]
        lines.append(
            f"| {r['recipe']} | {wxh(r['size'])} | {r['optimizer']} | {r['original_steps_per_s']:.3f} | "
            f"{r['engine_steps_per_s']:.3f} | {r['speedup']:.2f}x | {par['rel_err']:.1e} "
            f"{'ok' if par['passed'] else 'FAILED'} | {r['original_recomputes']} |")
    lines += ["", "Engine path: " + "; ".join(f"{r['recipe']} {r['engine_path']}" for r in results["rows"]), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """The engine's speed-up over each original loop, as bars."""
    plt = pyplot()
    if plt is None:
        return None
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    names = [f"{r['recipe']} ({wxh(r['size'])}, {r['optimizer']})" for r in rows]
    ax.barh(names, [r["speedup"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlim(0, 1.18 * max(r["speedup"] for r in rows))  # room for the labels
    for i, r in enumerate(rows):
        ax.text(r["speedup"], i, f" {r['speedup']:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("engine steps/s / original loop steps/s")
    ax.set_title(f"Recipes on {results['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_from_args(cfg: RecipeBenchSettings) -> int:
    results = run(cfg)
    out = results_dir(cfg.out, cfg.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = cfg.name or "recipes-" + slug(results["environment"]["device"])
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=1, default=float) + "\n")
    atomic_write_text(paths[1], markdown(results))
    png = plot(results, out / f"{stem}.png")
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths + ([png] if png else [])))
    failed = [r["recipe"] for r in results["rows"] if not r["parity"]["passed"]]
    if failed:
        raise NSTError(f"first-loss parity failed for {', '.join(failed)} (see {paths[1]})")
    return 0
