"""The API borrows: a module or tensor a caller hands the engine is never moved, cast or
flagged; the engine places its own copy where it needs another device, layout or
activation checkpointing. And the float32 math mode is set only while the engine runs."""

from __future__ import annotations

import pytest
import torch

from nst.engine import StylizeSettings, build_extractor, load_export, stylize
from nst.engine.device import float32_math
from nst.engine.loop import run
from nst.engine.objective import Problem, WholeImage
from nst.engine.plan import StepPlan as Plan
from nst.engine.session import prepare
from nst.engine.steppers import AdamStep

W = "random:3"


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _state(module: torch.nn.Module) -> dict:
    """Everything about a module that the engine could change."""
    params = dict(module.named_parameters()) | dict(module.named_buffers())
    return {
        "tensors": {k: (v.device, v.dtype, v.stride(), v.requires_grad, v.detach().clone()) for k, v in params.items()},
        "training": module.training,
        "flags": {k: getattr(module, k) for k in ("channels_last", "checkpoint", "taps") if hasattr(module, k)},
    }


def _same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"] and a["flags"] == b["flags"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k, (dev, dt, stride, rg, val) in a["tensors"].items():
        dev2, dt2, stride2, rg2, val2 = b["tensors"][k]
        assert (dev, dt, stride, rg) == (dev2, dt2, stride2, rg2), k
        assert torch.equal(val, val2), k


def test_the_eager_extractor_is_left_as_it_was():
    net = build_extractor(W)
    before = _state(net)
    content, style, init = _img(40, 56, 1), _img(48, 48, 2), _img(40, 56, 3)
    inputs = [t.clone() for t in (content, style, init)]
    # The fast path (channels-last), activation checkpointing, L-BFGS and multi-scale.
    for extra in ({}, {"checkpointing": "on"}, {"optimizer": "lbfgs"}, {"scales": "48"}):
        settings = StylizeSettings(size=64, steps=2, weights=W, device="cpu", **extra)
        run(content, [(style, 1.0)], settings, extractor=net, init=init) if "scales" not in extra else \
            stylize(content, style, settings, extractor=net)
        _same(before, _state(net))
    for t, copy in zip((content, style, init), inputs):
        assert torch.equal(t, copy) and not t.requires_grad


def test_the_engine_uses_the_callers_module_when_nothing_changes():
    """No needless copies: on the reference path (NCHW, CPU) the caller's module runs."""
    net = build_extractor(W)
    p = prepare(_img(40, 56, 1), [(_img(48, 48, 2), 1.0)],
                StylizeSettings(size=64, steps=1, weights=W, device="cpu", reference=True), extractor=net)
    assert p.objective.problem.net is net
    p = prepare(_img(40, 56, 1), [(_img(48, 48, 2), 1.0)],
                StylizeSettings(size=64, steps=1, weights=W, device="cpu"), extractor=net)
    assert p.objective.problem.net is not net and p.objective.problem.net.channels_last and not net.channels_last


def test_a_loaded_torchscript_extractor_is_left_as_it_was(export_dir):
    net = load_export(export_dir)
    before = _state(net.scripted)
    r = run(_img(40, 56, 1), [(_img(48, 48, 2), 1.0)], StylizeSettings(size=64, steps=2, device="cpu"),
            extractor=net)
    assert r.stats.memory_format == "channels_last"
    _same(before, _state(net.scripted))  # its conv weights stay NCHW


def test_steps_run_under_the_plans_float32_math_and_restore_it():
    """On CUDA the plan sets IEEE (or TF32) float32 for cuDNN convolutions and cuBLAS
    matmuls while a step runs, forward and backward, and restores the caller's settings.
    Checked here through the flags the network sees (the settings exist on CPU builds too)."""
    seen, seen_backward = [], []

    def flags():
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision

    class Probe(torch.nn.Module):
        taps = ("relu1_1",)

        def forward(self, x):
            seen.append(flags())
            out = x.repeat(1, 2, 1, 1)
            out.register_hook(lambda g: seen_backward.append(flags()))
            return (out,)

    from nst.engine.targets import Targets

    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    targets = Targets((), (("relu1_1", 1.0),), [], [torch.zeros(1, 6, 6)], (1.0,), (), (1.0,))
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    for precision, want in (("fp32", "ieee"), ("tf32", "tf32")):
        plan = Plan("cuda", precision, False, False, "reference")
        assert plan.float32_math == want
        step = AdamStep(WholeImage(Problem.build(Probe(), targets, StylizeSettings(), plan)), x, 0.01, plan)
        step.step()
        assert seen[-1] == (want, want) and seen_backward[-1] == (want, want)
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    assert Plan("cpu", "fp32", True, False, "fast").float32_math is None


def test_float32_math_restores_on_error():
    before = torch.backends.cudnn.conv.fp32_precision
    try:
        with float32_math("ieee"):
            raise KeyError
    except KeyError:
        pass
    assert torch.backends.cudnn.conv.fp32_precision == before


@pytest.mark.cuda
def test_cuda_float32_math_reaches_cudnn_convolutions():
    """On the GPU: with "ieee" the extractor's cuDNN convolutions agree with float64 to
    float32 rounding; with "tf32" they do not (TF32 keeps 10 mantissa bits). So the
    setting the engine uses is the one that governs cuDNN on this torch."""
    import copy

    net = build_extractor(W)
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(x.double())
        gpu = net.placed("cuda", channels_last=False)

        def rel(mode):
            with float32_math(mode):
                out = gpu(x.cuda())
            return max(((o.double().cpu() - r).abs().max() / r.abs().max()).item() for o, r in zip(out, ref))

        ieee, tf32 = rel("ieee"), rel("tf32")
    assert ieee < 2e-5, ieee
    assert tf32 > 10 * ieee, (tf32, ieee)
