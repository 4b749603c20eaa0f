"""The objective protocol (engine/objective.py): every evaluator gives the same losses with
and without a gradient and scales its gradient by grad_scale; the steppers need nothing of
an objective but the protocol (a quadratic that is no network at all steps like any other);
the plan is decided once and only read."""

import dataclasses

import pytest
import torch

from nst.engine.plan import StepPlan, resolve_plan
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings
from nst.engine.steppers import make_stepper

W = "random:3"


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tile", [None, 32])
def test_losses_without_and_with_a_gradient_agree_and_grad_scale_scales(tile):
    h, w = 70, 53
    s = StylizeSettings(resize=f"{w}x{h}", weights=W, device="cpu", style_weight=1e5, tile=tile)
    p = prepare(_img(h, w, 1), [(_img(60, 60, 2), 1.0)], s)
    assert type(p.objective).__name__ == ("WholeImage" if tile is None else "Tiles")
    x0 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    plain = p.objective.losses(x0)
    assert not plain.requires_grad and plain.shape == (4,)
    grads = []
    for scale in (1.0, 0.25):
        x = x0.clone().requires_grad_(True)
        parts = p.objective.losses_and_grad(x, scale)
        assert not parts.requires_grad
        torch.testing.assert_close(parts, plain, rtol=1e-5, atol=0)
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-5, atol=1e-12)
    total = p.objective.problem.spec
    torch.testing.assert_close(plain[0], total.content_weight * plain[1] + total.style_weight * plain[2]
                               + total.tv_weight * plain[3], rtol=1e-6, atol=0)


class Quadratic:
    """An objective that is no network: L(x) = sum((x - t)^2), parts [L, L, 0, 0]."""

    math = None

    def __init__(self, target):
        self.target = target
        self.calls = 0

    def losses(self, x):
        loss = (x.detach() - self.target).square().sum()
        return torch.stack([loss, loss, loss * 0, loss * 0])

    def losses_and_grad(self, x, grad_scale=1.0):
        self.calls += 1
        x.grad = 2 * (x.detach() - self.target) * grad_scale
        return self.losses(x)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_the_steppers_need_nothing_but_the_protocol(optimizer):
    target = torch.full((1, 3, 8, 8), 0.3)
    objective = Quadratic(target)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    settings = StylizeSettings(device="cpu", optimizer=optimizer, lr=0.05 if optimizer == "adam" else 0.5)
    stepper = make_stepper(objective, x, settings, resolve_plan(settings))
    first = float(stepper.step()[0])
    for _ in range(60):
        last = float(stepper.step()[0])
    assert objective.calls >= 61 and last < 0.01 * first
    assert float(x.detach().min()) >= 0 and float(x.detach().max()) <= 1  # clamped to the pixel range


def test_the_plan_is_decided_once_and_frozen():
    s = StylizeSettings(device="cpu", weights=W, tile=64)
    plan = resolve_plan(s, (300, 400), can_checkpoint=True)
    assert isinstance(plan, StepPlan) and plan.tile == 64 and not plan.cuda_graph and not plan.compile
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.memory.tile = None  # type: ignore[misc]
    # One tile would be the plain step with a second forward: the plan runs it plain.
    assert resolve_plan(s, (60, 50), can_checkpoint=True).tile is None
    # Across ranks every step is tiled, a tile for every rank, no checkpointing.
    ranked = resolve_plan(dataclasses.replace(s, tile=None), (300, 400), can_checkpoint=True, world=3)
    assert ranked.tile and ranked.world == 3 and not ranked.checkpoint
    # The machine's part alone, without a size.
    assert resolve_plan(s).memory is None and resolve_plan(s).device == "cpu"
