"""The ``nst`` command line: ``main`` is the console script. Options are generated from
the settings dataclasses (nst/flags.py); the commands live in nst/commands.py and
nst/stylize_command.py.

Errors a user can cause print one line on stderr (``nst: error: ...``) and exit 1;
usage errors exit 2 (argparse's convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from nst.engine.errors import NSTError

from . import __version__, flags

log = logging.getLogger("nst")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nst: %(message)s"))
    root = logging.getLogger("nst")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _process_age() -> float:
    """Seconds since this process started (Linux), so a time budget includes Python's
    start-up and the imports; 0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _recipe_defaults(argv: list[str]) -> dict:
    """The values of a ``--recipe NAME`` on the command line, to become the defaults of
    ``nst stylize`` / ``nst targets`` (so explicit flags override them). An unknown name
    gives no defaults; the parser then refuses it with the list of recipes."""
    from nst.engine import recipes

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    name = pre.parse_known_args(argv)[0].recipe
    if name not in recipes.RECIPES:
        return {}
    given = {f for f in ("size", "resize") if any(a == f"--{f}" or a.startswith(f"--{f}=") for a in argv)}
    return recipes.values(name, given)


def version_text() -> str:
    """nst's version, torch's (with CUDA and cuDNN where built in), and the device `auto`
    picks here."""
    import torch

    lines = [f"nst {__version__}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        lines[-1] += f" (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    if torch.cuda.is_available():
        lines.append(f"device: cuda ({torch.cuda.get_device_name()})")
    else:
        lines.append("device: cpu (no CUDA GPU visible)")
    return "\n".join(lines)


class _Version(argparse.Action):
    """--version, computed when asked for (it imports torch; --help does not)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


@dataclass(frozen=True)
class Command:
    name: str
    settings: type | None  # the dataclass its options come from
    run: Callable  # (settings object, parsed args, clock start) -> exit status
    help: str
    description: str
    recipe: bool = False  # takes --recipe NAME


def _commands() -> list[Command]:
    # Settings classes only: plain dataclasses, no torch, so that --help is quick.
    from nst.bench.settings import BenchSettings, QualitySettings, RecipeBenchSettings, TileBenchSettings
    from nst.export.settings import ExportSettings

    from . import commands
    from .jobs import DemoSettings, StylizeJob, TargetsJob, WatchSettings

    return [
        Command("export", ExportSettings, lambda s, a, t: commands.export_command(s),
                "write the VGG extractor as TorchScript, ONNX and ExportedProgram, with manifest.json",
                "Write the VGG extractor (cut after its deepest tap) as TorchScript (.ts), ONNX (.onnx) and "
                "ExportedProgram (.pt2), check each against the eager module at a size other than the traced one, "
                "then write manifest.json. A failed check exits non-zero and writes no manifest."),
        Command("stylize", StylizeJob, lambda s, a, t: commands.stylize(s, a.quiet, t, a.recipe),
                "render CONTENT in the style of one or more --style images",
                "Optimise the pixels of an image so that its VGG features match CONTENT and the Gram matrices of the "
                "--style images. Defaults: 512 px, 500 Adam steps, content at relu4_2, style at relu1_1..relu5_1.",
                recipe=True),
        Command("targets", TargetsJob, lambda s, a, t: commands.targets_command(s),
                "write content features, style Grams and the start image for a host without Python (C++)",
                "Compute the targets of a render with an export directory's TorchScript extractor and write them as "
                "a TorchScript module of tensors plus a JSON description, for examples/cpp/nst_host.", recipe=True),
        Command("watch", WatchSettings, lambda s, a, t: commands.watch_command(s),
                "the live page of a render started elsewhere, from its --progress FILE",
                "Follow the --progress FILE that a render (under torchrun, on another machine with a shared "
                "filesystem, or in another shell) appends to, and serve the same live page as --serve: the image, "
                "the losses over steps, the scales and the plan. Runs until Ctrl-C; the page cannot stop that render."),
        Command("recipes", None, lambda s, a, t: commands.recipes_command(a.name),
                "list the named recipes (--recipe) with their equivalent flags",
                "Print each recipe's source and the nst stylize flags it stands for; with NAME, also where the engine "
                "departs from the original code (docs/recipes.md)."),
        Command("demo", DemoSettings, lambda s, a, t: commands.demo_command(s, a.quiet),
                "render images the project draws itself, with no arguments and no network",
                "Draw a landscape and a swirling painting, stylise one with the other, and write the result and a "
                "side-by-side sheet. Uses ImageNet weights when cached, else seeded random weights (and says so)."),
        Command("bench", BenchSettings, lambda s, a, t: commands.bench_command(s),
                "steps/s of the engine against eager PyTorch baselines, as a waterfall (JSON, markdown, plot)",
                "Time the naive and fair eager PyTorch loops and the engine's techniques one by one, in one process, "
                "on one device; write bench/results/<device>.{json,md,png}."),
        Command("bench-quality", QualitySettings, lambda s, a, t: commands.bench_quality_command(s),
                "full-resolution loss in a fixed time: multi-scale against single-scale, and the time to match",
                "Render the same image three times: multi-scale and single-scale under one time budget, then "
                "single-scale for longer, to see when it reaches the multi-scale loss. Writes JSON and markdown."),
        Command("bench-tiles", TileBenchSettings, lambda s, a, t: commands.bench_tiles_command(s),
                "the price of exact tiles: tiled against untiled ms/step, and how large each mode goes",
                "Time the untiled step and the tiled step at each SIZE:TILE case (same image, same settings), report "
                "ms/step and the ratio, the largest size each mode fits by the memory plan's estimates, and how two "
                "gloo ranks best share a step. Writes bench/results/tiles-<device>.{json,md}."),
        Command("bench-recipes", RecipeBenchSettings, lambda s, a, t: commands.bench_recipes_command(s),
                "each recipe (--recipe) on the engine against a faithful re-implementation of its original loop",
                "Check that the engine and each original loop agree on the first loss, then time both at the recipe's "
                "size (round-robin). Writes bench/results/recipes-<device>.{json,md,png}; exits 1 if a parity check "
                "fails."),
    ]


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` is only read for a --recipe, whose values become defaults."""
    from nst.engine import recipes

    parser = argparse.ArgumentParser(
        prog="nst", description="Gatys-style neural style transfer engine: export the VGG extractor, stylise images.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="the versions of nst and torch, and the device nst would use")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    recipe_values = _recipe_defaults(list(argv))
    for cmd in _commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        if cmd.recipe:
            p.add_argument("--recipe", choices=list(recipes.RECIPES), metavar="NAME",
                           help="start from a named configuration (" + ", ".join(recipes.RECIPES) + "; `nst recipes` "
                           "shows their flags); options given beside it override its values")
        if cmd.settings is not None:
            flags.add_arguments(p, cmd.settings)
        else:
            p.add_argument("name", nargs="?", choices=list(recipes.RECIPES), metavar="NAME", help="one recipe")
        if cmd.recipe:  # after the options: set_defaults then replaces their defaults
            offered = flags.option_names(cmd.settings)
            p.set_defaults(**{k: v for k, v in recipe_values.items() if k in offered})
        p.set_defaults(command_obj=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A time budget counts from the process start when nst runs as a program (so Python's
    # start-up and imports are inside it), and from this call when called from Python.
    t_start = time.perf_counter() - (_process_age() if argv is None else 0.0)
    if argv is None:  # as a program: SIGTERM and SIGHUP stop a render as Ctrl-C does
        from nst.engine.signals import stop_on_signals

        stop_on_signals()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(version_text())
        return 0
    try:
        args = build_parser(argv).parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while torch is being imported
        return _interrupted()
    _setup_logging(args.verbose, args.quiet)
    cmd: Command = args.command_obj
    try:
        settings = flags.from_args(cmd.settings, args) if cmd.settings is not None else None
        return cmd.run(settings, args, t_start)
    except NSTError as e:
        print(f"nst: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except MemoryError:
        print("nst: error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:  # anything the commands did not turn into a clearer message
        where = f": {e.filename}" if e.filename else ""
        print(f"nst: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _interrupted() -> int:
    import signal

    from nst.engine.signals import stop_signal

    signum = stop_signal() or signal.SIGINT
    print(f"nst: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
