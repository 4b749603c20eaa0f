"""nst: Gatys-style neural style transfer as an inference-optimised engine.

One import namespace, dependencies one way (engine <- export <- bench <- cli):

- ``nst.engine``: weights -> extractor -> targets -> step -> loop -> image
  (``nst.engine.stylize`` is the Python API);
- ``nst.export``: the extractor as TorchScript, ONNX and ExportedProgram, with a manifest;
- ``nst.bench``: the benchmarks (``nst bench``, ``bench-quality``, ``bench-recipes``);
- ``nst.cli``: the ``nst`` command line.

This module imports nothing heavy, so ``nst --version`` is quick.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("nst")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
