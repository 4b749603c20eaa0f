"""Resumable renders (engine/state.py, --state / --resume): a render stopped after a
progress interval and resumed ends with exactly the image of the run that was never
stopped (Adam and L-BFGS, one scale and several); what is refused, in one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main

W = "random:5"


@pytest.fixture
def images(tmp_path):
    g = torch.Generator().manual_seed(4)
    Image.fromarray((torch.rand(90, 120, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "c.png")
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "s.png")
    return tmp_path


def _stylize(d, out, *extra):
    return main(["-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o", str(d / out), "--weights", W,
                 "--size", "120", "--device", "cpu", "--progress-every", "4", *extra])


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_a_resumed_render_ends_where_the_whole_one_does(images, optimizer):
    """A single-scale render of 5 steps, resumed with --steps 10: the 10-step render."""
    d = images
    extra = ["--optimizer", optimizer]
    assert _stylize(d, "whole.png", "--steps", "10", "--stats", str(d / "whole.json"), *extra) == 0
    assert _stylize(d, "part.png", "--steps", "5", "--state", str(d / "st.pt"), *extra) == 0
    assert torch.load(d / "st.pt")["step"] == 5  # the last step is a progress interval too
    assert _stylize(d, "resumed.png", "--steps", "10", "--state", str(d / "st.pt"), "--resume", "--stats",
                    str(d / "resumed.json"), *extra) == 0
    assert np.array_equal(_pixels(d / "resumed.png"), _pixels(d / "whole.png"))
    whole, resumed = (json.loads((d / f).read_text()) for f in ("whole.json", "resumed.json"))
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["steps_run"] == 5 and resumed["loss"] == whole["loss"][5:]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--lr-schedule", "cosine"], ["--scales", "64"]])
def test_a_killed_render_resumes_to_the_same_image(images, extra):
    """Killed (SIGKILL, no chance to clean up) at whatever step: resumed from the last state
    it wrote, the image is the whole run's. A cosine schedule spans all the steps; a
    multi-scale render resumes inside whichever scale the state is from."""
    import os
    import subprocess
    import sys
    import time

    d = images
    args = ["--steps", "30", "--progress-every", "3", *extra]
    assert _stylize(d, "whole.png", *args) == 0
    env = dict(os.environ, NST_OFFLINE="1")
    cmd = [sys.executable, "-m", "nst", "-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o",
           str(d / "killed.png"), "--weights", W, "--size", "120", "--device", "cpu", *args, "--state", str(d / "st.pt")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (d / "st.pt").exists() and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    p.kill()
    p.communicate()
    state = torch.load(d / "st.pt")
    assert state["step"] > 0
    assert _stylize(d, "resumed.png", *args, "--state", str(d / "st.pt"), "--resume") == 0
    assert np.array_equal(_pixels(d / "resumed.png"), _pixels(d / "whole.png")), state["scale"]
    last = torch.load(d / "st.pt")  # rewritten by the resumed run, numbered over the whole render
    assert last["step"] == 30 and last["before"] == (30 if "--scales" in extra else 0)
    # --steps is the schedule's length, or the earlier scales' steps: changing it is another render.
    assert _stylize(d, "other.png", "--steps", "50", *extra, "--state", str(d / "st.pt"), "--resume") == 1


def test_resume_refusals_are_one_line(images, capsys):
    d = images
    assert _stylize(d, "a.png", "--steps", "4", "--state", str(d / "st.pt")) == 0
    capsys.readouterr()
    cases = [
        (["--style-weight", "10", "--state", str(d / "st.pt"), "--resume"], "belongs to another render (--style-weight"),
        (["--size", "96", "--state", str(d / "st.pt"), "--resume"], "belongs to another render (--size"),
        (["--state", str(d / "missing.pt"), "--resume"], "missing.pt (it is written"),
        (["--resume"], "--resume needs --state FILE"),
        (["--state", str(d / "st.pt"), "--resume", "--time-budget", "30"], "cannot be resumed"),
        (["--state", str(d / "new.pt"), "--time-budget", "30"], "cannot be resumed"),
        (["--state", str(d / "c.png"), "--resume"], "not a readable state file"),
        (["--state", str(d / "st.pt"), "--resume", "--scales", "64"], "belongs to another render (--scales"),
    ]
    for extra, msg in cases:
        code = _stylize(d, "b.png", "--steps", "8", *extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and msg in err[-1] and "Traceback" not in "\n".join(err), (extra, err)
        assert not (d / "b.png").exists()
    # Fewer steps than the state has done (a single-scale, constant-rate render may change --steps).
    assert _stylize(d, "b.png", "--steps", "3", "--state", str(d / "st.pt"), "--resume") == 1
    assert "past --steps 3" in capsys.readouterr().err
    # Another content image: the inputs' hash differs.
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(d / "c.png")
    assert _stylize(d, "b.png", "--steps", "8", "--state", str(d / "st.pt"), "--resume") == 1
    assert "the input images differ" in capsys.readouterr().err


def test_the_state_rides_on_the_run_fields_only():
    """Settings that change how steps run, not what they compute, may differ on resume."""
    from nst.engine.settings import StylizeSettings
    from nst.engine.state import fingerprint

    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = fingerprint(StylizeSettings(), img, [(img, 1.0)])
    assert a == fingerprint(StylizeSettings(steps=9, tile=64, device="cpu", progress_every=3), img, [(img, 1.0)])
    assert a != fingerprint(StylizeSettings(lr=0.5), img, [(img, 1.0)])
    assert a != fingerprint(StylizeSettings(), img, [(img, 0.5)])


def test_resume_in_another_layout_and_a_state_that_cannot_be_written(images, capsys, monkeypatch):
    """A channels-last Adam state resumed on the NCHW reference path (the moments follow the
    image's layout); a state write that fails is one warning and the render goes on."""
    d = images
    assert _stylize(d, "a.png", "--steps", "4", "--state", str(d / "st.pt")) == 0
    assert _stylize(d, "b.png", "--steps", "8", "--state", str(d / "st.pt"), "--resume", "--reference") == 0
    assert torch.load(d / "st.pt")["step"] == 8
    capsys.readouterr()

    def full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    assert _stylize(d, "c.png", "--steps", "9", "--state", str(d / "other.pt")) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write --state") == 1 and "the render goes on" in err
    assert (d / "c.png").exists() and not (d / "other.pt").exists() and not list(d.glob(".*partial"))
