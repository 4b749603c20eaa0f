"""The targets of a render, written for a host without Python (``nst targets``).

The file is a TorchScript module that holds tensors as attributes - ``content_<i>`` (one
per content layer), ``gram_<i>`` (one per style layer, blended), ``init`` (the start image,
(1, 3, H, W) in [0, 1]) - and describes them in ``extra_files['nst_targets.json']``:
layer names and weights in order (normalisation factors folded in), the loss weights,
the learning rate, the size, and the
SHA-256 of the extractor file they were computed with (so a host can refuse a mismatch).
libtorch reads it with ``torch::jit::load(path, device, extra_files)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nst.engine.fsutil import atomic_path
from nst.engine.loader import quiet_jit
from nst.engine.manifest import read_manifest
from nst.engine.session import Prepared

FORMAT = "nst-targets"
FORMAT_VERSION = 1
EXTRA_NAME = "nst_targets.json"


class _Holder(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().float().contiguous().cpu())

    def forward(self) -> int:  # TorchScript needs a method; hosts only read the buffers
        return 0


def describe(p: Prepared, export_dir: str | Path) -> dict:
    manifest = read_manifest(export_dir)
    s = p.settings
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "extractor_sha256": manifest["artefacts"]["torchscript"]["sha256"],
        "taps": manifest["taps"],
        # Each weight is the layer weight times its --content-norm / --gram-norm factor at
        # this size, so a host that computes the default (mean) losses gets every norm.
        "content_layers": [[n, w] for (n, _), w in zip(p.targets.content_layers, p.targets.content_factors)],
        "style_layers": [[n, w] for (n, _), w in zip(p.targets.style_layers, p.targets.style_factors)],
        "gram_norm": s.gram_norm,
        "content_norm": s.content_norm,
        "style_blend": list(p.targets.style_blend),
        "content_weight": s.content_weight,
        "style_weight": s.style_weight,
        "tv_weight": s.tv_weight,
        "lr": s.learning_rate,
        "optimizer": "adam",
        "size": list(p.out_hw),
        "weights": manifest["weights"],
        "losses": "gram = F F^T/(C*M); content = mean((F-P)^2); style = mean((gram-A)^2); "
                  "tv = mean(dh^2) + mean(dw^2); total = wc*sum(layer weight*content) + ws*sum(layer weight*style) "
                  "+ wtv*tv; the layer weights include the normalisation factors",
    }


def write_targets(p: Prepared, export_dir: str | Path, path: str | Path) -> dict:
    """Save the targets of a prepared render (made with ``extractor=export_dir``)."""
    tensors = {f"content_{i}": t for i, t in enumerate(p.targets.content)}
    tensors.update({f"gram_{i}": g for i, g in enumerate(p.targets.grams)})
    tensors["init"] = p.x.detach().contiguous()
    info = describe(p, export_dir)
    with quiet_jit():
        scripted = torch.jit.script(_Holder(tensors))
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={EXTRA_NAME: json.dumps(info)})
    return info
