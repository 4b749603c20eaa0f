"""The command line's jobs: a settings value plus the files it reads and writes.

A job holds its settings (``job.settings``) rather than inheriting them, so the numerical
core only ever sees a :class:`StylizeSettings`; nst/flags.py flattens the nested settings
into one list of options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nst.engine.errors import InputError
from nst.engine.sizes import MAX_PIXELS
from nst.engine.settings import DEVICES, StylizeSettings, option


def _style_option(help: str):
    return option(None, help=help, action="append", metavar="STYLE[:WEIGHT]", required=True)


@dataclass(frozen=True, kw_only=True)
class StylizeJob:
    """``nst stylize``: a render from files."""

    content: str = option(help="content image file", positional=True, metavar="CONTENT")
    style: list[str] | None = _style_option("style image, optionally with a relative weight: --style a.jpg --style "
                                            "b.jpg:0.3 (repeat for several; weights are normalised)")
    output: str = option(help="output image; the extension picks the format (.png .jpg .webp .tif)",
                         aliases=("-o",), metavar="OUT")
    settings: StylizeSettings = option(StylizeSettings(), help="the render's settings", nested=True)
    save_every: int = option(0, help="also write the image every N steps, as OUT-stem_NNNNN.ext", metavar="N")
    gif: str | None = option(None, help="also write an animated GIF of the image forming (frames at most "
                             "512 px)", metavar="FILE.gif")
    gif_every: int = option(0, help="steps between GIF frames (0: about 50 frames per scale)", metavar="N")
    stats: str | None = option(None, help="write per-step statistics and timings as JSON to this file",
                               metavar="FILE")
    max_pixels: int = option(MAX_PIXELS, help="refuse input images with more pixels than this "
                             "(decompression bombs)")
    state: str | None = option(None, help="keep a resumable state (the image and the optimiser's state) in this "
                               "file, rewritten at every progress interval", metavar="FILE")
    resume: bool = option(False, help="continue the render whose --state FILE is given, from where it was written "
                          "(the same inputs and settings; --steps may grow)")
    overwrite_state: bool = option(False, help="start again over an existing --state FILE (without it, a state "
                                   "that exists is refused: --resume continues it)")
    serve: str | None = option(None, help="serve a live page of the render (image, losses, scales, a stop button) "
                               "at [HOST:]PORT: on 127.0.0.1 unless a HOST is given, PORT 0 picks a free port; the "
                               "URL, with its token, is printed", metavar="[HOST:]PORT")
    progress: str | None = option(None, help="append one JSON line per progress interval to FILE, with a small "
                                  "image FILE.png beside it, for `nst watch FILE`", metavar="FILE")

    def __post_init__(self) -> None:
        if self.serve is not None:
            from nst.engine.live_server import parse_address

            parse_address(self.serve)
        if self.save_every < 0 or self.gif_every < 0:
            raise InputError("--save-every and --gif-every must be >= 0")
        if self.resume and not self.state:
            raise InputError("--resume needs --state FILE: the state file to continue from")
        if self.state:
            self.settings.check_resumable()
        if self.overwrite_state and (self.resume or not self.state):
            raise InputError("--overwrite-state starts a new render over an existing --state FILE: give --state, and "
                             "not --resume")

    def files(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str, re.Pattern]]]:
        """(inputs, outputs, numbered outputs) of the job, as (label, path) pairs and
        (label, directory, file-name pattern): what engine/fsutil.py ``check_distinct``
        holds apart before any work."""
        from nst.engine.settings import INIT_KEYWORDS
        from nst.engine.state import lock_path

        from .inputs import parse_style_spec

        s = self.settings
        inputs = [("content image", self.content)] + [("style image", parse_style_spec(spec)[0]) for spec in self.style]
        if s.init not in INIT_KEYWORDS:
            inputs.append(("--init image", s.init))
        if s.weights not in ("imagenet", "random") and not s.weights.startswith("random:"):
            inputs.append(("--weights file", s.weights))
        if s.extractor:
            export = Path(s.extractor)
            if export.is_dir():
                inputs += [("--extractor file", str(f)) for f in sorted(export.iterdir()) if f.is_file()]
        outputs = [("-o", self.output)]
        for label, path in (("--state", self.state), ("--stats", self.stats), ("--gif", self.gif),
                            ("--progress", self.progress)):
            if path:
                outputs.append((label, path))
        if self.progress:
            outputs.append(("--progress's image", f"{self.progress}.png"))
        if self.state:
            outputs.append(("--state's lock", str(lock_path(self.state))))
        if s.variant_cache:  # rewritten after a GPU's step-variant trial (engine/variants.py)
            outputs.append(("--variant-cache", s.variant_cache))
        patterns = []
        if self.save_every:
            out = Path(self.output)
            names = re.compile(re.escape(out.stem) + r"_\d{5,}" + re.escape(out.suffix))
            patterns.append(("--save-every", str(out.parent), names))
        return inputs, outputs, patterns


@dataclass(frozen=True, kw_only=True)
class TargetsJob:
    """``nst targets``: content features, style Grams and start image for a C++ host."""

    content: str = option(help="content image file", positional=True, metavar="CONTENT")
    style: list[str] | None = _style_option("style image, optionally with a relative weight (repeat for several)")
    output: str = option(help="targets file to write (a TorchScript module of tensors, e.g. targets.pt)",
                         aliases=("-o",), metavar="OUT")
    # The settings of the targets only: the loop's (steps, optimiser, device...) are the
    # host's business; the C++ host runs a constant learning rate.
    settings: StylizeSettings = option(StylizeSettings(), help="the render's settings", nested=True,
                                       omit="loop_only", require=("extractor",))
    max_pixels: int = option(MAX_PIXELS, help="refuse input images with more pixels than this")

    def __post_init__(self) -> None:
        if not str(self.output).endswith(".pt"):
            raise InputError(f"-o {self.output}: a targets file is a TorchScript module; name it *.pt")


@dataclass(frozen=True, kw_only=True)
class WatchSettings:
    """``nst watch``: the live page of a render started elsewhere, from its --progress FILE."""

    file: str = option(help="the --progress FILE of a render (followed as it grows; it may not exist yet)",
                       positional=True, metavar="FILE")
    serve: str = option("127.0.0.1:0", help="serve the page at [HOST:]PORT: on 127.0.0.1 unless a HOST is given, "
                        "PORT 0 picks a free port; the URL, with its token, is printed", metavar="[HOST:]PORT")

    def __post_init__(self) -> None:
        from nst.engine.live_server import parse_address

        parse_address(self.serve)


@dataclass(frozen=True)
class DemoSettings:
    """``nst demo``: a render of images the project draws itself, with no network."""

    out: str = option("nst-demo", help="directory for the demo's images", metavar="DIR")
    size: int = option(256, help="long edge of the output in px")
    steps: int = option(100, help="optimisation steps")
    weights: str = option("auto", help="auto: ImageNet weights if already cached, else seeded random weights; "
                          "or any --weights spec", metavar="SPEC")
    device: str = option("auto", help="where to run", choices=DEVICES)
    seed: int = option(0, help="seed for the drawn style image and random weights")
