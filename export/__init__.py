"""nst.export: a VGG extractor -> TorchScript, ONNX and ExportedProgram, with a manifest.

The names are loaded on first use (PEP 562): ``nst.export.settings`` alone imports no torch.
"""

from __future__ import annotations

from nst.engine.lazy import lazy_names

_WHERE = {"ExportResult": "pipeline", "export_extractor": "pipeline", "summary": "pipeline",
          "ExportSettings": "settings", "FORMATS": "settings"}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
