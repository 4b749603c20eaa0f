"""nst.engine: weights -> extractor -> targets -> step -> loop -> image.

Public entry points:
- :func:`build_extractor` / :class:`VGGFeatures`: the frozen VGG feature extractor;
- :func:`load_extractor` / :func:`load_export`: the same from an export directory;
- :func:`resolve_weights`: weights specs (imagenet, a file, random[:SEED]);
- :func:`stylize`: the main job, content + style(s) -> stylised image and per-step stats;
- :func:`save_image`: write a result's image (atomically; the extension picks the format).

The names are loaded on first use (PEP 562), so ``import nst.engine.errors`` or
``nst --version`` does not pay for importing torch.
"""

from __future__ import annotations

from .lazy import lazy_names

_WHERE = {
    "ExportError": "errors", "InputError": "errors", "ManifestError": "errors", "NonFiniteLossError": "errors",
    "NSTError": "errors", "RankLostError": "errors", "WeightsError": "errors",
    "VGGFeatures": "features", "build_extractor": "features",
    "DEFAULT_TAPS": "layers", "IMAGENET_MEAN": "layers", "IMAGENET_STD": "layers", "parse_taps": "layers",
    "vgg_layers": "layers",
    "ScriptedExtractor": "loader", "load_export": "loader", "load_extractor": "loader",
    "Weights": "weights", "resolve_weights": "weights",
    "StylizeSettings": "settings",
    "Result": "stats", "RunStats": "stats",
    "StepInfo": "loop",
    "save_image": "imageio",
    "stylize": "api",
}

__all__ = [*_WHERE, "recipes"]
__getattr__, __dir__ = lazy_names(__name__, _WHERE, also=("recipes",))
