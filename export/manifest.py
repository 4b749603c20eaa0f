"""Build the manifest that tells any host how to call the exported network."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

from nst.engine.features import VGGFeatures
from nst.engine.layers import IMAGENET_MEAN, IMAGENET_STD
from nst.engine.manifest import FORMAT, FORMAT_VERSION


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("nst", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist != "onnxruntime-gpu":
                out[dist] = None
    return out


def build(module: VGGFeatures, *, weights_sha256: str, opset: int, trace_size, check: dict, artefacts: dict) -> dict:
    d = module.describe()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "network": d["network"],
        "taps": d["taps"],
        "tap_channels": d["tap_channels"],
        "tap_strides": d["tap_strides"],
        "cut_after": d["cut_after"],
        "pool": d["pool"],
        "dtype": d["dtype"],
        "memory_format": d["memory_format"],
        "input": {
            "layout": "NCHW",
            "channels": "RGB",
            "value_range": [0.0, 1.0],
            "dtype": "float32",
            "dtype_note": f"any floating dtype is accepted and cast to {d['dtype']} inside the module",
            "height_width": "dynamic",
            "min_side": d["min_side"],
            "batch": "dynamic (any N >= 1)",
        },
        "outputs": [
            {"name": t, "channels": c, "stride": s, "dtype": d["dtype"],
             "shape": f"(N, {c}, floor(H/{s}), floor(W/{s}))"}
            for t, c, s in zip(d["taps"], d["tap_channels"], d["tap_strides"])
        ],
        "normalization": {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "applied": "inside the module: (x - mean) / std per RGB channel; pass raw [0, 1] RGB",
        },
        "weights": {
            **module.weights_info,
            "tensors_sha256": weights_sha256,
            "tensors_sha256_note": "over the float32 conv tensors the extractor uses (name, shape, bytes), "
            "before any precision cast; equal for equal weights whatever file they came from",
        },
        "versions": library_versions(),
        "onnx_opset": opset,
        "trace": {"size": list(trace_size), "device": "cpu"},
        "self_check": check,
        "artefacts": artefacts,
    }
