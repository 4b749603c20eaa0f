"""Find and check VGG weights.

A weights *spec* is one of:

- ``imagenet`` (default): torchvision's ImageNet checkpoint (VGG19 ``IMAGENET1K_V1``),
  taken from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or downloaded there.
  When it is neither cached nor downloadable we stop with one line that says how to get
  it; we never fall back to other weights silently.
- a path to a ``.pth``/``.pt`` state dict (the full torchvision model, or ``features``
  alone) or a ``.safetensors`` file, loaded with ``weights_only=True``.
- ``random`` or ``random:SEED``: seeded random weights for tests and offline work. They
  are not a trained network, and every output made with them says so.

Every tensor is checked by name and shape before use; the first one that is missing or
wrong is named in the error.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsError
from .fsutil import atomic_path, sha256_file
from .layers import NETWORKS, layer_by_name, vgg_layers

log = logging.getLogger("nst")

# torchvision's published checkpoints; the 8 hex digits in each name are the start of
# the file's SHA-256, which torch.hub checks after a download and so do we.
IMAGENET_URLS = {
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
DOWNLOAD_TIMEOUT_S = 30.0
RANDOM_NOTE = "seeded random weights: NOT a trained network; outputs are only for tests and offline demos"


@dataclass(frozen=True)
class Weights:
    """Checked convolution weights for one network's feature stack."""

    network: str
    spec: str  # as the user wrote it
    kind: str  # "imagenet" | "file" | "random"
    source: str  # the file read, or "random:SEED"
    file_sha256: str | None  # SHA-256 of the file read (None for random weights)
    # torchvision ``features`` names ("0.weight", "0.bias", ...), float32 on the CPU
    state: Mapping[str, torch.Tensor] = field(repr=False)

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def describe(self) -> str:
        if self.is_random:
            return f"{self.network} weights {self.source} ({RANDOM_NOTE})"
        if self.kind == "imagenet":
            return f"{self.network} ImageNet weights from {self.source}"
        return f"{self.network} weights from {self.source}"

    def info(self) -> dict:
        """What a manifest records about these weights."""
        out = {
            "spec": self.spec,
            "kind": self.kind,
            "source": self.source,
            "file_sha256": self.file_sha256,
            "random": self.is_random,
        }
        if self.is_random:
            out["note"] = RANDOM_NOTE
        return out


def resolve_weights(spec: str = "imagenet", network: str = "vgg19", upto: str | None = None) -> Weights:
    """Turn a weights spec into checked tensors.

    ``upto`` names the deepest layer that will be used (a tap name); tensors up to it must
    be present. Without it the whole feature stack must be.
    """
    if network not in NETWORKS:
        raise WeightsError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    spec = str(spec).strip()
    if not spec:
        raise WeightsError("empty weights spec; use imagenet, random[:SEED] or a file path")
    if spec == "random" or spec.startswith("random:"):
        seed_text = spec.partition(":")[2] or "0"
        try:
            seed = int(seed_text)
            if not 0 <= seed < 2**63:
                raise ValueError
        except ValueError:
            raise WeightsError(f"bad weights spec {spec!r}: the seed after 'random:' must be an integer from 0 to "
                               "2**63-1") from None
        state = random_state(network, seed)
        return Weights(network, spec, "random", f"random:{seed}", None, state)
    if spec == "imagenet":
        path = imagenet_checkpoint(network)
        raw = _read_file(path)
        state = _features_state(raw, path, network, upto)
        return Weights(network, spec, "imagenet", str(path), sha256_file(path), state)
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights file not found: {spec} (use imagenet, random[:SEED], or a path to a "
            ".pth/.pt/.safetensors file)"
        )
    if path.is_dir():
        raise WeightsError(f"weights path is a directory, not a file: {spec}")
    raw = _read_file(path)
    state = _features_state(raw, path, network, upto)
    return Weights(network, spec, "file", str(path), sha256_file(path), state)


def random_state(network: str, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random conv weights for the whole feature stack.

    He-normal (fan-out) weights like torchvision's initialiser, so activations keep their
    scale through the stack, plus small random biases so that bias handling is exercised
    by the parity tests (torchvision initialises them to zero). Uses a private generator:
    the global RNG is left alone, and the weights depend only on the seed.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in vgg_layers(network):
        if layer.kind != "conv":
            continue
        std = math.sqrt(2.0 / (layer.out_channels * 9))
        w = torch.randn(layer.out_channels, layer.in_channels, 3, 3, generator=gen) * std
        b = torch.randn(layer.out_channels, generator=gen) * 0.01
        state[f"{layer.index}.weight"] = w
        state[f"{layer.index}.bias"] = b
    return state


def imagenet_checkpoint(network: str = "vgg19") -> Path:
    """Path of torchvision's ImageNet checkpoint in the hub cache; download it if absent."""
    url = IMAGENET_URLS[network]
    # torch.hub.get_dir() honours TORCH_HOME (and XDG_CACHE_HOME) at call time.
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if path.is_file():
        _check_hash_prefix(path, warn_only=True)
        return path

    def fail(reason: str) -> WeightsError:
        return WeightsError(
            f"{network.upper()} ImageNet weights are not in the torch hub cache ({path}) and could "
            f"not be downloaded ({reason}); download {url} to that path (TORCH_HOME moves the "
            "cache), or pass --weights PATH (.pth/.pt/.safetensors), or --weights random[:SEED] "
            "for offline tests"
        )

    if os.environ.get("NST_OFFLINE", "").strip() not in ("", "0"):
        raise fail("NST_OFFLINE is set")
    try:
        _download(url, path)
    except WeightsError as e:
        raise fail(str(e)) from None
    except (OSError, urllib.error.URLError, TimeoutError) as e:
        raise fail(_one_line(e)) from None
    return path


def _download(url: str, path: Path) -> None:
    from tqdm import tqdm

    log.info("downloading %s to %s", url, path)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with atomic_path(path) as tmp, open(tmp, "wb") as f, tqdm(
            total=total, unit="B", unit_scale=True, desc=path.name, leave=False
        ) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            f.close()
            _check_hash_prefix(tmp, expected_name=path.name)


def _check_hash_prefix(path: Path, warn_only: bool = False, expected_name: str | None = None) -> None:
    name = expected_name or path.name
    m = re.search(r"-([0-9a-f]{8,})\.", name)
    if not m:
        return
    digest = sha256_file(path)
    if not digest.startswith(m.group(1)):
        msg = f"{name}: SHA-256 {digest[:12]}... does not match the published prefix {m.group(1)}"
        if warn_only:
            log.warning("%s; using the cached file anyway", msg)
        else:
            raise WeightsError(msg + " (corrupt download)")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_file(path: Path) -> object:
    """Read a checkpoint without executing pickled code."""
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read {path}: not a valid safetensors file ({_one_line(e)})") from None
    try:
        with warnings.catch_warnings():
            # A non-torch pickle makes torch.load warn about the protocol before it fails.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise WeightsError(
                f"{path} holds pickled Python objects, not only tensors (a whole nn.Module?); "
                "it is not loaded for safety: load it in trusted code and save model.state_dict()"
            ) from None
        raise WeightsError(f"cannot read {path}: corrupt checkpoint ({_one_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, TypeError) as e:
        raise WeightsError(
            f"cannot read {path}: not a PyTorch checkpoint, or truncated/corrupt ({_one_line(e)})"
        ) from None


def _features_state(raw: object, path: Path, network: str, upto: str | None) -> dict[str, torch.Tensor]:
    """Map a full-model or features-only state dict onto ``features`` indices, checked."""
    if not isinstance(raw, Mapping):
        raise WeightsError(
            f"{path} holds a {type(raw).__name__}, not a state dict (a mapping of tensor names to tensors)"
        )
    # Common wrappers: {"state_dict": {...}} and {"model": {...}}.
    if len(raw) == 1 and next(iter(raw)) in ("state_dict", "model") and isinstance(next(iter(raw.values())), Mapping):
        raw = next(iter(raw.values()))
    if not raw:
        raise WeightsError(f"{path} holds an empty state dict")

    state, prefix = _conv_tensors(raw, path, network)
    _check_tensors(state, raw, path, network, upto, prefix)
    return state


def _conv_tensors(raw: Mapping, path: Path, network: str) -> tuple[dict[str, torch.Tensor], str]:
    """The conv tensors under ``features`` names ("0.weight"...), float32, and the prefix
    the file used ("features." for a whole model, "" for features alone)."""
    layers = vgg_layers(network)
    full_model = any(str(k).removeprefix("module.").startswith("features.") for k in raw)
    prefix = "features." if full_model else ""
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        key = str(key)
        name = key.removeprefix("module.")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; not a state dict")
        if name.startswith("classifier."):
            continue  # the classifier head is not used
        local = name.removeprefix("features.")
        m = re.fullmatch(r"(\d+)\.(weight|bias)", local)
        if not m:
            extra = " (a batch-norm VGG is not supported)" if "running_" in local else ""
            raise WeightsError(
                f"{path}: unexpected tensor {key!r}; expected torchvision {network} names like "
                f"{prefix}0.weight{extra}"
            )
        idx = int(m.group(1))
        if idx >= len(layers) or layers[idx].kind != "conv":
            what = f"{layers[idx].name}, which has no parameters" if idx < len(layers) else "past the end"
            hint = _other_network_hint(raw, network)
            raise WeightsError(f"{path}: unexpected tensor {key!r}: layer {idx} of {network}.features is {what}{hint}")
        if not value.is_floating_point():
            raise WeightsError(f"{path}: tensor {key!r} has dtype {value.dtype}, expected a floating-point type")
        state[local] = value.detach().to(torch.float32)
    return state, prefix


def _check_tensors(state: dict, raw: Mapping, path: Path, network: str, upto: str | None, prefix: str) -> None:
    """Every conv tensor up to ``upto`` present, of its shape, finite; the ones after it,
    when present, of their shape."""
    layers = vgg_layers(network)
    table = layer_by_name(network)
    deepest = table[upto].index if upto else len(layers) - 1
    for layer in layers:
        if layer.kind != "conv":
            continue
        required = layer.index <= deepest
        for part, shape in (("weight", (layer.out_channels, layer.in_channels, 3, 3)), ("bias", (layer.out_channels,))):
            local = f"{layer.index}.{part}"
            shown = f"{prefix}{local}"
            t = state.get(local)
            if t is None:
                if required:
                    hint = _other_network_hint(raw, network)
                    raise WeightsError(
                        f"{path}: missing tensor {shown!r} ({layer.name} {part}, shape {tuple(shape)}){hint}"
                    )
                continue
            if tuple(t.shape) != shape:
                hint = _other_network_hint(raw, network)
                raise WeightsError(
                    f"{path}: tensor {shown!r} ({layer.name} {part}) has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)}{hint}"
                )
            if required and not torch.isfinite(t).all():
                raise WeightsError(f"{path}: tensor {shown!r} ({layer.name} {part}) contains NaN or Inf")


def _other_network_hint(raw: Mapping, network: str) -> str:
    """' (this looks like a vgg16 checkpoint: pass --network vgg16)' when that fits."""
    idx = {
        int(m.group(1))
        for k in raw
        if (m := re.fullmatch(r"(?:module\.)?(?:features\.)?(\d+)\.weight", str(k)))
    }
    for other in NETWORKS:
        if other == network:
            continue
        convs = {l.index for l in vgg_layers(other) if l.kind == "conv"}
        if idx and idx == convs:
            return f" (this looks like a {other} checkpoint: pass --network {other})"
    return ""
