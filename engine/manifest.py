"""The export manifest: names, format version, and reading it back with checks.

``export/`` writes ``manifest.json`` last, after every artefact passed its self-check, so
a directory with a manifest is a finished export. Hosts (the engine, the C++ example)
read it to learn how to call the network.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT = "nst-extractor"
FORMAT_VERSION = 1
TORCHSCRIPT_NAME = "extractor.ts"
ONNX_NAME = "extractor.onnx"
PROGRAM_NAME = "extractor.pt2"
# The step as ONNX (`--formats step`, export/to_step.py): three graphs, one shared weights file.
STEP_FILES = {"objective": "objective.onnx", "step": "step.onnx", "targets": "targets.onnx"}
STEP_WEIGHTS_NAME = "step_weights.bin"

# The description every artefact carries inside itself (TorchScript extra file, ONNX
# metadata, ExportedProgram extra file), so that an edited manifest is caught: whoever
# edits manifest.json can recompute a hash beside it, but not change what the files say.
EMBEDDED_NAME = "nst.json"
BOUND_FIELDS = ("network", "taps", "tap_channels", "tap_strides", "pool", "min_side", "dtype")

_REQUIRED = ("format", "format_version", "network", "taps", "pool", "input", "normalization", "artefacts", "weights")


def read_manifest(directory: str | Path) -> dict:
    """Read and minimally validate ``directory/manifest.json``."""
    directory = Path(directory)
    if not directory.exists():
        raise ManifestError(f"export directory not found: {directory}")
    if not directory.is_dir():
        raise ManifestError(f"not an export directory: {directory} is a file")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{directory} has no {MANIFEST_NAME}: not a finished export (run `nst export --out {directory}`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{path} lacks the field {missing[0]!r}")
    if data["format"] != FORMAT:
        raise ManifestError(f"{path} is not an nst extractor manifest (format {data['format']!r})")
    if data["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {data['format_version']}; this nst reads version {FORMAT_VERSION}"
        )
    return data


def _described(embedded: str, path: Path) -> dict:
    """The description an artefact carries (a JSON text; empty for files written before it was embedded)."""
    if not embedded:
        raise ManifestError(f"{path} carries no description of itself ({EMBEDDED_NAME}): re-export it")
    try:
        return json.loads(embedded)
    except json.JSONDecodeError:
        raise ManifestError(f"{path}: its embedded description is not JSON; re-export it") from None


def check_embedded(embedded: str, manifest: dict, path: Path) -> None:
    """Refuse a manifest that disagrees with the description embedded in the artefact ``path``."""
    inside = _described(embedded, path)
    for key in BOUND_FIELDS:
        mine = manifest["input"]["min_side"] if key == "min_side" else manifest.get(key)
        if key in inside and inside[key] != mine:
            raise ManifestError(
                f"{MANIFEST_NAME} does not match {path.name}: {key} is {mine!r} in the manifest but "
                f"{inside[key]!r} in the file (the manifest was edited); re-export"
            )


def check_step_embedded(embedded: str, manifest: dict, graph: str, path: Path) -> None:
    """Refuse a manifest whose entry for step graph ``graph`` (``artefacts.step.graphs``)
    disagrees with the description the file carries: its layers, norms, inputs and
    outputs, and the network and pooling of the manifest."""
    inside = _described(embedded, path)
    entry = manifest.get("artefacts", {}).get("step", {}).get("graphs", {}).get(graph, {})
    for key, value in inside.items():
        mine = manifest.get(key) if key in ("network", "pool") else entry.get(key)
        if mine != value:
            raise ManifestError(
                f"{MANIFEST_NAME} does not match {path.name}: {key} is {mine!r} in the manifest but "
                f"{value!r} in the file (the manifest was edited); re-export"
            )
