"""Settings of the export step; the ``nst export`` options are generated from this class."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from nst.engine.errors import ExportError
from nst.engine.layers import DEFAULT_TAPS, NETWORKS, POOLS, parse_layer_weights
from nst.engine.norms import CONTENT_NORMS, GRAM_NORMS
from nst.engine.settings import StylizeSettings, option

FORMATS = ("torchscript", "onnx", "pt2", "step")
# The step graphs bake in the render's loss layers and norms; their defaults are the render's.
_RENDER = {f.name: f.default for f in dataclasses.fields(StylizeSettings)}
PRECISIONS = ("fp32", "fp16", "bf16")
MIN_OPSET = 18


def parse_size(text: str) -> tuple[int, int]:
    """'160x96' -> (96, 160): WIDTHxHEIGHT on the command line, (H, W) inside."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ExportError(f"bad size {text!r}: write WIDTHxHEIGHT, for example 160x96")
    return int(m.group(2)), int(m.group(1))


@dataclass(frozen=True)
class ExportSettings:
    """What ``nst export`` writes, and how it checks it. Checked and normalised when made."""

    out: Path = option(help="directory to write the artefacts and manifest.json into", metavar="DIR", parse=Path)
    weights: str = option("imagenet", help="imagenet, random[:SEED], or a .pth/.pt/.safetensors file", metavar="SPEC")
    network: str = option("vgg19", help="the VGG variant", choices=NETWORKS)
    pool: str = option("max", help="pooling: max (torchvision) or avg (Gatys et al.)", choices=POOLS)
    taps: tuple[str, ...] = option(
        DEFAULT_TAPS, help="layers to output, in any order (returned in depth order); spaces or commas", metavar="TAP"
    )
    precision: str = option("fp32", help="compute dtype of the exported network", choices=PRECISIONS)
    channels_last: bool = option(False, help="store weights channels-last and convert inputs inside the module")
    formats: tuple[str, ...] = option(FORMATS, help="artefacts to write; step = the whole Adam step as ONNX "
                                      "(objective.onnx, step.onnx, targets.onnx and their step_weights.bin)",
                                      metavar="FORMAT")
    content_layers: str = option(_RENDER["content_layers"], help="step graphs: content layers baked in, LAYER[:WEIGHT],"
                                 "...; the weights are only the defaults recorded for hosts (they are inputs)",
                                 metavar="LAYERS")
    style_layers: str = option(_RENDER["style_layers"], help="step graphs: style layers baked in, LAYER[:WEIGHT],...",
                               metavar="LAYERS")
    gram_norm: str = option(_RENDER["gram_norm"], help="step graphs: the style loss normalisation baked in "
                            "(as nst stylize --gram-norm)", choices=GRAM_NORMS)
    content_norm: str = option(_RENDER["content_norm"], help="step graphs: the content loss normalisation baked in "
                               "(as nst stylize --content-norm)", choices=CONTENT_NORMS)
    opset: int = option(MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    trace_size: str = option("224x224", help="WIDTHxHEIGHT of the example input used to trace", metavar="WxH")
    check_size: str = option(
        "160x96", help="WIDTHxHEIGHT of the fresh random input of the self-check (must differ from --trace-size)",
        metavar="WxH",
    )

    def __post_init__(self) -> None:
        formats = [f for item in self.formats for f in str(item).split(",") if f]
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ExportError(f"unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
        if not formats:
            raise ExportError("no format to write")
        # Normalised once, here (a frozen value otherwise): unique formats, a Path.
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        object.__setattr__(self, "out", Path(self.out))
        if self.gram_norm not in GRAM_NORMS or self.content_norm not in CONTENT_NORMS:
            raise ExportError(f"unknown normalisation {self.gram_norm!r}/{self.content_norm!r}: --gram-norm is one of "
                              f"{', '.join(GRAM_NORMS)}; --content-norm one of {', '.join(CONTENT_NORMS)}")
        parse_layer_weights(self.content_layers, self.network)  # InputError, one line, for a bad layer
        parse_layer_weights(self.style_layers, self.network)
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}; choose fp32, fp16 or bf16")
        if self.opset < MIN_OPSET:
            raise ExportError(f"ONNX opset {self.opset} is too old: use {MIN_OPSET} or newer")
        if parse_size(self.trace_size) == parse_size(self.check_size):
            raise ExportError(
                "--check-size must differ from --trace-size: the self-check proves the artefacts "
                "work at sizes other than the traced one"
            )
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {self.out} exists and is not a directory")
