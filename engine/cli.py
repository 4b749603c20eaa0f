"""The ``nst`` command line. Options are generated from the settings dataclasses.

Errors a user can cause print one line on stderr (``nst: error: ...``) and exit 1;
usage errors exit 2 (argparse's convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


def build_parser() -> argparse.ArgumentParser:
    from export import ExportSettings

    parser = argparse.ArgumentParser(
        prog="nst",
        description="Gatys-style neural style transfer engine: export the VGG extractor, stylise images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "export",
        help="write the VGG extractor as TorchScript, ONNX and ExportedProgram, with manifest.json",
        description="Write the VGG extractor (cut after its deepest tap) as TorchScript (.ts), ONNX (.onnx) and "
        "ExportedProgram (.pt2), check each against the eager module at a size other than the traced one, "
        "then write manifest.json. A failed check exits non-zero and writes no manifest.",
    )
    config.add_arguments(p, ExportSettings)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
