"""ONNX: one graph with dynamic height and width and one named output per tap.

Written with the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) and
checked with ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch

from nst.engine.errors import ExportError
from nst.engine.manifest import EMBEDDED_NAME

from .compare import forward_errors
from .shapes import dynamic_shapes, guard_free_pooling_shapes

INPUT_NAME = "image"

# ONNX Runtime has no bfloat16 Conv kernel (on the CPU provider, checked with ORT 1.32),
# and ONNX's Conv only admits bfloat16 from opset 22; a file we cannot check is not written.
UNSUPPORTED = {"bf16": "ONNX Runtime has no bfloat16 Conv kernel, so a bf16 ONNX file could not be checked; "
                       "export with --precision fp16 or fp32 for ONNX"}


def write(module: torch.nn.Module, example: torch.Tensor, path: Path, taps: tuple[str, ...], min_side: int, opset: int,
          describe: dict) -> None:
    """Export with dynamic batch, height and width; the description travels inside the file
    as metadata (``onnx.load(path).metadata_props``, key "nst.json")."""
    # The exporter narrates its passes on stdout; keep that out of our summary.
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), guard_free_pooling_shapes():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(taps),
            dynamic_shapes=dynamic_shapes(min_side),
            external_data=False,
            verbose=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        program.save(str(path), external_data=False)
    _name_dims_and_describe(path, describe)


def _name_dims_and_describe(path: Path, describe: dict) -> None:
    """Rename the exporter's symbols (s77, s53...) to batch/height/width everywhere, and
    embed the description."""
    import onnx

    model = onnx.load(str(path))
    model.metadata_props.append(onnx.StringStringEntryProto(key=EMBEDDED_NAME, value=json.dumps(describe)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    rename_dims(model, {dims[i].dim_param: new for i, new in ((0, "batch"), (2, "height"), (3, "width"))
                        if dims[i].dim_param})
    onnx.save(model, str(path))


def rename_dims(model, names: dict[str, str]) -> None:
    """Rename symbolic dimensions everywhere in ``model`` (inputs, outputs, value infos),
    also inside expressions such as ``floor(s77/2)``: {exporter's symbol: new name}."""
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)


def check(path: Path, eager: torch.nn.Module, xs: list[torch.Tensor]) -> dict:
    """Forward error of the ONNX file in ONNX Runtime against ``eager`` at every input of ``xs``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed, so the ONNX file cannot be checked: "
            "pip install 'nst[cpu]' (or 'nst[gpu]'), or leave onnx out of --formats"
        ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    fwd = forward_errors(lambda x: session.run(None, {INPUT_NAME: x.detach().cpu().numpy()}), eager, xs)
    return {"forward": fwd, "output_names": names}
