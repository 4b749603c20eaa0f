"""Gatys-style neural style transfer as an inference-optimised engine.

Public entry points:
- :func:`build_extractor` / :class:`VGGFeatures`: the frozen VGG feature extractor;
- :func:`load_extractor` / :func:`load_export`: the same from an export directory;
- :func:`resolve_weights`: weights specs (imagenet, a file, random[:SEED]);
- :func:`stylize`: the main job, content + style(s) -> stylised image and per-step stats.
"""

from .errors import ExportError, InputError, ManifestError, NSTError, WeightsError
from .features import IMAGENET_MEAN, IMAGENET_STD, VGGFeatures, build_extractor
from .layers import DEFAULT_TAPS, parse_taps, vgg_layers
from .loader import ScriptedExtractor, load_export, load_extractor
from .weights import Weights, resolve_weights
from .settings import StylizeSettings
from .optimize import NonFiniteLossError, Result, RunStats
from .api import stylize
from . import recipes

__all__ = [
    "DEFAULT_TAPS", "IMAGENET_MEAN", "IMAGENET_STD", "VGGFeatures", "ScriptedExtractor", "Weights",
    "build_extractor", "load_export", "load_extractor", "parse_taps", "resolve_weights", "vgg_layers",
    "StylizeSettings", "Result", "RunStats", "NonFiniteLossError", "stylize", "recipes",
    "NSTError", "WeightsError", "InputError", "ExportError", "ManifestError",
]
