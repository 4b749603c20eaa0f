"""The ``nst`` command line. Options are generated from the settings dataclasses.

Errors a user can cause print one line on stderr (``nst: error: ...``) and exit 1;
usage errors exit 2 (argparse's convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

from . import config
from .errors import NSTError

log = logging.getLogger("nst")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nst: %(message)s"))
    root = logging.getLogger("nst")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _cmd_export(args: argparse.Namespace) -> int:
    from export import ExportSettings, export_extractor, summary

    settings = config.from_args(ExportSettings, args)
    result = export_extractor(settings)
    print(summary(result, settings.out))
    return 0


def parse_style_spec(spec: str) -> tuple[str, float]:
    """'a.jpg:0.3' -> ('a.jpg', 0.3); 'a.jpg' -> ('a.jpg', 1.0). A path may contain ':'."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not (weight >= 0 and weight != float("inf")):
            raise NSTError(f"bad style weight in {spec!r}: must be a finite number >= 0")
        return path, weight
    return spec, 1.0


def _process_age() -> float:
    """Seconds since this process started (Linux), so a time budget includes Python's
    start-up and the imports; 0 where that cannot be read."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _check_file_target(path: str, flag: str) -> Path:
    """Refuse, before any work, a non-image output path that cannot be a file."""
    p = Path(path)
    if p.is_dir() or not (p.parent if str(p.parent) else Path(".")).is_dir():
        raise NSTError(f"{flag} {path}: not a writable file path")
    return p


def _sibling(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}_{step:05d}{path.suffix}")


def _load_inputs(job, need: int):
    """Content, styles and init of a job, loaded and checked before any work."""
    from .api import INIT_KEYWORDS
    from .imageio import load_image

    content = load_image(job.content, job.max_pixels, "content image", need)
    styles = []
    for spec in job.style:
        path, weight = parse_style_spec(spec)
        styles.append((load_image(path, job.max_pixels, "style image", need), weight))
    if not sum(w for _, w in styles) > 0:
        raise NSTError("style weights must not all be zero")
    init = job.init
    if init not in INIT_KEYWORDS:
        init = load_image(init, job.max_pixels, "init image", need)
    return content, styles, init


def _settings_of(job):
    from .settings import StylizeSettings

    return StylizeSettings(**{f.name: getattr(job, f.name) for f in dataclasses.fields(StylizeSettings)})


def _cmd_stylize(args: argparse.Namespace) -> int:
    import json

    from .api import required_min_side
    from .fsutil import atomic_write_text
    from .imageio import (GIF_LONG_EDGE, check_gif_path, check_output_path, fit_long_edge, gif_frame, save_gif,
                          save_image)
    from .multiscale import budget_margin, render
    from .optimize import NonFiniteLossError
    from .settings import StylizeJob

    import time as _time

    t_start = _CLOCK_START or _time.perf_counter()  # a --time-budget counts from here
    job = config.from_args(StylizeJob, args)
    job.validate()
    # Everything that can be refused is refused before any work: output path, inputs.
    out = check_output_path(job.output)
    if job.stats:
        _check_file_target(job.stats, "--stats")
    if job.gif:
        check_gif_path(job.gif)
    if job.save_every < 0 or job.gif_every < 0:
        raise NSTError("--save-every and --gif-every must be >= 0")
    content, styles, init = _load_inputs(job, required_min_side(job))
    settings = _settings_of(job)

    frames = []
    gif_every = job.gif_every or max(1, settings.steps // 50)
    if job.gif:
        final_hw = settings.output_hw(tuple(content.shape[-2:]))
        frame_hw = fit_long_edge(final_hw, min(GIF_LONG_EDGE, max(final_hw)))
    every = math.gcd(job.save_every, gif_every) if job.gif else job.save_every

    def save_intermediate(step, image):
        if job.save_every and step % job.save_every == 0:
            save_image(image, _sibling(out, step))
        if job.gif and step % gif_every == 0:
            frames.append(gif_frame(image, frame_hw))

    def show_plan(plans):
        if settings.time_budget is None:
            print("scales: " + ", ".join(f"{p.hw[1]}x{p.hw[0]} ({p.steps} steps)" for p in plans))
            return
        print(f"plan for a {settings.time_budget:g} s budget (calibrated; {budget_margin(settings.time_budget):.1f} s "
              "kept for writing and noise):")
        for i, p in enumerate(plans, 1):
            print(f"  scale {i}: {p.hw[1]}x{p.hw[0]}  {p.step_s * 1e3:8.1f} ms/step  {p.steps:5d} steps  "
                  f"{p.planned_s:6.1f} s planned")

    try:
        result = render(content, styles, settings, init=init, progress=not args.quiet, on_image=save_intermediate,
                        save_every=every, t_start=t_start, on_plan=show_plan)
    except NonFiniteLossError as e:
        if e.result is not None:
            save_image(e.result.image, out)
            raise NSTError(f"{e}; wrote it to {out}") from None
        raise
    save_image(result.image, out)
    st = result.stats
    if job.gif:
        last = gif_frame(result.image, frame_hw)  # end on the image that was written (held 2 s)
        if not frames or last.tobytes() != frames[-1].tobytes():
            frames.append(last)
        save_gif(frames, job.gif)
        print(f"wrote {job.gif} ({len(frames)} frames, {frame_hw[1]}x{frame_hw[0]})")
    if st.scales and settings.time_budget is not None:
        total = _time.perf_counter() - t_start
        print(f"planned against actual ({total:.1f} s of a {settings.time_budget:g} s budget, image written):")
        for i, sc in enumerate(st.scales, 1):
            print(f"  scale {i}: {sc['hw'][1]}x{sc['hw'][0]}  planned {sc['steps_planned']} steps / "
                  f"{sc['planned_s']:.1f} s, ran {sc['steps_run']} steps / {sc['actual_s']:.1f} s")
    if job.stats:
        atomic_write_text(job.stats, json.dumps(st.to_dict(), indent=1) + "\n")
    h, w = st.size
    print(f"wrote {out} ({w}x{h}, {st.steps_run} steps, loss {st.loss[0]:.4g} -> {st.final_loss:.4g}, "
          f"{st.steps_per_s:.2f} steps/s on {st.device} {st.precision} {st.path} path)")
    if st.stopped in ("time-limit", "interrupted"):
        why = "the time limit was reached" if st.stopped == "time-limit" else "interrupted"
        print(f"stopped early ({why}) after {st.steps_run} of {st.steps_planned} steps; "
              f"wrote the best image so far (after {st.image_from_step} steps)", file=sys.stderr)
        return 130 if st.stopped == "interrupted" else 0
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .imageio import save_image
    from .optimize import run
    from .settings import DemoSettings, StylizeSettings
    from .imageio import pil_to_tensor

    ds = config.from_args(DemoSettings, args)
    out = Path(ds.out)
    if out.exists() and not out.is_dir():
        raise NSTError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    weights = demo.pick_weights(ds.weights)
    random_weights = weights.startswith("random")
    which = ("seeded random weights (" + weights + "): NOT a trained network, so the result shows the "
             "machinery, not a good stylisation; put torchvision's VGG19 checkpoint in the torch hub cache "
             "for real results") if random_weights else f"VGG19 weights: {weights}"
    print(f"nst demo: {which}")
    content_img, style_img = demo.make_content(), demo.make_style(seed=ds.seed)
    save_image(content_img, out / "content.png")
    save_image(style_img, out / "style.png")
    settings = StylizeSettings(size=ds.size, steps=ds.steps, weights=weights, device=ds.device, seed=ds.seed)
    if random_weights:
        # A random network's Gram matrices are about 100x smaller than ImageNet VGG19's, so
        # the default style weight barely moves the image; the demo says what it changed.
        settings.style_weight, settings.tv_weight = demo.RANDOM_STYLE_WEIGHT, 0.0
        print(f"nst demo: with random weights the demo uses --style-weight {demo.RANDOM_STYLE_WEIGHT:g} "
              "--tv-weight 0 (the defaults are set for ImageNet weights)")
    result = run(pil_to_tensor(content_img), [(pil_to_tensor(style_img), 1.0)], settings, progress=not args.quiet)
    save_image(result.image, out / "result.png")
    st = result.stats
    from PIL import Image

    caption = f"result: {st.steps_run} steps, {st.size[1]}x{st.size[0]}\n"
    caption += ("RANDOM weights (not trained),\nstyle weight 1e8, tv 0" if random_weights else "ImageNet VGG19")
    sheet = demo.contact_sheet([content_img, style_img, Image.open(out / "result.png")],
                               ["content (drawn by nst)", "style (drawn by nst)", caption])
    save_image(sheet, out / "sheet.png")
    print(f"nst demo: wrote {out / 'result.png'} and {out / 'sheet.png'} ({st.steps_run} steps in "
          f"{st.loop_s:.1f} s, {st.steps_per_s:.2f} steps/s on {st.device}; loss {st.loss[0]:.4g} -> "
          f"{st.final_loss:.4g})")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from .api import required_min_side
    from .optimize import prepare
    from .settings import TargetsJob
    from .targets_file import write_targets

    job = config.from_args(TargetsJob, args)
    job.validate()
    if not job.extractor:
        raise NSTError("--extractor DIR is required: targets are computed with that export's TorchScript file, "
                       "which the host will run")
    out = _check_file_target(job.output, "-o")
    content, styles, init = _load_inputs(job, required_min_side(job))
    settings = _settings_of(job)
    # The host runs the reference path: float32, NCHW, on the CPU.
    settings.reference, settings.device, settings.precision, settings.memory_format = True, "cpu", "fp32", "auto"
    p = prepare(content, styles, settings, init=init)
    info = write_targets(p, job.extractor, out)
    h, w = info["size"]
    print(f"wrote {out} ({w}x{h}; content {', '.join(n for n, _ in info['content_layers'])}; style "
          f"{', '.join(n for n, _ in info['style_layers'])}; for {job.extractor})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import BenchSettings, main_from_args

    return main_from_args(config.from_args(BenchSettings, args))


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from bench.quality import QualitySettings, main_from_args

    return main_from_args(config.from_args(QualitySettings, args))


def _recipe_defaults(argv: list[str]) -> dict:
    """The values of a ``--recipe NAME`` on the command line, to become the defaults of
    ``nst stylize`` / ``nst targets`` (so explicit flags override them). An unknown name
    gives no defaults; the parser then refuses it with the list of recipes."""
    from . import recipes

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    name = pre.parse_known_args(argv)[0].recipe
    if name not in recipes.RECIPES:
        return {}
    given = {f for f in ("size", "resize") if any(a == f"--{f}" or a.startswith(f"--{f}=") for a in argv)}
    return recipes.values(name, given)


def _cmd_recipes(args: argparse.Namespace) -> int:
    import shlex

    from . import recipes

    names = [args.name] if args.name else list(recipes.RECIPES)
    for name in names:
        r = recipes.get(name)
        print(f"{r.name}: {r.title}\n  source: {r.source}\n  flags:  {shlex.join(recipes.flags(name))}")
        if args.name:
            print(f"  notes:  {r.notes}")
    return 0


def _cmd_bench_recipes(args: argparse.Namespace) -> int:
    from bench.recipes import RecipeBenchSettings, main_from_args

    return main_from_args(config.from_args(RecipeBenchSettings, args))


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` is only read for a --recipe, whose values become defaults."""
    from bench.quality import QualitySettings
    from bench.recipes import RecipeBenchSettings
    from bench.run import BenchSettings
    from export import ExportSettings

    from . import recipes
    from .settings import TARGETS_EXCLUDE, DemoSettings, StylizeJob, TargetsJob

    parser = argparse.ArgumentParser(
        prog="nst",
        description="Gatys-style neural style transfer engine: export the VGG extractor, stylise images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    recipe_values = _recipe_defaults(list(argv))

    def command(name, settings_cls, func, help, description, exclude=frozenset(), recipe=False):
        """A subcommand whose options are generated from ``settings_cls``."""
        p = sub.add_parser(name, help=help, description=description)
        if recipe:
            p.add_argument("--recipe", choices=list(recipes.RECIPES), metavar="NAME",
                           help="start from a named configuration (" + ", ".join(recipes.RECIPES) + "; `nst recipes` "
                           "shows their flags); options given beside it override its values")
        config.add_arguments(p, settings_cls, exclude=exclude)
        p.set_defaults(func=func)
        if recipe:
            p.set_defaults(**{k: v for k, v in recipe_values.items() if k not in exclude})

    command("export", ExportSettings, _cmd_export,
            help="write the VGG extractor as TorchScript, ONNX and ExportedProgram, with manifest.json",
            description="Write the VGG extractor (cut after its deepest tap) as TorchScript (.ts), ONNX "
                        "(.onnx) and ExportedProgram (.pt2), check each against the eager module at a size "
                        "other than the traced one, then write manifest.json. A failed check exits non-zero "
                        "and writes no manifest.")

    command("stylize", StylizeJob, _cmd_stylize,
            help="render CONTENT in the style of one or more --style images",
            description="Optimise the pixels of an image so that its VGG features match CONTENT and the Gram "
                        "matrices of the --style images. Defaults: 512 px, 500 Adam steps, content at "
                        "relu4_2, style at relu1_1..relu5_1.", recipe=True)

    command("targets", TargetsJob, _cmd_targets, exclude=TARGETS_EXCLUDE,
            help="write content features, style Grams and the start image for a host without Python (C++)",
            description="Compute the targets of a render with an export directory's TorchScript extractor and "
                        "write them as a TorchScript module of tensors plus a JSON description, for "
                        "examples/cpp/nst_host.", recipe=True)

    p = sub.add_parser("recipes", help="list the named recipes (--recipe) with their equivalent flags",
                       description="Print each recipe's source and the nst stylize flags it stands for; with NAME, "
                                   "also where the engine departs from the original code (docs/recipes.md).")
    p.add_argument("name", nargs="?", choices=list(recipes.RECIPES), metavar="NAME", help="one recipe")
    p.set_defaults(func=_cmd_recipes)

    command("demo", DemoSettings, _cmd_demo,
            help="render images the project draws itself, with no arguments and no network",
            description="Draw a landscape and a swirling painting, stylise one with the other, and write the "
                        "result and a side-by-side sheet. Uses ImageNet weights when cached, else seeded "
                        "random weights (and says so).")

    command("bench", BenchSettings, _cmd_bench,
            help="steps/s of the engine against eager PyTorch baselines, as a waterfall (JSON, markdown, plot)",
            description="Time the naive and fair eager PyTorch loops and the engine's techniques one by one, "
                        "in one process, on one device; write bench/results/<device>.{json,md,png}.")

    command("bench-quality", QualitySettings, _cmd_bench_quality,
            help="full-resolution loss in a fixed time: multi-scale against single-scale, and the time to match",
            description="Render the same image three times: multi-scale and single-scale under one time "
                        "budget, then single-scale for longer, to see when it reaches the multi-scale loss. "
                        "Writes JSON and markdown.")

    command("bench-recipes", RecipeBenchSettings, _cmd_bench_recipes,
            help="each recipe (--recipe) on the engine against a faithful re-implementation of its original loop",
            description="Check that the engine and each original loop agree on the first loss, then time both at "
                        "the recipe's size (round-robin). Writes bench/results/recipes-<device>.{json,md,png}; exits "
                        "1 if a parity check fails.")
    return parser


_CLOCK_START: float | None = None


def main(argv: list[str] | None = None) -> int:
    global _CLOCK_START
    import time

    # A time budget counts from the process start when nst runs as a program (so Python's
    # start-up and imports are inside it), and from this call when called from Python.
    _CLOCK_START = time.perf_counter() - (_process_age() if argv is None else 0.0)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except NSTError as e:
        print(f"nst: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("nst: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
