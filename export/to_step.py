"""The Gatys step as ONNX: ``objective.onnx``, ``step.onnx`` and ``targets.onnx`` (the
modules of export/step_graph.py), sharing one weights file.

The three graphs hold the same convolution weights. They are written as ONNX external
data into one file, ``step_weights.bin``, that every graph points into (same offsets):
the weights are on disk once instead of three times (about 50 MB for VGG19 cut after
relu5_1), and one SHA-256 in the manifest covers the network all three run. ONNX
Runtime reads external data relative to the graph's own directory, so the four files
travel together (the manifest lists them). The weight transposes and flips of the
adjoint are not stored: they are ops on the stored weights, which ONNX Runtime folds once
when it loads a graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from nst.engine.errors import ExportError
from nst.engine.features import VGGFeatures
from nst.engine.layers import layer_by_name, min_side
from nst.engine.manifest import EMBEDDED_NAME, STEP_FILES, STEP_WEIGHTS_NAME

from .shapes import guard_free_pooling_shapes
from .to_onnx import rename_dims
from .step_graph import ADAM_BETAS, ADAM_EPS, ObjectiveGraph, StepGraph, TargetsGraph

_ALIGN = 65536  # external tensors start at multiples of this: ONNX Runtime can map them


@dataclass(frozen=True)
class StepSpec:
    """What a step file bakes in besides the network: the loss layers (with the default
    layer weights a host may pass) and the two normalisations."""

    content_layers: tuple[tuple[str, float], ...]
    style_layers: tuple[tuple[str, float], ...]
    content_norm: str
    gram_norm: str

    @property
    def content_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.content_layers)

    @property
    def style_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.style_layers)


def not_applicable(spec: StepSpec, module: VGGFeatures, precision: str) -> str | None:
    """Why the step graphs cannot be written for this export (None: they can)."""
    if precision != "fp32":
        return f"the step graphs are float32 only (the parity reference); this export is {precision}"
    missing = [n for n in spec.content_names + spec.style_names if n not in module.taps]
    if missing:
        return (f"loss layer {missing[0]} is not among --taps ({', '.join(module.taps)}); add it to --taps or "
                "choose --content-layers/--style-layers among them")
    return None


def io_names(spec: StepSpec) -> dict[str, tuple[list[str], list[str]]]:
    """Input and output names of each graph, in call order."""
    targets = [f"content_{n}" for n in spec.content_names] + [f"gram_{n}" for n in spec.style_names]
    weights = ["content_layer_weights", "style_layer_weights", "loss_weights"]
    return {
        "objective": (["image", *targets, *weights], ["losses", "grad"]),
        "step": (["image", "exp_avg", "exp_avg_sq", "step", "lr", *targets, *weights],
                 ["next_image", "next_exp_avg", "next_exp_avg_sq", "next_step", "losses"]),
        "targets": (["image"], targets),
    }


def tensor_docs(spec: StepSpec, network: str) -> dict[str, dict]:
    """Shape, dtype and meaning of every input and output name."""
    table = layer_by_name(network)
    img = {"shape": "(1, 3, H, W)", "dtype": "float32"}
    docs = {"image": {**img, "about": "RGB in [0, 1]"}, "grad": {**img, "about": "d total / d image"},
            "exp_avg": {**img, "about": "Adam's first moment (zeros at the start)"},
            "exp_avg_sq": {**img, "about": "Adam's second moment (zeros at the start)"},
            "step": {"shape": "()", "dtype": "float32", "about": "Adam steps taken so far (0 at the start)"},
            "lr": {"shape": "()", "dtype": "float32", "about": "learning rate, [0, 1] pixel units"},
            "losses": {"shape": "(4,)", "dtype": "float32", "about": "[total, content, style, tv] of the image given"},
            "next_image": {**img, "about": "the updated image, clamped to [0, 1]"},
            "next_exp_avg": {**img, "about": "updated first moment"},
            "next_exp_avg_sq": {**img, "about": "updated second moment"},
            "next_step": {"shape": "()", "dtype": "float32", "about": "step + 1"},
            "content_layer_weights": {"shape": f"({len(spec.content_layers)},)", "dtype": "float32",
                                      "about": "layer weight per content layer, in content_layers order"},
            "style_layer_weights": {"shape": f"({len(spec.style_layers)},)", "dtype": "float32",
                                    "about": "layer weight per style layer, in style_layers order"},
            "loss_weights": {"shape": "(3,)", "dtype": "float32", "about": "[content, style, tv] loss weights"}}
    for n in spec.content_names:
        c, s = table[n].out_channels, table[n].stride
        docs[f"content_{n}"] = {"shape": f"(1, {c}, floor(H/{s}), floor(W/{s}))", "dtype": "float32",
                                "about": f"{n} features of the content image at the render size"}
    for n in spec.style_names:
        c = table[n].out_channels
        docs[f"gram_{n}"] = {"shape": f"(1, {c}, {c})", "dtype": "float32",
                             "about": f"{n} Gram F F^T / (C*h*w) of the style image(s), blended"}
    return docs


def describe(graph: str, spec: StepSpec, module: VGGFeatures) -> dict:
    """The description a step graph embeds (and the manifest repeats): what it bakes in."""
    inputs, outputs = io_names(spec)[graph]
    d = {"graph": graph, "network": module.network, "pool": module.pool,
         "min_side": min_side(spec.content_names + spec.style_names, module.network),
         "inputs": inputs, "outputs": outputs}
    d.update(content_layers=list(spec.content_names), style_layers=list(spec.style_names))
    if graph != "targets":
        d.update(content_norm=spec.content_norm, gram_norm=spec.gram_norm)
    if graph == "step":
        d["adam"] = {"betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": 0.0, "clamp": [0.0, 1.0],
                     "math": "torch.optim.Adam single-tensor step (foreach=False), then clamp"}
    return d


def modules(module: VGGFeatures, spec: StepSpec) -> dict[str, torch.nn.Module]:
    """The three torch modules, on float32 NCHW weights."""
    objective = ObjectiveGraph(module, spec.content_names, spec.style_names, spec.content_norm, spec.gram_norm)
    mods = {"objective": objective, "step": StepGraph(objective),
            "targets": TargetsGraph(module, spec.content_names, spec.style_names)}
    return {g: m.eval() for g, m in mods.items()}


def examples(module: VGGFeatures, spec: StepSpec, hw, seed: int = 0) -> dict[str, tuple]:
    """Example inputs of each graph at ``hw`` (the trace; the self-check's sizes too)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *hw, generator=gen)
    with torch.no_grad():
        contents, grams = TargetsGraph(module, spec.content_names, spec.style_names)(torch.rand(1, 3, *hw, generator=gen))
    weights = (torch.tensor([w for _, w in spec.content_layers]), torch.tensor([w for _, w in spec.style_layers]),
               torch.tensor([1.0, 1e3, 1.0]))
    moments = (torch.rand(1, 3, *hw, generator=gen) * 1e-3, torch.rand(1, 3, *hw, generator=gen) * 1e-6)
    return {"objective": (image, contents, grams, *weights),
            "step": (image, *moments, torch.tensor(3.0), torch.tensor(0.02), contents, grams, *weights),
            "targets": (image,)}


def _dynamic_shapes(graph: str, spec: StepSpec, side: int):
    h, w = Dim.DYNAMIC(min=side), Dim.DYNAMIC(min=side)
    image = {2: h, 3: w}
    targets = (tuple({2: Dim.DYNAMIC, 3: Dim.DYNAMIC} for _ in spec.content_names),
               tuple(None for _ in spec.style_names))
    if graph == "targets":
        return (image,)
    if graph == "objective":
        return (image, *targets, None, None, None)
    return (image, dict(image), dict(image), None, None, *targets, None, None, None)


def write(module: VGGFeatures, spec: StepSpec, staging: Path, trace_hw, opset: int) -> dict[str, str]:
    """Export the three graphs into ``staging`` with one shared weights file; returns each
    graph's description (as embedded)."""
    side = min_side(spec.content_names + spec.style_names, module.network)
    mods, args = modules(module, spec), examples(module, spec, trace_hw)
    names, descs, models = io_names(spec), {}, {}
    for graph in STEP_FILES:
        path = staging / f".{graph}.tmp.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), guard_free_pooling_shapes():
                program = torch.onnx.export(mods[graph], args[graph], dynamo=True, opset_version=opset,
                                            input_names=names[graph][0], output_names=names[graph][1],
                                            dynamic_shapes=_dynamic_shapes(graph, spec, side), external_data=True,
                                            verbose=False)
                program.save(str(path), external_data=True)
        except Exception as e:
            line = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"torch {torch.__version__} could not export {STEP_FILES[graph]} ({type(e).__name__}: "
                              f"{line}); leave the step graphs out (--formats without step)") from e
        models[graph] = _load_and_clean(path)
        descs[graph] = describe(graph, spec, module)
    _share_weights(models, staging)
    for graph, model in models.items():
        _name_dims(model, spec, module.network)
        _embed(model, descs[graph])
        _save(model, staging / STEP_FILES[graph])
    return descs


def _load_and_clean(path: Path):
    """Load an exported graph with its external data, and remove the exporter's files."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    return model


def _share_weights(models: dict, staging: Path) -> None:
    """Move every initializer of 1 KiB or more into STEP_WEIGHTS_NAME, once per distinct
    tensor (dtype, shape and bytes), and point each graph's copy at it."""
    import onnx

    placed: dict[str, tuple[int, int]] = {}
    with open(staging / STEP_WEIGHTS_NAME, "wb") as f:
        for model in models.values():
            for t in model.graph.initializer:
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                if len(raw) < 1024:
                    continue
                key = hashlib.sha256(f"{t.data_type}:{list(t.dims)};".encode() + raw).hexdigest()
                if key not in placed:
                    f.write(b"\0" * (-f.tell() % _ALIGN))
                    placed[key] = (f.tell(), len(raw))
                    f.write(raw)
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(field)
                del t.external_data[:]
                for k, v in (("location", STEP_WEIGHTS_NAME), ("offset", placed[key][0]), ("length", placed[key][1])):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, str(v)
                t.data_location = onnx.TensorProto.EXTERNAL


def _name_dims(model, spec: StepSpec, network: str) -> None:
    """Rename the exporter's size symbols (s77, s53...) after what they are: height and
    width of the image, floor(height/8)... of a content target."""
    table = layer_by_name(network)
    names: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "image":
            new = {2: "height", 3: "width"}
        elif value.name in ("content_" + n for n in spec.content_names):
            s = table[value.name[len("content_"):]].stride
            new = {2: f"floor(height/{s})", 3: f"floor(width/{s})"} if s > 1 else {2: "height", 3: "width"}
        else:
            continue
        for i, n in new.items():
            if dims[i].dim_param and dims[i].dim_param not in names:
                names[dims[i].dim_param] = n
    rename_dims(model, names)


def _embed(model, description: dict) -> None:
    import onnx

    model.metadata_props.append(onnx.StringStringEntryProto(key=EMBEDDED_NAME, value=json.dumps(description)))


def _save(model, path: Path) -> None:
    """Save a graph whose big tensors already point into the shared file (written as they
    are: onnx.save would not touch external tensors without their data)."""
    path.write_bytes(model.SerializeToString())


WHY_SHARED = ("the three graphs hold the same convolution weights: stored once in step_weights.bin (ONNX external "
              "data, read relative to each graph's directory), not three times; keep the four files together")


def spec_of(settings) -> StepSpec:
    """The step spec of an export's settings (--content-layers, --style-layers, the norms)."""
    from nst.engine.layers import parse_layer_weights

    return StepSpec(parse_layer_weights(settings.content_layers, settings.network),
                    parse_layer_weights(settings.style_layers, settings.network),
                    settings.content_norm, settings.gram_norm)


def export_and_check(settings, module: VGGFeatures, staging: Path, trace_hw, sizes, seed: int, tolerance: float) -> dict:
    """Write the step graphs into ``staging``, check them against the reference, and return
    their manifest entry (``written: False`` with a reason when they do not apply)."""
    import time

    from nst.engine.fsutil import sha256_file

    from . import step_check

    spec = spec_of(settings)
    reason = not_applicable(spec, module, settings.precision)
    if reason:
        return {"file": ", ".join(STEP_FILES.values()), "written": False, "reason": reason}
    t0 = time.perf_counter()
    descs = write(module, spec, staging, trace_hw, settings.opset)
    write_s = time.perf_counter() - t0
    errs = step_check.check(staging, module, spec, sizes, seed)
    graphs = {g: {"file": f, "sha256": sha256_file(staging / f), "bytes": (staging / f).stat().st_size, **descs[g]}
              for g, f in STEP_FILES.items()}
    weights = {"file": STEP_WEIGHTS_NAME, "sha256": sha256_file(staging / STEP_WEIGHTS_NAME),
               "bytes": (staging / STEP_WEIGHTS_NAME).stat().st_size, "shared_by": list(STEP_FILES), "why": WHY_SHARED}
    return {
        "file": ", ".join(STEP_FILES.values()), "written": True, "graphs": graphs, "weights_file": weights,
        "bytes": sum(g["bytes"] for g in graphs.values()) + weights["bytes"], "export_seconds": round(write_s, 2),
        "opset": settings.opset, "dtype": "float32", "height_width": "dynamic", "batch": 1,
        "content_layers": [[n, w] for n, w in spec.content_layers],
        "style_layers": [[n, w] for n, w in spec.style_layers],
        "content_norm": spec.content_norm, "gram_norm": spec.gram_norm,
        "baked": ["network and weights", "pooling", "which layers are content / style layers", "content_norm",
                  "gram_norm", "Adam's betas (0.9, 0.999) and eps (1e-8)", "the clamp to [0, 1]"],
        "inputs_not_baked": ["image size (dynamic H, W)", "targets", "layer weights (defaults above)",
                             "loss weights [content, style, tv]", "learning rate", "Adam's moments and step count"],
        "styles": "targets.onnx takes one image; run it on each style image and blend the Grams on the host as "
                  "sum_k (w_k / sum w) G_k (engine/targets.py)",
        "tensors": tensor_docs(spec, module.network),
        "load": "onnxruntime.InferenceSession(dir / file); nst.engine.onnx_runtime.load_step_graphs(dir)",
        "check": {**errs, "passed": all(v["max_rel_err"] <= tolerance for v in errs.values())},
    }
