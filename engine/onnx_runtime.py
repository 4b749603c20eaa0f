"""Run the optimisation in ONNX Runtime, from an export's step graphs (``nst export
--formats step``: objective.onnx, step.onnx, targets.onnx; export/to_step.py).

- ``load_step_graphs(dir)``: the three graphs in ONNX Runtime sessions, after the checks
  of the other artefacts (file hashes, the description each file carries against the
  manifest), with the baked settings a render must agree with;
- ``onnx_targets``: the targets (content features, blended Grams) by ``targets.onnx``;
- ``OnnxObjective``: the objective protocol (``losses(x)``, ``losses_and_grad(x)``) on
  ``objective.onnx`` (for L-BFGS or a host's own optimiser);
- ``OnnxAdamStep``: the stepper protocol on ``step.onnx``: one Adam step per call, the
  moments kept between calls as numpy arrays; its state_dict has AdamStep's layout, so
  ``--resume`` works across the two runtimes. L-BFGS is the engine's own stepper
  (engine/steppers.py) on ``OnnxObjective``.

No autograd and no libtorch in the step: torch only holds the image the loop reads.
Everything runs on the CPU provider (ONNX Runtime's CUDA provider is out of scope).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, ManifestError
from .fsutil import sha256_file
from .layers import layer_by_name
from .manifest import EMBEDDED_NAME, STEP_FILES, STEP_WEIGHTS_NAME, check_step_embedded, read_manifest
from .losses import content_coef, style_coef
from .signals import updating
from .steppers import LBFGSStep
from .targets import Targets, style_blend


@dataclass
class StepGraphs:
    """The three step graphs of one export, loaded; what they bake in."""

    directory: Path
    manifest: dict
    sessions: dict  # graph name -> onnxruntime.InferenceSession
    content_layers: tuple[str, ...]  # baked, in input order
    style_layers: tuple[str, ...]
    content_norm: str
    gram_norm: str
    min_side: int
    inputs: dict = field(default_factory=dict)  # graph name -> input names, in order

    @property
    def weights_info(self) -> dict:
        """The export's weights (spec, source, hashes; ``random`` for seeded random weights)."""
        return self.manifest["weights"]

    def check_settings(self, content_layers, style_layers, content_norm: str, gram_norm: str) -> None:
        """Refuse, in one line, a render whose losses these graphs cannot compute: the
        norms must be the baked ones, and every loss layer one of the baked layers (a
        baked layer the render does not use gets weight 0)."""
        if (content_norm, gram_norm) != (self.content_norm, self.gram_norm):
            raise InputError(f"{self.directory}: the step graphs were exported with --content-norm "
                             f"{self.content_norm} --gram-norm {self.gram_norm}; the render asks for {content_norm} / "
                             f"{gram_norm}: re-export with those, or change the render's")
        for kind, want, have in (("content", content_layers, self.content_layers),
                                 ("style", style_layers, self.style_layers)):
            missing = [n for n, _ in want if n not in have]
            if missing:
                raise InputError(f"{self.directory}: {kind} layer {missing[0]} is not baked into the step graphs "
                                 f"({', '.join(have)}); re-export with --{kind}-layers including it")


def _session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default, one per core
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def load_step_graphs(directory: str | Path, threads: int | None = None, pool: str | None = None,
                     network: str | None = None, verify_hash: bool = True) -> StepGraphs:
    """Load and check an export's step graphs. ``pool`` and ``network``, when given, must
    be the export's; ``threads``: ONNX Runtime's intra-op threads (None: one per core)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed: pip install 'nst[cpu]'") from None
    directory = Path(directory)
    manifest = read_manifest(directory)
    entry = manifest["artefacts"].get("step")
    if not entry or not entry.get("written"):
        why = f" ({entry['reason']})" if entry and entry.get("reason") else ""
        raise ManifestError(f"{directory} has no step graphs{why}: export with --formats step")
    for what, asked in (("network", network), ("pool", pool)):
        if asked is not None and manifest[what] != asked:
            raise ManifestError(f"{directory} was exported for {what} {manifest[what]}, but the render asks for {asked}")
    _check_files(directory, entry, verify_hash)
    opts = _session_options(threads)
    sessions, inputs = {}, {}
    for graph, name in STEP_FILES.items():
        path = directory / name
        try:
            s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ManifestError(f"cannot load {path}: {(str(e).strip().splitlines() or [''])[0][:200]}") from None
        check_step_embedded(s.get_modelmeta().custom_metadata_map.get(EMBEDDED_NAME, ""), manifest, graph, path)
        inputs[graph] = [i.name for i in s.get_inputs()]
        if inputs[graph] != entry["graphs"][graph]["inputs"]:
            raise ManifestError(f"{path}: its inputs are not those the manifest lists; re-export")
        sessions[graph] = s
    g = entry["graphs"]["objective"]
    return StepGraphs(directory, manifest, sessions, tuple(g["content_layers"]), tuple(g["style_layers"]),
                      g["content_norm"], g["gram_norm"], int(g["min_side"]), inputs)


def _check_files(directory: Path, entry: dict, verify_hash: bool) -> None:
    files = [(g["file"], g.get("sha256")) for g in entry["graphs"].values()]
    files.append((entry["weights_file"]["file"], entry["weights_file"].get("sha256")))
    for name, sha in files:
        path = directory / name
        if name not in (*STEP_FILES.values(), STEP_WEIGHTS_NAME):
            raise ManifestError(f"{directory}: unexpected step file {name!r} in the manifest; re-export")
        if not path.is_file():
            raise ManifestError(f"{directory}: step file {name} is missing")
        if verify_hash and sha and sha256_file(path) != sha:
            raise ManifestError(f"{path}: SHA-256 does not match the manifest (the file was changed after export); "
                                "re-export it")


def _np(t) -> np.ndarray:
    """A float32, C-contiguous numpy view (or copy) of a CPU tensor or number."""
    # (not np.ascontiguousarray: it makes a 0-d array 1-d, and the step count is 0-d)
    return torch.as_tensor(t).detach().to("cpu", torch.float32).contiguous().numpy()


def onnx_targets(graphs: StepGraphs, content: torch.Tensor, styles, content_layers, style_layers) -> Targets:
    """The targets by targets.onnx: content features of ``content`` (1, 3, H, W) and the
    Grams of each style image (1, 3, h, w), blended by their normalised weights, as
    engine/targets.compute_targets gives them (float32, on the CPU)."""
    graphs.check_settings(content_layers, style_layers, graphs.content_norm, graphs.gram_norm)
    s, names = graphs.sessions["targets"], graphs.sessions["targets"].get_outputs()
    names = [o.name for o in names]
    blend = style_blend(w for _, w in styles)
    outs = dict(zip(names, s.run(None, {"image": _np(content)})))
    contents = [torch.from_numpy(outs[f"content_{n}"]) for n, _ in content_layers]
    grams = [None] * len(style_layers)
    for (img, _), share in zip(styles, blend):
        outs = dict(zip(names, s.run(None, {"image": _np(img)})))
        for i, (n, _) in enumerate(style_layers):
            g = torch.from_numpy(outs[f"gram_{n}"]) * share  # (1, C, C)
            grams[i] = g if grams[i] is None else grams[i] + g
    table, (h, w) = layer_by_name(graphs.manifest["network"]), content.shape[-2:]
    m = {n: (h // table[n].stride) * (w // table[n].stride) for n, _ in content_layers + style_layers}
    cf = tuple(content_coef(graphs.content_norm, wt, table[n].out_channels, m[n]) for n, wt in content_layers)
    sf = tuple(style_coef(graphs.gram_norm, wt, table[n].out_channels, m[n]) for n, wt in style_layers)
    return Targets(tuple(content_layers), tuple(style_layers), contents, grams, blend, cf, sf)


class OnnxObjective:
    """The objective protocol on objective.onnx: x (1, 3, H, W) float32 on the CPU ->
    (4,) [total, content, style, tv]; ``losses_and_grad`` also leaves grad_scale * d total
    / dx in x.grad. The targets, layer weights and loss weights are fed from here; a baked
    layer the render does not use gets weight 0 (and a zero target)."""

    math = None  # no torch float32 math mode: nothing runs in torch

    def __init__(self, graphs: StepGraphs, targets: Targets, content_weight: float, style_weight: float,
                 tv_weight: float):
        graphs.check_settings(targets.content_layers, targets.style_layers, graphs.content_norm, graphs.gram_norm)
        self.graphs = graphs
        self.targets = targets
        content = {n: t for (n, _), t in zip(targets.content_layers, targets.content)}
        grams = {n: g for (n, _), g in zip(targets.style_layers, targets.grams)}
        cw, sw = dict(targets.content_layers), dict(targets.style_layers)
        table = layer_by_name(graphs.manifest["network"])
        self._content = {n: (_np(content[n]) if n in content else None, table[n].out_channels, table[n].stride)
                         for n in graphs.content_layers}  # name -> (target or None, C, stride)
        self._fixed = {f"gram_{n}": (_np(grams[n]) if n in grams else
                                     np.zeros((1, table[n].out_channels, table[n].out_channels), np.float32))
                       for n in graphs.style_layers}
        self._fixed["content_layer_weights"] = np.array([cw.get(n, 0.0) for n in graphs.content_layers], np.float32)
        self._fixed["style_layer_weights"] = np.array([sw.get(n, 0.0) for n in graphs.style_layers], np.float32)
        self._fixed["loss_weights"] = np.array([content_weight, style_weight, tv_weight], np.float32)
        self._hw: tuple[int, int] | None = None

    def feed(self, x: torch.Tensor) -> dict:
        """Every input of objective.onnx (and the shared ones of step.onnx) for image ``x``."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if hw != self._hw:
            self._set_size(hw)
        return {"image": _np(x), **self._fixed}

    def _set_size(self, hw: tuple[int, int]) -> None:
        if min(hw) < self.graphs.min_side:
            raise InputError(f"image of {hw[1]}x{hw[0]} px is too small for the step graphs: height and width must "
                             f"be at least {self.graphs.min_side} px")
        for n, (target, c, s) in self._content.items():
            shape = (1, c, hw[0] // s, hw[1] // s)
            if target is not None and tuple(target.shape) != shape:
                raise InputError(f"the content target of {n} is {tuple(target.shape)}, but a {hw[1]}x{hw[0]} image "
                                 f"needs {shape}: compute the targets at the render size")
            self._fixed[f"content_{n}"] = target if target is not None else np.zeros(shape, np.float32)
        self._hw = hw

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        (losses,) = self.graphs.sessions["objective"].run(["losses"], self.feed(x))
        return torch.from_numpy(losses)

    def losses_and_grad(self, x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        losses, grad = self.graphs.sessions["objective"].run(["losses", "grad"], self.feed(x))
        g = torch.from_numpy(grad)  # (1, 3, H, W)
        x.grad = g if grad_scale == 1.0 else g.mul_(grad_scale)
        return torch.from_numpy(losses)


_STEP_OUT = ["next_image", "next_exp_avg", "next_exp_avg_sq", "next_step", "losses"]


class OnnxAdamStep:
    """The stepper protocol on step.onnx: Adam (torch's single-tensor math, betas 0.9 /
    0.999, eps 1e-8) and the clamp to [0, 1], one step.onnx call per step; ``x`` (the
    loop's image, on the CPU) is updated in place."""

    warmup_steps = 1
    capture_s = 0.0

    def __init__(self, objective: OnnxObjective, x: torch.Tensor, lr: float):
        self.objective, self.x, self.lr = objective, x, float(lr)
        self.exp_avg = np.zeros(tuple(x.shape), np.float32)  # (1, 3, H, W)
        self.exp_avg_sq = np.zeros(tuple(x.shape), np.float32)
        self.count = np.zeros((), np.float32)  # Adam's step count, as torch keeps it

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    def step(self) -> torch.Tensor:
        feed = self.objective.feed(self.x)
        feed.update(exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq, step=self.count,
                    lr=np.asarray(self.lr, np.float32))
        updating()  # one call evaluates and updates: a stop signal waits for the loop's step to end
        nx, self.exp_avg, self.exp_avg_sq, self.count, losses = self.objective.graphs.sessions["step"].run(_STEP_OUT, feed)
        with torch.no_grad():
            self.x.copy_(torch.from_numpy(nx))
        return torch.from_numpy(losses)

    def state_dict(self) -> dict:
        # AdamStep's layout (torch.optim.Adam's per-parameter state): a render resumes in either runtime.
        return {"adam": {0: {"step": torch.tensor(float(self.count)), "exp_avg": torch.from_numpy(self.exp_avg.copy()),
                             "exp_avg_sq": torch.from_numpy(self.exp_avg_sq.copy())}}}

    def load_state_dict(self, state: dict) -> None:
        if "adam" not in state:
            raise InputError("--resume: the state file was written by another optimizer (not Adam)")
        st = next(iter(state["adam"].values()))
        self.count = _np(st["step"]).reshape(())
        self.exp_avg = _np(st["exp_avg"]).reshape(self.exp_avg.shape).copy()
        self.exp_avg_sq = _np(st["exp_avg_sq"]).reshape(self.exp_avg_sq.shape).copy()


def make_onnx_stepper(graphs: StepGraphs, targets: Targets, settings, x: torch.Tensor):
    """The stepper a render's settings ask for, in ONNX Runtime: Adam on step.onnx, or
    L-BFGS on objective.onnx. ``x``: the loop's image (1, 3, H, W), float32 on the CPU."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise InputError("--runtime onnxruntime runs on the CPU in float32")
    objective = OnnxObjective(graphs, targets, settings.content_weight, settings.style_weight, settings.tv_weight)
    if settings.optimizer == "lbfgs":
        # The engine's own L-BFGS stepper: it needs nothing of an objective but the protocol.
        return LBFGSStep(objective, x, settings.learning_rate, settings.lbfgs_history)
    return OnnxAdamStep(objective, x, settings.learning_rate)


__all__ = ["OnnxAdamStep", "OnnxObjective", "StepGraphs", "load_step_graphs", "make_onnx_stepper",
           "onnx_targets"]
