"""The reference the step graphs are checked against, and the export's self-check of them.

The reference is the engine's float32 eager path: the VGGFeatures module, the targets of
engine/targets.py, the loss of engine/losses.py (LossSpec.parts) differentiated by torch
autograd, and torch.optim.Adam's single-tensor step followed by the clamp to [0, 1] (the
reference path's AdamStep). tests/test_onnx_step.py uses the same functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nst.engine.features import VGGFeatures
from nst.engine.losses import LossSpec
from nst.engine.manifest import STEP_FILES
from nst.engine.targets import compute_targets

from .compare import max_errors
from .step_graph import ADAM_BETAS, ADAM_EPS


def loss_spec(module: VGGFeatures, spec, content_w, style_w, loss_weights) -> LossSpec:
    """The engine's LossSpec for a step spec with these layer and loss weights."""
    taps = list(module.taps)
    return LossSpec(content=tuple((taps.index(n), float(w)) for n, w in zip(spec.content_names, content_w)),
                    style=tuple((taps.index(n), float(w)) for n, w in zip(spec.style_names, style_w)),
                    content_norm=spec.content_norm, gram_norm=spec.gram_norm,
                    content_weight=float(loss_weights[0]), style_weight=float(loss_weights[1]),
                    tv_weight=float(loss_weights[2]))


def reference_objective(module: VGGFeatures, spec, x, contents, grams, content_w, style_w, loss_weights,
                        kinks=None):
    """(losses (4,), d total / dx (1, 3, H, W)) by autograd through the eager module; with
    ``kinks`` (graph_kinks), each ReLU and max pool decides as the graph's forward did."""
    ls = loss_spec(module, spec, content_w, style_w, loss_weights)
    xr = x.detach().clone().requires_grad_(True)
    feats = module(xr) if kinks is None else kinked_forward(module, xr, kinks)
    parts = ls.parts(xr, feats, list(contents), list(grams))
    (grad,) = torch.autograd.grad(parts[0], xr)
    return parts.detach(), grad


def kinked_forward(module: VGGFeatures, x: torch.Tensor, kinks) -> tuple[torch.Tensor, ...]:
    """The eager module's taps, each ReLU keeping the units the graph kept and each max pool
    taking the element the graph took (``kinks`` = (masks, routes), graph_kinks).

    Why: a ReLU input within float32 rounding of 0, or a pool window whose two largest
    values are (about one of each per 64x64 image with random weights), can go either way
    in two correct float32 implementations, and the gradient then differs by up to a
    percent over that unit's receptive field. Autograd through the graph's own decisions
    is the exact reference for everything else."""
    masks, routes = iter(kinks[0]), iter(kinks[1])
    h, taps = (x - module.mean) / module.std, []
    for i, layer in enumerate(module.body):
        if isinstance(layer, torch.nn.MaxPool2d):
            raw = next(routes, None)  # (1, C, h/2, w/2): ONNX MaxPool indices, over the flattened (1, C, H, W)
            if raw is None:
                break  # past the graph's deepest layer: no loss reads these taps
            plane = raw % (h.shape[-2] * h.shape[-1])
            h = h.flatten(2).gather(2, plane.flatten(2)).view(plane.shape)
        elif isinstance(layer, torch.nn.ReLU):
            mask = next(masks, None)
            if mask is None:
                break
            h = h * mask
        else:
            h = layer(h)
        if i in module._tap_positions:
            taps.append(h)
        if len(taps) == len(module.taps):
            break
    return tuple(taps)


def graph_kinks(directory: Path, graph: str, inputs: dict, module: VGGFeatures, x: torch.Tensor):
    """(ReLU masks, max-pool indices) of a step graph's forward on ``inputs``, in the eager
    module's layer order: the graph run once more with those tensors as extra outputs. The
    masks are the graph's ``> 0`` tests (its ReLU adjoints); each is matched to the ReLU
    whose eager mask it agrees with (equal shapes; they differ in a unit or two at most)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(directory / STEP_FILES[graph]), load_external_data=False)
    pools = [n.output[1] for n in model.graph.node if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]
             and [a.ints for a in n.attribute if a.name == "kernel_shape"] == [[2, 2]]]
    tests = [n.output[0] for n in model.graph.node if n.op_type == "Greater"]
    for n, t in [(n, onnx.TensorProto.INT64) for n in pools] + [(n, onnx.TensorProto.BOOL) for n in tests]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, t, None))
    probe = directory / f".probe-{graph}.onnx"  # beside the weights file its tensors point into
    probe.write_bytes(model.SerializeToString())
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        out = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"]).run(pools + tests, inputs)
    finally:
        probe.unlink()
    routes = [torch.from_numpy(o) for o in out[:len(pools)]]
    return _match_masks(module, x, [torch.from_numpy(o) for o in out[len(pools):]]), routes


def _match_masks(module: VGGFeatures, x: torch.Tensor, found: list) -> list:
    masks, h = [], (x - module.mean) / module.std
    with torch.no_grad():
        for layer in module.body:
            if not found:
                break
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                same = [i for i, m in enumerate(found) if m.shape == h.shape]
                if not same:
                    raise RuntimeError(f"no ReLU mask of shape {tuple(h.shape)} in the graph")
                best = max(same, key=lambda i: int((found[i] == (h > 0)).sum()))
                masks.append(found.pop(best).float())
    return masks


def reference_adam(x, grad, exp_avg, exp_avg_sq, step: float, lr: float):
    """One torch.optim.Adam step (foreach=False, the engine's reference) from the given state,
    then the clamp: (image, exp_avg, exp_avg_sq, step)."""
    p = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False)
    opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    p.grad = grad.clone()
    opt.step()
    with torch.no_grad():
        p.clamp_(0.0, 1.0)
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"], float(st["step"])


def reference_targets(module: VGGFeatures, spec, content, styles):
    """compute_targets of the engine: (content features, blended Grams)."""
    t = compute_targets(module, content, styles, spec.content_layers, spec.style_layers, spec.gram_norm,
                        spec.content_norm, network=module.network)
    return t.content, t.grams


def feed(names, values) -> dict:
    """ONNX Runtime's input dict from names and tensors (or sequences of them), in order."""
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    arrays = (torch.as_tensor(v, dtype=torch.float32).detach().contiguous().numpy() for v in flat)
    return dict(zip(names, arrays))  # (np.ascontiguousarray would make a 0-d scalar 1-d)


def sessions(directory: Path, threads: int = 0) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return {g: ort.InferenceSession(str(directory / f), opts, providers=["CPUExecutionProvider"])
            for g, f in STEP_FILES.items()}


def check(directory: Path, module: VGGFeatures, spec, sizes, seed: int) -> dict:
    """Worst relative errors of the three graphs against the reference at ``sizes``: the
    image gradient of each loss term alone (a small term hides in the total), the losses,
    one Adam step from a mid-run state (image and moments), and the targets."""
    from .to_step import io_names

    s, names = sessions(directory), io_names(spec)
    gen = torch.Generator().manual_seed(seed)
    cw = torch.tensor([w for _, w in spec.content_layers])
    sw = torch.tensor([w for _, w in spec.style_layers])
    worst: dict[str, dict] = {}
    for hw in sizes:
        content, style, x = (_image(hw, gen) for _ in range(3))
        contents, grams = reference_targets(module, spec, content, [(style, 1.0)])
        got = s["targets"].run(None, feed(names["targets"][0], [content]))
        _keep(worst, "targets_content", max_errors(got[:len(contents)], contents), hw)
        got = s["targets"].run(None, feed(names["targets"][0], [style]))
        _keep(worst, "targets_gram", max_errors(got[len(contents):], grams), hw)
        for lw in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
            inputs = feed(names["objective"][0], [x, contents, grams, cw, sw, torch.tensor(lw)])
            kinks = graph_kinks(directory, "objective", inputs, module, x)
            ref_losses, ref_grad = reference_objective(module, spec, x, contents, grams, cw, sw, lw, kinks)
            losses, grad = s["objective"].run(None, inputs)
            _keep(worst, "objective_grad", max_errors([grad], [ref_grad]), hw)
            _keep(worst, "objective_losses", max_errors([losses[1:]], [ref_losses[1:]]), hw)
        _keep(worst, "step", _step_error(directory, s["step"], names["step"][0], module, spec, gen,
                                         (x, contents, grams, cw, sw)), hw)
    return worst


def _step_error(directory: Path, session, names, module, spec, gen, args) -> dict:
    """One step.onnx step against the reference Adam step from a mid-run state."""
    x, contents, grams, cw, sw = args
    lw = torch.tensor([1.0, 1e3, 10.0])
    _, g = reference_objective(module, spec, x, contents, grams, cw, sw, lw)
    m, v = mid_run_moments(g, gen)
    inputs = feed(names, [x, m, v, 3.0, 0.02, contents, grams, cw, sw, lw])
    _, g = reference_objective(module, spec, x, contents, grams, cw, sw, lw, graph_kinks(directory, "step", inputs, module, x))
    ref = reference_adam(x, g, m, v, 3.0, 0.02)
    out = session.run(None, inputs)
    return max_errors(out[:3] + [out[3].reshape(())], [*ref[:3], torch.tensor(ref[3])])


def mid_run_moments(g: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments as a few steps in might hold them. The second moment has a floor:
    where it is ~0 Adam divides rounding noise by eps, and two correct float32 gradients
    then move a pixel by lr in opposite directions."""
    floor = (0.05 * g.abs().max()) ** 2
    m = g * (0.3 + torch.rand(g.shape, generator=gen))
    v = g * g * (0.003 + 0.01 * torch.rand(g.shape, generator=gen)) + floor
    return m, v


def _image(hw, gen) -> torch.Tensor:
    return torch.rand(1, 3, *hw, generator=gen)


def _keep(worst: dict, key: str, err: dict, hw) -> None:
    if key not in worst or not err["max_rel_err"] <= worst[key]["max_rel_err"]:
        worst[key] = {**err, "worst_at": list(hw)}
