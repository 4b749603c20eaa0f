"""Gatys-style neural style transfer as an inference-optimised engine.

Public entry points:
- :func:`build_extractor` / :class:`VGGFeatures`: the frozen VGG feature extractor;
- :func:`load_extractor` / :func:`load_export`: the same from an export directory;
- :func:`resolve_weights`: weights specs (imagenet, a file, random[:SEED]).
"""

from .errors import ExportError, InputError, ManifestError, NSTError, WeightsError
from .features import IMAGENET_MEAN, IMAGENET_STD, VGGFeatures, build_extractor
from .layers import DEFAULT_TAPS, parse_taps, vgg_layers
from .loader import ScriptedExtractor, load_export, load_extractor
from .weights import Weights, resolve_weights

__all__ = [
    "DEFAULT_TAPS", "IMAGENET_MEAN", "IMAGENET_STD", "VGGFeatures", "ScriptedExtractor", "Weights",
    "build_extractor", "load_export", "load_extractor", "parse_taps", "resolve_weights", "vgg_layers",
    "NSTError", "WeightsError", "InputError", "ExportError", "ManifestError",
]
