"""Get a differentiable extractor from an export directory or from weights alone.

Both paths give a module with the same interface as :class:`engine.features.VGGFeatures`
(``taps``, ``min_side``, ``forward(x) -> tuple``), so the engine runs on either.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .device import same_device
from .errors import ManifestError
from .features import VGGFeatures, build_extractor
from .fsutil import sha256_file
from .layers import DEFAULT_TAPS, parse_taps
from .manifest import EMBEDDED_NAME, check_embedded, read_manifest


@contextlib.contextmanager
def quiet_jit():
    """Silence torch 2.14's deprecation warnings for torch.jit.save/load/trace/script:
    TorchScript is still the one format a C++ host can differentiate through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


class ScriptedExtractor(nn.Module):
    """An exported TorchScript extractor, checked against its manifest.

    Returns only the taps asked for, in depth order, so a file exported with more taps
    than a caller needs still fits.
    """

    can_checkpoint = False  # a traced graph cannot recompute its blocks

    def __init__(self, scripted: torch.jit.ScriptModule, manifest: dict, taps: tuple[str, ...]):
        super().__init__()
        self.scripted = scripted
        self.manifest = manifest
        self.network = manifest["network"]
        self.taps = taps
        self.pool = manifest["pool"]
        self.min_side = int(manifest["input"]["min_side"])
        self.channels_last = manifest.get("memory_format") == "channels_last"
        all_taps = list(manifest["taps"])
        self._select = tuple(all_taps.index(t) for t in taps)
        self._n_outputs = len(all_taps)
        self.weights_info = manifest["weights"]
        self.cut_after = manifest.get("cut_after", all_taps[-1])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    def check_input(self, x: torch.Tensor) -> None:
        VGGFeatures.check_input(self, x)  # same rules, same messages

    def placed(self, device: torch.device | str, channels_last: bool, checkpoint: bool = False,
               owned: bool = False, weights_dtype: torch.dtype | None = None) -> "ScriptedExtractor":
        """This extractor on ``device``, with channels-last conv weights when asked: ``self``
        when nothing would change, else a copy (or ``self`` converted, when ``owned``). The
        copy goes through TorchScript's own serialisation: ScriptModules do not deep-copy
        reliably. (``checkpoint`` is never asked of it: its ``can_checkpoint`` is False, and the
        plan, engine/plan.py, checkpoints only an extractor that can. ``weights_dtype`` is left
        to autocast: the traced graph's casts are its own.)"""
        device = torch.device(device)
        weights = [p for p in self.scripted.parameters() if p.dim() == 4]
        here = weights[0].device if weights else device
        same_format = all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in weights)
        if same_device(here, device) and same_format:
            return self
        scripted = self.scripted
        if not owned:
            buf = io.BytesIO()
            with quiet_jit():
                torch.jit.save(self.scripted, buf)
                buf.seek(0)
                scripted = torch.jit.load(buf, map_location=device)
            scripted.eval()
        scripted.to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for p in scripted.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=fmt)
        return ScriptedExtractor(scripted, self.manifest, self.taps) if not owned else self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (N, 3, H, W), RGB in [0, 1]
        if not torch.compiler.is_compiling():
            self.check_input(x)
        # The plain interpreter, not the profiling executor: no fusion passes compiling
        # kernels part-way through a run (or inside a CUDA graph capture), and the same
        # aten kernels as the eager module, so trajectories match it.
        with torch.jit.optimized_execution(False):
            outs = self.scripted(x)
        return tuple(outs[i] for i in self._select)


def load_export(
    directory: str | Path,
    taps=None,
    pool: str | None = None,
    network: str | None = None,
    verify_hash: bool = True,
) -> ScriptedExtractor:
    """Load the TorchScript extractor from an export directory.

    ``taps``, ``pool`` and ``network``, when given, must agree with the manifest; the
    file's SHA-256 must equal the one recorded at export time; the module must return as
    many outputs, with as many channels, as the manifest says.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if network is not None and manifest["network"] != network:
        raise ManifestError(f"{directory} holds {manifest['network']}, but {network} was asked for")
    if pool is not None and manifest["pool"] != pool:
        raise ManifestError(f"{directory} was exported with {manifest['pool']} pooling, but the settings ask for "
                            f"{pool} (--pool, or a --recipe's); export with --pool {pool}, or pass --pool "
                            f"{manifest['pool']}")
    wanted = tuple(manifest["taps"]) if taps is None else parse_taps(taps, manifest["network"])
    missing = [t for t in wanted if t not in manifest["taps"]]
    if missing:
        raise ManifestError(
            f"{directory} does not export tap {missing[0]} (it has {', '.join(manifest['taps'])}); "
            f"re-export with --taps {','.join(wanted)}"
        )
    entry = manifest["artefacts"].get("torchscript")
    if not entry or not entry.get("file"):
        raise ManifestError(f"{directory}: the manifest lists no TorchScript artefact")
    path = directory / entry["file"]
    if not path.is_file():
        raise ManifestError(f"{directory}: TorchScript file {entry['file']} is missing")
    if verify_hash and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise ManifestError(
            f"{path}: SHA-256 does not match the manifest (the file was changed after export); re-export it"
        )
    extra = {EMBEDDED_NAME: ""}
    try:
        with quiet_jit():
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        raise ManifestError(f"cannot load TorchScript file {path}: {str(e).strip().splitlines()[0]}") from None
    check_embedded(extra[EMBEDDED_NAME], manifest, path)
    scripted.eval()
    module = ScriptedExtractor(scripted, manifest, wanted)
    _check_outputs(module, manifest, path)
    return module


def _check_outputs(module: ScriptedExtractor, manifest: dict, path: Path) -> None:
    """Run the smallest valid input once and compare the outputs with the manifest."""
    side = module.min_side
    dtype = module.dtype
    x = torch.rand(1, 3, side, side).to(dtype)
    try:
        with torch.no_grad():
            outs = module.scripted(x)
    except RuntimeError as e:
        raise ManifestError(f"{path} does not run on a {side}x{side} input: {str(e).strip().splitlines()[0]}") from None
    if not isinstance(outs, (tuple, list)) or len(outs) != module._n_outputs:
        n = len(outs) if isinstance(outs, (tuple, list)) else 1
        raise ManifestError(f"{path} returns {n} outputs but the manifest lists {module._n_outputs} taps")
    for name, out, ch in zip(manifest["taps"], outs, manifest["tap_channels"]):
        if out.dim() != 4 or out.shape[1] != ch:
            raise ManifestError(f"{path}: output {name} has shape {tuple(out.shape)}, expected {ch} channels")


def load_extractor(
    extractor: str | Path | None = None,
    weights: str = "imagenet",
    taps=DEFAULT_TAPS,
    pool: str = "max",
    network: str = "vgg19",
) -> nn.Module:
    """The engine's one way to get an extractor.

    With ``extractor`` (an export directory) the TorchScript file is used and checked
    against ``taps``/``pool``/``network``; otherwise the eager module is built from
    ``weights``.
    """
    if extractor is not None:
        return load_export(extractor, taps=taps, pool=pool, network=network)
    return build_extractor(weights, taps=taps, pool=pool, network=network)


__all__ = ["ScriptedExtractor", "load_export", "load_extractor", "quiet_jit"]


def extractor_for(settings):
    """The extractor a render's settings describe (``--extractor`` or ``--weights``, its
    taps, pooling and network); with ``--runtime onnxruntime``, the export's step graphs
    (engine/onnx_runtime.py), which take the extractor's place in a render."""
    if settings.runtime == "onnxruntime":
        from .onnx_runtime import load_step_graphs

        return load_step_graphs(settings.extractor, threads=torch.get_num_threads(), pool=settings.pool,
                                network=settings.network)
    return load_extractor(settings.extractor, settings.weights, settings.taps(), settings.pool, settings.network)
