"""``nst bench-tiles``: the price of exact tiles (engine/tiles.py).

For each case SIZE:TILE it times the untiled step (where the memory plan lets it run
without checkpointing) and the tiled step at the same size, after warm-up, and reports
ms/step and their ratio (the issue's goal: at most 1.8x with 2048 px tiles). A tiled
step pays for each tile's halo (80 px a side for relu5_1) and a second forward pass.

It also states how large each mode can go on this machine, from the memory plan's
estimates (engine/memory.py; labelled as estimates), and, with ``--ranks-comm``, times
the two ways ranks can share a step's image and gradient (engine/ranks.py) on two gloo
ranks of this machine: the lead broadcasts the image and the workers' gradients are
reduced to it (what the engine does), or every rank steps its own copy on an all-reduced
gradient.

Writes JSON and markdown (bench/results/tiles-<device>.{json,md}).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from nst.engine.device import sync
from nst.engine.memory import available_bytes, estimate_step_bytes, estimate_tiled_bytes, largest_fitting
from nst.engine.tiling import TILE_SIZES
from nst.engine.plan import resolve_plan
from nst.engine.session import prepare
from nst.engine.errors import InputError
from nst.engine.fsutil import atomic_write_text
from nst.engine.settings import StylizeSettings

from .inputs import drawn_pair
from .probes import environment, slug
from .report import results_dir
from .settings import TileBenchSettings
from .timing import RSSPeak, trim

GOAL_TILE, GOAL_RATIO = 2048, 1.8


def _case(size: int, tile: int | None, cfg: TileBenchSettings, device: str) -> dict:
    """ms/step of one configuration: the engine's default step at SIZE x SIZE, untiled
    (checkpointing off) or with TILE px tiles."""
    content, style = drawn_pair(size)
    settings = StylizeSettings(size=size, weights=cfg.weights, device=device, precision=cfg.precision,
                               checkpointing="off", tile=tile, progress_every=10**6)
    row = {"size": size, "tile": tile or 0}
    trim()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        with RSSPeak() as rss:
            p = prepare(content, [(style, 1.0)], settings)
            if tile is None and p.memory.tile:  # the plan would tile it: there is no untiled step to time
                return {**row, "fits": False, "why": f"the memory plan tiles it ({p.memory.tile} px)"}
            row["setup_s"] = time.perf_counter() - t0
            row["tiles"] = len(p.objective.tiles((size, size))) if p.memory.tile else 1
            row["tile"] = p.memory.tile or 0
            for _ in range(cfg.warmup):
                p.stepper.step()
            sync(torch.device(device))
            times = []
            for _ in range(cfg.steps):
                t = time.perf_counter()
                p.stepper.step()
                sync(torch.device(device))
                times.append(time.perf_counter() - t)
    except InputError as e:  # the memory plan refused it
        return {**row, "fits": False, "why": str(e)}
    except torch.OutOfMemoryError:  # the plan's estimate was low
        return {**row, "fits": False, "why": "out of memory"}
    row.update(fits=True, ms_per_step=1e3 * statistics.median(times), ms_repeats=[1e3 * t for t in times],
               estimate_bytes=p.memory.bytes,
               peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak)
    del p
    return row


def _reach(device: str, precision: str, weights: str) -> dict:
    """The largest square each mode fits in the memory found free, by the memory plan's estimates."""
    plan = resolve_plan(StylizeSettings(device=device, precision=precision, weights=weights))
    taps = StylizeSettings().taps()
    free = available_bytes(device)
    if free is None:
        return {}
    big = 1 << 16
    out = {"free_bytes": free}
    for name, ckpt, tiles in (("plain", False, False), ("checkpointed", True, False), ("tiled_64px", False, True)):
        hw = largest_fitting(big, big, taps, "vgg19", plan.act_bytes, "max", free, ckpt, tiles)
        out[name] = hw[0] if hw else 0
    out["estimates_4096"] = {"plain": estimate_step_bytes(4096, 4096, taps, "vgg19", plan.act_bytes, "max", False),
                             **{f"tiled_{t}": estimate_tiled_bytes(4096, 4096, t, taps, "vgg19", plan.act_bytes, "max")
                                for t in TILE_SIZES}}
    return out


def _comm_rank(rank: int, world: int, port: int, sizes, repeats: int, out: str) -> None:
    """One gloo rank of --ranks-comm: per size, the two ways to share a step's image and
    gradient, median seconds over ``repeats``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    for s in sizes:
        x = torch.rand(1, 3, s, s)
        g = torch.rand(1, 3, s, s)
        opt = torch.optim.Adam([x.requires_grad_(True)], lr=0.01, foreach=True)
        lead, every = [], []
        for _ in range(repeats):
            dist.barrier()
            t = time.perf_counter()
            dist.broadcast(x.data, 0)  # the lead's image to the workers
            dist.reduce(g, 0)  # the workers' tile gradients to the lead
            if rank == 0:
                x.grad = g
                opt.step()
            dist.barrier()
            lead.append(time.perf_counter() - t)
            t = time.perf_counter()
            dist.all_reduce(g)  # every rank gets the whole gradient...
            x.grad = g
            opt.step()  # ...and steps its own copy
            dist.barrier()
            every.append(time.perf_counter() - t)
        res[s] = {"lead_steps_ms": 1e3 * statistics.median(lead), "every_rank_steps_ms": 1e3 * statistics.median(every)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()  # leave together
    dist.destroy_process_group()


def _ranks_comm(sizes, repeats: int) -> dict:
    import os
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        torch.multiprocessing.spawn(_comm_rank, args=(2, port, list(sizes), repeats, out), nprocs=2, join=True)
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}
    finally:
        os.unlink(out)


def markdown(res: dict) -> str:
    lines = [f"# Exact tiles: the price of exactness ({res['device_name']})", "",
             f"torch {res['torch']}, {res['device']} {res['precision']}, weights {res['weights']} (random: speed does "
             "not depend on the values), the demo's drawn images; the engine's default step (Adam, content relu4_2, "
             f"style relu1_1..relu5_1); median of {res['steps']} timed steps after {res['warmup']} warm-up. "
             "`nst bench-tiles` wrote this file.", "",
             "| size | tile | tiles | ms/step | tiled / untiled | setup s | peak memory | plan's estimate |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if not r["fits"]:
            lines.append(f"| {r['size']} | {r['tile'] or 'untiled'} | | does not fit: {r['why']} | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        lines.append(f"| {r['size']} | {r['tile'] or 'untiled'} | {r['tiles']} | {r['ms_per_step']:,.0f} | {ratio} | "
                     f"{r['setup_s']:.1f} | {r['peak_bytes'] / 2**30:.2f} GiB | {r['estimate_bytes'] / 2**30:.2f} GiB |")
    lines += ["", "Peak memory: the CPU's peak resident set size of the whole process while the row ran (it includes "
              "the Python runtime and what earlier rows left mapped); on CUDA the allocator's peak.", ""]
    goal = [r for r in res["rows"] if r.get("ratio") and r["tile"] == GOAL_TILE]
    if goal:
        for r in goal:
            ok = "met" if r["ratio"] <= GOAL_RATIO else "NOT met"
            lines.append(f"**Goal (at most {GOAL_RATIO}x with {GOAL_TILE} px tiles): {r['ratio']:.2f}x at "
                         f"{r['size']} px, {ok}.**")
    else:
        lines.append(f"Goal (at most {GOAL_RATIO}x with {GOAL_TILE} px tiles): no {GOAL_TILE} px tile row with an "
                     "untiled step beside it was measured here.")
    reach = res.get("reach") or {}
    if reach:
        lines += ["", f"## How large each mode goes here (the memory plan's estimates, {reach['free_bytes'] / 2**30:.1f} "
                  "GiB found free)", "",
                  f"- plain step: up to about {reach['plain']} px square",
                  f"- checkpointed step: up to about {reach['checkpointed']} px square",
                  f"- tiled step (64 px tiles): up to about {reach['tiled_64px']} px square (the whole image, its "
                  "gradient, Adam's state and the content target stay whole: about 90 bytes a pixel)"]
    comm = res.get("ranks_comm")
    if comm:
        lines += ["", "## Sharing a step across two gloo ranks on this machine", "",
                  "Per step, median: the lead broadcasts the image and the gradients are reduced to it, the lead "
                  "steps (the engine's way), against an all-reduce of the gradient and every rank stepping its own "
                  "copy.", "", "| size | lead steps, broadcasts | every rank steps |", "|---:|---:|---:|"]
        for s, v in sorted(comm.items()):
            lines.append(f"| {s} | {v['lead_steps_ms']:.1f} ms | {v['every_rank_steps_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def main_from_args(cfg: TileBenchSettings) -> int:
    gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    cfg = cfg.resolved(gpu)
    device = "cuda" if gpu else "cpu"
    rows = []
    for size, tile in cfg.case_pairs():
        untiled = next((r for r in rows if r["size"] == size and r["tile"] == 0 and r["fits"]), None)
        if untiled is None and not any(r["size"] == size and r.get("untiled_row") for r in rows):
            untiled = _case(size, None, cfg, device)
            untiled["untiled_row"] = True
            rows.append(untiled)
            print(_line(untiled), flush=True)
            untiled = untiled if untiled["fits"] else None
        r = _case(size, tile, cfg, device)
        if r["fits"] and untiled is not None and untiled["tile"] == 0 and r["tile"]:
            r["ratio"] = r["ms_per_step"] / untiled["ms_per_step"]
        rows.append(r)
        print(_line(r), flush=True)
    env = environment(torch.device(device))
    res = {"device": device, "device_name": env["device"], "environment": env, "torch": torch.__version__,
           "precision": cfg.precision,
           "weights": cfg.weights, "steps": cfg.steps, "warmup": cfg.warmup, "rows": rows,
           "reach": _reach(device, cfg.precision, cfg.weights)}
    if cfg.ranks_comm:
        res["ranks_comm"] = _ranks_comm(cfg.comm_sizes(), 5 if cfg.quick else 20)
    out = results_dir(cfg.out, cfg.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = cfg.name or f"tiles-{slug(env['device'])}"
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(res))
    print(f"wrote {out / stem}.json and .md")
    return 0


def _line(r: dict) -> str:
    if not r["fits"]:
        return f"{r['size']} px {r['tile'] or 'untiled'}: does not fit"
    ratio = f" ({r['ratio']:.2f}x untiled)" if r.get("ratio") else ""
    return f"{r['size']} px {r['tile'] or 'untiled'}: {r['ms_per_step']:,.0f} ms/step{ratio}"

