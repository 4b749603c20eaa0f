"""Settings of the benchmarks (``nst bench``, ``bench-quality``, ``bench-recipes``): plain
dataclasses, no torch, so that the command line's help is quick."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nst.engine.errors import NSTError
from nst.engine.settings import AUTO_START, MOVE_ON_RHO, option

CPU_SIZES = (128, 256)
GPU_SIZES = (256, 512, 1024, 2048, 4096)
OUT_DEFAULT = (" (default: bench/results, or a temporary directory with --quick, which never overwrites the "
               "committed results)")


@dataclass(frozen=True)
class BenchSettings:
    """``nst bench``: the waterfall (bench/run.py)."""

    sizes: tuple[int, ...] = option((), help="square sizes in px (default: 128 256 on CPU; 256 512 1024 2048 4096 on "
                                    "GPU)", parse=int, metavar="PX")
    rows: tuple[str, ...] = option((), help="only these rows of the waterfall, by key (naive eager user_compile "
                                   "user_compile_ro user_whole user_whole_ro targets channels_last tf32 bf16 fp16 graph "
                                   "compile kernels torchscript engine onnxruntime; default: all)", metavar="KEY")
    steps: int = option(0, help="steps per timed repeat (default: 4 on CPU, 20 on GPU)")
    repeats: int = option(5, help="timed repeats; the median is reported")
    warmup: int = option(0, help="untimed steps first (default: 2 on CPU; on a GPU, 3 more than the CUDA graph's "
                         "warm-up and capture take)")
    device: str = option("auto", help="auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    weights: str = option("random:0", help="weights spec; speed does not depend on the values, and the "
                          "default needs no download", metavar="SPEC")
    out: str | None = option(None, help="directory for the JSON, markdown and plot" + OUT_DEFAULT, metavar="DIR")
    name: str | None = option(None, help="file stem for the results (default: from the device name)")
    interleave: bool | None = option(None, help="time the rows round-robin (default: on the CPU, where a shared "
                                     "machine's slow moments should hit every row alike; not on GPUs)")
    onnx: bool = option(True, help="also time target computation with ONNX Runtime against eager PyTorch, and on "
                        "the CPU the whole step in ONNX Runtime (the step graphs, --runtime onnxruntime)")
    profile: bool = option(True, help="profile the engine's default step at the largest size and record where "
                           "the time goes (kernel groups, their share and achieved FLOP/s)")
    waterfall: bool = option(True, help="time the waterfall's rows at each size (--no-waterfall: only the other "
                             "sections, e.g. time to image)")
    time_to_image: bool = option(True, help="also time whole renders from process start to file written, cold and "
                                 "warm compiler caches, for the engine and the fastest user loop (512 px / 500 steps "
                                 "and 2048 px / 200 steps on GPUs; 128 px / 30 steps on the CPU)")
    renders: tuple[str, ...] = option((), help="the time-to-image renders, PX:STEPS each (default: 512:500 2048:200 "
                                      "on GPUs, 128:30 on the CPU)", metavar="PX:STEPS")
    quick: bool = option(False, help="tiny size and few steps: proves the script works end to end, measures nothing")

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.steps < 0 or self.warmup < 0:
            raise NSTError("--repeats must be at least 1, --steps and --warmup at least 0")
        self.render_list()

    def render_list(self) -> tuple[tuple[int, int], ...]:
        """--renders as (px, steps) pairs (empty: the device's default)."""
        out = []
        for spec in self.renders:
            px, sep, steps = spec.partition(":")
            if not (sep and px.isdigit() and steps.isdigit() and int(px) > 0 and int(steps) > 0):
                raise NSTError(f"--renders {spec!r}: write PX:STEPS, e.g. 512:500")
            out.append((int(px), int(steps)))
        return tuple(out)

    def resolved(self, gpu: bool) -> "BenchSettings":
        """The defaults that depend on the device (and --quick) filled in."""
        from nst.engine.steppers import GRAPH_WARMUP_STEPS

        cfg = self
        if cfg.quick:
            cfg = dataclasses.replace(cfg, sizes=cfg.sizes or (64,), steps=cfg.steps or 2,
                                      repeats=min(cfg.repeats, 2),
                                      warmup=cfg.warmup or (GRAPH_WARMUP_STEPS + 1 if gpu else 1))
        return dataclasses.replace(
            cfg, sizes=tuple(cfg.sizes) or (GPU_SIZES if gpu else CPU_SIZES), steps=cfg.steps or (20 if gpu else 4),
            warmup=cfg.warmup or (GRAPH_WARMUP_STEPS + 3 if gpu else 2),
            interleave=(not gpu) if cfg.interleave is None else cfg.interleave)


@dataclass(frozen=True)
class QualitySettings:
    """``nst bench-quality``: quality at equal time (bench/quality.py)."""

    size: int = option(0, help="final long edge in px (default: 512 on CPU, 2048 on GPU)")
    budget: float = option(0.0, help="seconds per render (default: 60 on CPU, 20 on GPU)")
    scales: str = option("auto", help="scales of the multi-scale render: auto, or long edges like 256,512")
    scale_factor: float = option(2.0, help="growth between the automatic scales of the multi-scale render")
    scale_start: int = option(AUTO_START, help="the adaptive render's smallest automatic scale (about; the equal split "
                              "as before starts at 256 px, and with another start a third multi-scale render, the "
                              "equal split over the adaptive plan's scales, tells the two effects apart)", metavar="PX")
    match_factor: float = option(3.0, help="how many budgets the single-scale matching run may take")
    move_on: float = option(MOVE_ON_RHO, help="the adaptive plan's --move-on (RHO) for its render", metavar="RHO")
    device: str = option("auto", help="auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    weights: str = option("random:0", help="weights spec", metavar="SPEC")
    content: str | None = option(None, help="content image (default: the demo's drawing)", metavar="FILE")
    style: str | None = option(None, help="style image (default: the demo's drawing)", metavar="FILE")
    out: str | None = option(None, help="directory for the JSON and markdown" + OUT_DEFAULT, metavar="DIR")
    name: str | None = option(None, help="file stem (default: quality-<device>)")
    quick: bool = option(False, help="tiny size and budget: proves the script works, measures nothing")

    def __post_init__(self) -> None:
        if self.budget < 0 or self.size < 0:
            raise NSTError("--budget and --size must be positive")


@dataclass(frozen=True)
class RecipeBenchSettings:
    """``nst bench-recipes``: each recipe against its original loop (bench/recipes.py)."""

    recipes: tuple[str, ...] = option((), help="recipes to run (default: all)", metavar="NAME")
    adam_steps: int = option(0, help="timed steps per repeat for Adam recipes (default: 3 on CPU, 20 on GPU); "
                             "L-BFGS recipes time one original call, 20 evaluations")
    repeats: int = option(0, help="timed repeats, round-robin (default: 4 on CPU, where one slow moment of a "
                          "shared machine must not decide a median, 5 on GPU)")
    device: str = option("auto", help="auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    weights: str = option("random:0", help="weights spec (speed does not depend on the values)", metavar="SPEC")
    out: str | None = option(None, help="directory for the JSON, markdown and plot" + OUT_DEFAULT, metavar="DIR")
    name: str | None = option(None, help="file stem (default: recipes-<device>)")
    quick: bool = option(False, help="64 px and one step: proves the script and the parity checks, measures nothing")


@dataclass(frozen=True)
class TileBenchSettings:
    """``nst bench-tiles``: tiled against untiled ms/step (bench/tiles.py)."""

    cases: tuple[str, ...] = option((), help="SIZE:TILE pairs: square image size and tile size in px (default: "
                                    "1024:256 1024:512 2560:2048 on the CPU; 2048:512 2048:1024 4096:1024 4096:2048 "
                                    "8192:2048 on GPUs)", metavar="SIZE:TILE")
    steps: int = option(0, help="timed steps per row; the median is reported (default: 2 on the CPU, 10 on GPUs)")
    warmup: int = option(0, help="untimed steps first (default: 1 on the CPU, 3 on GPUs)")
    device: str = option("auto", help="auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", help="as nst stylize's --precision", choices=("auto", "fp32", "tf32", "bf16",
                                                                                  "fp16"))
    weights: str = option("random:0", help="weights spec; speed does not depend on the values", metavar="SPEC")
    ranks_comm: bool = option(True, help="also time the two ways two gloo ranks can share a step's image and "
                              "gradient (lead steps and broadcasts, or every rank steps)")
    out: str | None = option(None, help="directory for the JSON and markdown" + OUT_DEFAULT, metavar="DIR")
    name: str | None = option(None, help="file stem for the results (default: tiles-<device>)")
    quick: bool = option(False, help="tiny sizes and one step: proves the script works end to end, measures nothing")

    def __post_init__(self) -> None:
        if self.steps < 0 or self.warmup < 0:
            raise NSTError("--steps and --warmup must be at least 0")
        self.case_pairs()

    def case_pairs(self) -> list[tuple[int, int]]:
        """The cases as (size, tile), each tile smaller than its size (one tile is the plain step)."""
        out = []
        for c in self.cases:
            try:
                size, tile = (int(v) for v in c.split(":"))
            except ValueError:
                raise NSTError(f"bad case {c!r}: write SIZE:TILE, e.g. 2048:512") from None
            if not 0 < tile < size:
                raise NSTError(f"bad case {c!r}: the tile must be positive and smaller than the size")
            out.append((size, tile))
        return out

    def comm_sizes(self) -> tuple[int, ...]:
        return (128,) if self.quick else (1024, 2048, 4096)

    def resolved(self, gpu: bool) -> "TileBenchSettings":
        cfg = self
        if cfg.quick:
            cfg = dataclasses.replace(cfg, cases=cfg.cases or ("96:48",), steps=cfg.steps or 1, warmup=cfg.warmup or 1)
        default = ("2048:512", "2048:1024", "4096:1024", "4096:2048", "8192:2048") if gpu else \
            ("1024:256", "1024:512", "2560:2048")
        return dataclasses.replace(cfg, cases=tuple(cfg.cases) or default, steps=cfg.steps or (10 if gpu else 2),
                                   warmup=cfg.warmup or (3 if gpu else 1))
