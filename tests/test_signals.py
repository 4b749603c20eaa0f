"""A stop signal and the loop's step (engine/signals.py): once a stepper has begun its
update (``updating()``), a stop waits for the step to end and be counted, so that the state
a graceful stop writes is that of a whole number of steps; during the evaluation it stops
at once, with nothing updated. Checked for every stepper, with a real SIGINT sent to this
process at the moment in question (no timing: the signal is sent from inside the step)."""

import os
import signal

import numpy as np
import pytest
import torch

from nst.engine import fused, onnx_runtime, signals, steppers
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings
from nst.engine.signals import Stopped, step_boundary, stop_on_signals

SMALL = dict(weights="random:2", content_layers="relu2_1", style_layers="relu1_1,relu2_1", style_weight=1e6,
             device="cpu", size=40)


@pytest.fixture
def handler(monkeypatch):
    """The command line's handler (stop_on_signals), this test's alone; Python's back after."""
    old = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    monkeypatch.setattr(signals, "_received", [])
    monkeypatch.setattr(signals, "_pending", [])
    stop_on_signals()
    yield
    for s, h in old.items():
        signal.signal(s, h)
    assert signals._held[0] == 0  # no block left holding signals


def _signal_after(monkeypatch, module, name):
    """``module.name`` (a function) followed by a SIGINT to this process."""
    real = getattr(module, name)

    def then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(module, name, then_signal)


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _prepared(**extra):
    s = StylizeSettings(**SMALL, **extra)
    return prepare(_img(32, 40, 1), [(_img(40, 40, 2), 1.0)], s)


def _adam(p):
    return p.stepper, lambda: float(p.stepper.state_dict()["adam"].get(0, {}).get("step", 0))  # none before a step


def _lbfgs(p):
    return p.stepper, lambda: float(p.stepper.state_dict()["lbfgs"].get(0, {}).get("n_iter", 0))


def _fused(p):
    st = fused.FusedAdamStep(fused.FusedObjective(p.objective.problem), p.x, p.settings.learning_rate)
    return st, lambda: float(st.adam.step_count)


class _FakeStepGraph:
    """ONNX Runtime's step session as OnnxAdamStep calls it: the image moved, the count up."""

    def run(self, names, feed):
        x = feed["x"] if "x" in feed else next(v for v in feed.values() if getattr(v, "ndim", 0) == 4)
        return (np.clip(x - 0.01, 0, 1), feed["exp_avg"] + 1, feed["exp_avg_sq"] + 1, feed["step"] + 1,
                np.ones(4, np.float32))


class _FakeOnnxObjective:
    graphs = type("G", (), {"sessions": {"step": _FakeStepGraph()}})()

    def feed(self, x):
        return {"x": x.detach().numpy().copy()}


def _onnx(p):
    st = onnx_runtime.OnnxAdamStep(_FakeOnnxObjective(), p.x.detach().clone(), 0.02)
    return st, lambda: float(st.count)


CASES = {"adam": ({}, steppers, _adam), "lbfgs": ({"optimizer": "lbfgs"}, steppers, _lbfgs),
         "kernels": ({}, fused, _fused), "onnxruntime": ({}, onnx_runtime, _onnx)}


@pytest.mark.parametrize("name", list(CASES))
def test_a_stop_during_the_update_waits_for_the_step_to_be_counted(handler, monkeypatch, name):
    extra, module, make = CASES[name]
    p = _prepared(**extra)
    stepper, count = make(p)
    _signal_after(monkeypatch, module, "updating")  # the signal lands as the update begins
    counted = []
    with pytest.raises(Stopped):
        with step_boundary() as b:
            stepper.step()
            counted.append(1)  # the loop counts the step here (engine/loop.py)
    assert counted == [1] and b.updating and not b.torn
    assert count() == 1  # the optimiser's update ran whole


@pytest.mark.parametrize("name", ["adam", "kernels"])
def test_a_stop_during_the_evaluation_stops_at_once(handler, monkeypatch, name):
    extra, _, make = CASES[name]
    p = _prepared(**extra)
    stepper, count = make(p)
    x0 = p.x.detach().clone()
    target = stepper.objective
    _signal_after(monkeypatch, target, "forward_backward" if name == "kernels" else "losses_and_grad")
    counted = []
    with pytest.raises(Stopped):
        with step_boundary() as b:
            stepper.step()
            counted.append(1)
    assert counted == [] and not b.updating and not b.torn
    assert count() == 0 and torch.equal(p.x.detach(), x0)  # nothing updated: the state is the last whole step's
