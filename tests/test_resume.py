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
    (d / "junk.pt").write_bytes(b"not a state" * 10)
    cases = [
        (["--style-weight", "10", "--state", str(d / "st.pt"), "--resume"], "belongs to another render (--style-weight"),
        (["--size", "96", "--state", str(d / "st.pt"), "--resume"], "belongs to another render (--size"),
        (["--state", str(d / "missing.pt"), "--resume"], "missing.pt (it is written"),
        (["--resume"], "--resume needs --state FILE"),
        (["--state", str(d / "st.pt"), "--resume", "--time-budget", "30"], "cannot be resumed"),
        (["--state", str(d / "new.pt"), "--time-budget", "30"], "cannot be resumed"),
        (["--state", str(d / "junk.pt"), "--resume"], "not a readable state file"),
        (["--state", str(d / "st.pt"), "--resume", "--scales", "64"], "belongs to another render (--scales"),
        (["--state", str(d / "st.pt"), "--resume", "--lr", "0.5"], "(--lr was 0.02 (the default for adam), now 0.5)"),
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
    assert _stylize(d, "d.png", "--steps", "9", "--state", str(d / "other.pt")) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write --state") == 1 and "the render goes on" in err
    assert "enforce fail" not in err  # torch's words for a short write are not the user's
    assert (d / "d.png").exists() and not (d / "other.pt").exists() and not list(d.glob(".*partial"))


def _resave(path, change):
    """The state in ``path`` changed by ``change(payload)``, with its checksum made valid
    again: what only the checks of shapes, ranges and counts can catch."""
    from nst.engine.state import _checksum

    d = torch.load(path, weights_only=True)
    change(d)
    d["checksum"] = _checksum(d)
    torch.save(d, path)


def test_damaged_and_impossible_states_are_refused_in_one_line(images, capsys):
    """24 bytes overwritten inside the image, a missing key, an image scaled by 1e6, a
    negative step, an Adam state that counts other steps: each one line, nothing written."""
    import shutil

    d = images
    assert _stylize(d, "a.png", "--steps", "4", "--state", str(d / "good.pt")) == 0
    capsys.readouterr()
    raw = (d / "good.pt").read_bytes()
    image = torch.load(d / "good.pt", weights_only=True)["image"]
    at = raw.find(image.numpy().tobytes()[:64])
    assert at > 0
    cases = {"torn": (raw[:at + 100] + bytes(24) + raw[at + 124:], "is damaged (its checksum does not match"),
             "no image": (lambda p: p.pop("image"), "its 'image' is missing"),
             "image x 1e6": (lambda p: p["image"].mul_(1e6), "its image has values outside [0, 1]"),
             "step -5": (lambda p: p.update(step=-5), "a negative count"),
             "adam count": (lambda p: p["optimizer"]["adam"][0]["step"].fill_(7), "its Adam state counts 7 steps, "
                                                                                  "the state 4"),
             # Valid checksums over values of the wrong kind (written by hand): still one line.
             "no best_image": (lambda p: p.pop("best_image"), "is not a valid state"),
             "adam a list": (lambda p: p["optimizer"].update(adam=[1, 2]), "its Adam state is not a table"),
             "adam step text": (lambda p: p["optimizer"]["adam"][0].update(step="four"), "is not a valid state")}
    for name, (change, msg) in cases.items():
        path = d / f"{name}.pt"
        if isinstance(change, bytes):
            path.write_bytes(change)
        else:
            shutil.copy(d / "good.pt", path)
            _resave(path, change)
        code = _stylize(d, "b.png", "--steps", "8", "--state", str(path), "--resume")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and msg in err[-1] and "Traceback" not in "\n".join(err), (name, err)
        assert not (d / "b.png").exists()
    # The key missing without a valid checksum is a damaged file too.
    shutil.copy(d / "good.pt", d / "cut.pt")
    payload = torch.load(d / "cut.pt", weights_only=True)
    payload.pop("image")
    torch.save(payload, d / "cut.pt")
    assert _stylize(d, "b.png", "--steps", "8", "--state", str(d / "cut.pt"), "--resume") == 1
    assert "is damaged" in capsys.readouterr().err
    # A finished render resumed with its own --steps: no step runs, the same image, exit 0.
    assert _stylize(d, "b.png", "--steps", "4", "--state", str(d / "good.pt"), "--resume") == 0
    assert np.array_equal(_pixels(d / "b.png"), _pixels(d / "a.png"))


def test_saved_progress_is_not_replaced_unasked_and_a_state_has_one_owner(images, capsys):
    """A render without --resume over an existing state is refused (--overwrite-state starts
    again); a second render on a state another one holds is refused with the holder's pid."""
    import os

    from nst.engine.state import lock_path, locked

    d = images
    state = d / "st.pt"
    assert _stylize(d, "a.png", "--steps", "4", "--state", str(state)) == 0
    capsys.readouterr()
    assert _stylize(d, "b.png", "--steps", "2", "--state", str(state)) == 1
    err = capsys.readouterr().err
    assert "exists (the saved state of a render, at step 4): --resume continues it; --overwrite-state" in err, err
    assert torch.load(state, weights_only=True)["step"] == 4 and not (d / "b.png").exists()
    assert _stylize(d, "b.png", "--steps", "2", "--state", str(state), "--overwrite-state") == 0
    assert torch.load(state, weights_only=True)["step"] == 2
    (d / "other.txt").write_text("mine")
    assert _stylize(d, "b.png", "--steps", "2", "--state", str(d / "other.txt")) == 1
    assert "a file that is not an nst render state" in capsys.readouterr().err
    assert (d / "other.txt").read_text() == "mine"
    with locked(state):  # another render holds it (flock: another open file, even in this process)
        assert lock_path(state).read_text().strip() == str(os.getpid())
        for extra in (["--resume"], ["--overwrite-state"]):
            assert _stylize(d, "b.png", "--steps", "4", "--state", str(state), *extra) == 1
            err = capsys.readouterr().err
            assert f"is in use by another render (process {os.getpid()}" in err and "Traceback" not in err, err
    assert not lock_path(state).exists()  # released and removed
    assert _stylize(d, "b.png", "--steps", "4", "--state", str(state), "--resume") == 0
    assert not lock_path(state).exists()
    capsys.readouterr()
    assert main(["-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o", str(d / "x.png"),
                 "--overwrite-state"]) == 1
    assert "--overwrite-state starts a new render" in capsys.readouterr().err


def test_the_fingerprint_covers_the_network_not_its_name(images, capsys):
    """A weights file replaced at the same path is another network: resuming is refused."""
    from nst.engine.weights import random_state

    d = images
    torch.save(random_state("vgg19", 1), d / "w.pth")
    assert _stylize(d, "a.png", "--steps", "4", "--state", str(d / "st.pt"), "--weights", str(d / "w.pth")) == 0
    torch.save(random_state("vgg19", 2), d / "w.pth")
    capsys.readouterr()
    assert _stylize(d, "b.png", "--steps", "8", "--state", str(d / "st.pt"), "--resume", "--weights",
                    str(d / "w.pth")) == 1
    assert "belongs to another render (the network's weights differ)" in capsys.readouterr().err


def test_resuming_a_diverged_render_keeps_its_best_image_and_its_diagnosis(images, capsys):
    """The state carries the render's first loss and best image: a finished render whose loss
    diverged, resumed, still ends on its start image, and still says why (exit 1)."""
    d = images
    args = ["--lr", "1e6", "--steps", "10", "--progress-every", "1", "--state", str(d / "st.pt")]
    assert _stylize(d, "a.png", *args) == 1
    assert "never went below its first value" in capsys.readouterr().err
    first = _pixels(d / "a.png")
    for steps in ("10", "12"):
        assert _stylize(d, "a.png", *args[:2], "--steps", steps, *args[4:], "--resume") == 1
        err = capsys.readouterr().err
        assert "never went below its first value" in err and "Traceback" not in err, err
        assert np.array_equal(_pixels(d / "a.png"), first)  # not the diverged image


def test_a_time_limit_saves_the_state_where_it_stopped(images, capsys):
    """--time-limit is a graceful stop: the state is the one after the last step, not the
    last progress interval's, and the line says where --resume continues."""
    d = images
    state = d / "st.pt"
    assert _stylize(d, "a.png", "--steps", "100000", "--progress-every", "1000", "--time-limit", "4", "--state",
                    str(state)) == 0
    err = capsys.readouterr().err
    n = int(err.split("stopped early (the time limit was reached) after ")[1].split(" ")[0])
    assert n > 1 and torch.load(state, weights_only=True)["step"] == n
    assert f"--resume --state {state} continues from step {n}" in err


@pytest.mark.slow
def test_a_render_stopped_by_a_signal_resumes_to_the_whole_image(images):
    """SIGINT between progress intervals: the state is written at the step the render
    stopped at (a whole step: a signal during an update waits for it, engine/signals.py),
    the line says so, and resuming from it ends on the uninterrupted render's image."""
    import os
    import signal
    import subprocess
    import sys

    d = images
    args = ["--steps", "40", "--progress-every", "15"]
    assert _stylize(d, "whole.png", *args) == 0
    cmd = [sys.executable, "-m", "nst", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o",
           str(d / "stopped.png"), "--weights", W, "--size", "120", "--device", "cpu", *args, "--state", str(d / "st.pt")]
    p = subprocess.Popen(cmd, env=dict(os.environ, NST_OFFLINE="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stderr:  # not a terminal: one log line per progress interval
        if line.startswith("nst: step 16/"):
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    n = int(err.split("stopped early (interrupted by SIGINT) after ")[1].split(" ")[0])
    assert 16 <= n < 40 and torch.load(d / "st.pt", weights_only=True)["step"] == n, err
    assert f"continues from step {n}" in err
    r = subprocess.run([*cmd[:8], str(d / "resumed.png"), *cmd[9:], "--resume"], env=dict(os.environ, NST_OFFLINE="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resuming {d / 'st.pt'} from step {n}" in r.stdout, r.stderr
    assert np.array_equal(_pixels(d / "resumed.png"), _pixels(d / "whole.png"))


def test_a_stop_during_a_later_scale_s_setup_keeps_the_finished_scale(images, capsys, monkeypatch):
    """Ctrl-C while the second scale prepares (its targets; on a GPU the step-variant trial):
    the first scale's image is written at the size asked for, the exit is 130, and the state
    (written at the first scale's last step) resumes into the second scale, ending on the
    image of the render that was never stopped."""
    from nst.engine import multiscale

    d = images
    two = ["--scales", "64", "--steps", "4"]
    assert _stylize(d, "whole.png", *two) == 0
    real, calls = multiscale.run, []

    def stopped_in_setup(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # where a signal lands while the second scale is prepared
        return real(*args, **kwargs)

    monkeypatch.setattr(multiscale, "run", stopped_in_setup)
    capsys.readouterr()
    assert _stylize(d, "part.png", *two, "--state", str(d / "st.pt")) == 130
    err = capsys.readouterr().err
    assert "stopped early" in err and "continues from step 4" in err, err  # the first scale's last step
    with Image.open(d / "part.png") as im:
        assert im.size == (120, 90)
    monkeypatch.setattr(multiscale, "run", real)
    assert _stylize(d, "resumed.png", *two, "--state", str(d / "st.pt"), "--resume") == 0
    assert np.array_equal(_pixels(d / "resumed.png"), _pixels(d / "whole.png"))
