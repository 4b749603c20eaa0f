"""nst.engine: weights -> extractor -> targets -> step -> loop -> image.

Public entry points:
- :func:`build_extractor` / :class:`VGGFeatures`: the frozen VGG feature extractor;
- :func:`load_extractor` / :func:`load_export`: the same from an export directory;
- :func:`resolve_weights`: weights specs (imagenet, a file, random[:SEED]);
- :func:`stylize`: the main job, content + style(s) -> stylised image and per-step stats;
- :func:`save_image`: write a result's image (atomically; the extension picks the format).
"""

from .errors import ExportError, InputError, ManifestError, NonFiniteLossError, NSTError, WeightsError
from .features import VGGFeatures, build_extractor
from .layers import DEFAULT_TAPS, IMAGENET_MEAN, IMAGENET_STD, parse_taps, vgg_layers
from .loader import ScriptedExtractor, load_export, load_extractor
from .weights import Weights, resolve_weights
from .settings import StylizeSettings
from .stats import Result, RunStats
from .loop import StepInfo
from .imageio import save_image
from .api import stylize
from . import recipes

__all__ = [
    "DEFAULT_TAPS", "IMAGENET_MEAN", "IMAGENET_STD", "VGGFeatures", "ScriptedExtractor", "Weights",
    "build_extractor", "load_export", "load_extractor", "parse_taps", "resolve_weights", "vgg_layers",
    "StylizeSettings", "Result", "RunStats", "StepInfo", "NonFiniteLossError", "stylize", "save_image", "recipes",
    "NSTError", "WeightsError", "InputError", "ExportError", "ManifestError",
]
