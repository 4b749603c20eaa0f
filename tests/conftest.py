"""Shared fixtures. Every test makes its own inputs: weights are seeded random tensors
written to temporary files, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Never let a test reach for the network: `imagenet` must come from a cache the test made.
os.environ.setdefault("NST_OFFLINE", "1")

from nst.engine import build_extractor  # noqa: E402
from nst.engine.weights import random_state  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    # Triton reads TRITON_INTERPRET once, at import: tests of kernels in its interpreter run
    # in a child pytest started with it set (tests/test_kernels.py), never in this process.
    if os.environ.get("TRITON_INTERPRET") != "1":
        interpreted = [item for item in items if "triton_interpreter" in item.keywords]
        if interpreted:
            items[:] = [item for item in items if "triton_interpreter" not in item.keywords]
            config.hook.pytest_deselected(items=interpreted)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def features_state() -> dict[str, torch.Tensor]:
    """Seeded random conv weights under torchvision's `features` indices ("0.weight"...)."""
    return random_state("vgg19", 1234)


@pytest.fixture(scope="session")
def full_model_state(features_state) -> dict[str, torch.Tensor]:
    """A state dict in the layout of torchvision's whole vgg19 (features.* + classifier.*).

    The classifier tensors have their real names but small shapes: they are never used,
    and the real ones would add 500 MB to every test run.
    """
    state = {f"features.{k}": v for k, v in features_state.items()}
    for i, shape in ((0, (8, 8)), (3, (8, 8)), (6, (10, 8))):
        state[f"classifier.{i}.weight"] = torch.zeros(shape)
        state[f"classifier.{i}.bias"] = torch.zeros(shape[0])
    return state


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory, features_state, full_model_state) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    files = {
        "full": d / "vgg19_full.pth",
        "features": d / "vgg19_features.pt",
        "safetensors": d / "vgg19.safetensors",
    }
    torch.save(full_model_state, files["full"])
    torch.save(features_state, files["features"])
    save_file({k: v.contiguous() for k, v in full_model_state.items()}, str(files["safetensors"]))
    return files


@pytest.fixture(scope="session")
def eager(weight_files):
    return build_extractor(str(weight_files["features"]))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, weight_files) -> Path:
    """One fp32 export shared by the tests that only read it. Without the step graphs (a
    minute more; tests/test_onnx_step.py makes its own, and the CI floor's torch stays off them)."""
    from nst.export import ExportSettings, export_extractor

    out = tmp_path_factory.mktemp("export")
    export_extractor(
        ExportSettings(out=out, weights=str(weight_files["features"]), trace_size="64x64", check_size="80x48",
                       formats=("torchscript", "onnx", "pt2"))
    )
    return out


class ReplayClock:
    """An injected clock for budgeted renders: time passes only by the recorded cost of each
    prepare (setup) and each step at its size, so that a budget's plan, and whether the
    render kept it, are the same on an idle machine and a loaded one (the planner is tested,
    not the machine). Stands in for the ``time`` module of the modules that read the clock."""

    def __init__(self, setup=(0.3, 2e-5), step=(0.03, 1e-5)):
        import time

        self._time = time
        self.now = 1000.0
        self.setup, self.step = setup, step  # (seconds, seconds per pixel) of a prepare and of a step

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(self._time, name)

    def setup_s(self, hw) -> float:
        return self.setup[0] + self.setup[1] * hw[0] * hw[1]

    def step_s(self, hw) -> float:
        return self.step[0] + self.step[1] * hw[0] * hw[1]


@pytest.fixture
def replay_clock(monkeypatch):
    """A ReplayClock in place of the real one in every module a budgeted render reads it in."""
    import importlib

    from nst.engine import budget, loop

    clock = ReplayClock()
    for name in ("nst.cli", "nst.stylize_command", "nst.engine.multiscale", "nst.engine.budget", "nst.engine.loop",
                 "nst.bench.quality"):
        monkeypatch.setattr(importlib.import_module(name), "time", clock)
    real = loop.prepare

    def prepare(*args, **kwargs):
        p = real(*args, **kwargs)
        clock.now += clock.setup_s(p.out_hw)
        step = p.stepper.step

        def timed():
            out = step()
            clock.now += clock.step_s(p.out_hw)
            return out

        p.stepper.step = timed
        return p

    monkeypatch.setattr(loop, "prepare", prepare)
    monkeypatch.setattr(budget, "prepare", prepare)
    return clock
