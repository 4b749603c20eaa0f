"""The subcommands other than ``nst stylize``: export, targets, demo, recipes, watch and the
benchmarks. Each takes its parsed settings and returns an exit status."""

from __future__ import annotations

import dataclasses
import shlex
import sys

from nst.engine.errors import NSTError

from .jobs import DemoSettings, TargetsJob


def stylize(job, quiet: bool, t_start: float, recipe: str | None) -> int:
    from .stylize_command import stylize_command

    return stylize_command(job, quiet, t_start, recipe)


def export_command(settings) -> int:
    from nst.export import export_extractor, summary

    result = export_extractor(settings)
    print(summary(result, settings.out))
    return 0


def targets_command(job: TargetsJob) -> int:
    from nst.engine.fsutil import write_target
    from nst.engine.session import prepare
    from nst.export.targets_file import write_targets

    from .inputs import load_inputs

    if not job.settings.extractor:
        raise NSTError("--extractor DIR is required: targets are computed with that export's TorchScript file, "
                       "which the host will run")
    out = write_target(job.output, "-o")
    content, styles, init = load_inputs(job)
    # The host runs the reference path: float32, NCHW, on the CPU.
    settings = dataclasses.replace(job.settings, reference=True, device="cpu", precision="fp32", memory_format="auto")
    info = write_targets(prepare(content, styles, settings, init=init), job.settings.extractor, out)
    h, w = info["size"]
    print(f"wrote {out} ({w}x{h}; content {', '.join(n for n, _ in info['content_layers'])}; style "
          f"{', '.join(n for n, _ in info['style_layers'])}; for {job.settings.extractor})")
    return 0


def demo_command(ds: DemoSettings, quiet: bool) -> int:
    from PIL import Image

    from nst.engine import demo
    from nst.engine.fsutil import output_dir
    from nst.engine.imageio import pil_to_tensor, save_image
    from nst.engine.loop import run
    from nst.engine.progress import progress_bar
    from nst.engine.settings import StylizeSettings

    from .stylize_command import save_final, stopped_early

    out = output_dir(ds.out)
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
        settings = dataclasses.replace(settings, style_weight=demo.RANDOM_STYLE_WEIGHT, tv_weight=0.0)
        print(f"nst demo: with random weights the demo uses --style-weight {demo.RANDOM_STYLE_WEIGHT:g} "
              "--tv-weight 0 (the defaults are set for ImageNet weights)")
    with progress_bar(not quiet) as bar:
        result = run(pil_to_tensor(content_img), [(pil_to_tensor(style_img), 1.0)], settings, callback=bar)
    save_final(result.image, out / "result.png")  # a second signal waits for it
    st = result.stats
    caption = f"result: {st.steps_run} steps, {st.size[1]}x{st.size[0]}\n"
    caption += ("RANDOM weights (not trained),\nstyle weight 1e8, tv 0" if random_weights else "ImageNet VGG19")
    sheet = demo.contact_sheet([content_img, style_img, Image.open(out / "result.png")],
                               ["content (drawn by nst)", "style (drawn by nst)", caption])
    save_image(sheet, out / "sheet.png")
    loss = f"loss {st.loss[0]:.4g} -> {st.final_loss:.4g}" if st.loss else f"loss {st.final_loss:.4g}"
    print(f"nst demo: wrote {out / 'result.png'} and {out / 'sheet.png'} ({st.steps_run} steps in "
          f"{st.loop_s:.1f} s, {st.steps_per_s:.2f} steps/s on {st.device}; {loss})")
    early = stopped_early(st)  # Ctrl-C, SIGTERM, SIGHUP: as nst stylize says it, and exits 128 + the signal
    if early is None:
        return 0
    print(early[0], file=sys.stderr)
    return early[1]


def watch_command(ws) -> int:
    from nst.engine.live import watch

    return watch(ws.file, ws.serve)


def recipes_command(name: str | None) -> int:
    from nst.engine import recipes

    for n in [name] if name else list(recipes.RECIPES):
        r = recipes.get(n)
        print(f"{r.name}: {r.title}\n  source: {r.source}\n  flags:  {shlex.join(recipes.flags(n))}")
        if name:
            print(f"  notes:  {r.notes}")
    return 0


def bench_command(cfg) -> int:
    from nst.bench.run import main_from_args

    return main_from_args(cfg)


def bench_quality_command(cfg) -> int:
    from nst.bench.quality import main_from_args

    return main_from_args(cfg)


def bench_tiles_command(cfg) -> int:
    from nst.bench.tiles import main_from_args

    return main_from_args(cfg)


def bench_recipes_command(cfg) -> int:
    from nst.bench.recipes import main_from_args

    return main_from_args(cfg)
