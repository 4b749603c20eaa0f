"""The export step: a VGG extractor -> TorchScript, ONNX and ExportedProgram, with a manifest."""

from .pipeline import ExportResult, export_extractor, summary
from .settings import FORMATS, ExportSettings

__all__ = ["ExportSettings", "ExportResult", "export_extractor", "summary", "FORMATS"]
