"""``--compile``: the objective under torch.compile against the float32 eager reference,
at sizes other than any compiled before, with fresh random inputs (CPU; CUDA marked)."""

import pytest
import torch

from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings

# A cut after relu2_1 keeps each compile to seconds on two CPU cores; the objective's code
# is the same for any cut.
SMALL = dict(weights="random:7", content_layers="relu2_1", style_layers="relu1_1,relu2_1", style_weight=1e6)


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _value_and_grad(prep, x0):
    x = x0.clone().requires_grad_(True)
    parts = prep.objective.losses_and_grad(x)
    return parts, x.grad


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(44, 60), (52, 36)])
def test_compiled_objective_matches_reference(hw):
    h, w = hw
    content, style = _img(h, w, h), _img(w, h, w)
    base = StylizeSettings(resize=f"{w}x{h}", device="cpu", **SMALL)
    ref = prepare(content, [(style, 1.0)], StylizeSettings(**{**base.__dict__, "reference": True}))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**{**base.__dict__, "compile": True}))
    assert comp.plan.compile and not ref.plan.compile
    x0 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    parts_r, grad_r = _value_and_grad(ref, x0)
    parts_c, grad_c = _value_and_grad(comp, x0.contiguous(memory_format=torch.channels_last))
    # float32 both; inductor reorders sums (fused reductions), nothing more.
    torch.testing.assert_close(parts_c, parts_r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_r, rtol=1e-3, atol=1e-7)


@pytest.mark.slow
def test_compiled_adam_follows_the_eager_trajectory():
    content, style = _img(40, 48, 1), _img(48, 40, 2)
    kw = dict(resize="48x40", device="cpu", **SMALL)
    eager = prepare(content, [(style, 1.0)], StylizeSettings(**kw))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**kw, compile=True))
    le = torch.stack([eager.stepper.step() for _ in range(5)])
    lc = torch.stack([comp.stepper.step() for _ in range(5)])
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(comp.x.detach(), eager.x.detach(), rtol=0, atol=1e-4)


def test_reference_path_is_never_compiled():
    from nst.engine.errors import InputError
    from nst.engine.plan import resolve_plan

    with pytest.raises(InputError, match="--reference runs the plain eager loop"):
        StylizeSettings(device="cpu", reference=True, compile=True, **SMALL)
    assert not resolve_plan(StylizeSettings(device="cpu", reference=True, **SMALL)).compile
    assert resolve_plan(StylizeSettings(device="cpu", compile=True, **SMALL)).compile


@pytest.mark.cuda
@pytest.mark.parametrize("hw", [(72, 88), (104, 56)])
def test_cuda_compiled_graph_step_matches_eager_bf16(hw):
    """bf16 + compiled objective + CUDA graph against the same step eager (no compile)."""
    h, w = hw
    content, style = _img(h, w, 3), _img(w, h, 4)
    kw = dict(resize=f"{w}x{h}", device="cuda", precision="bf16", **SMALL)
    eager = prepare(content, [(style, 1.0)], StylizeSettings(**kw, cuda_graph=False))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**kw, compile=True, cuda_graph=True))
    le = torch.stack([eager.stepper.step() for _ in range(8)])
    lc = torch.stack([comp.stepper.step() for _ in range(8)])
    torch.testing.assert_close(lc, le, rtol=2e-2, atol=1e-6)
