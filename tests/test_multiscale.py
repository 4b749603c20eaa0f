"""Multi-scale rendering, the time-budget planner and the memory plan."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine import StylizeSettings, build_extractor
from nst.cli import main
from nst.engine.budget import budget_margin
from nst.engine.errors import InputError
from nst.engine.memory import estimate_breakdown, estimate_tiled_bytes, estimate_memory
from nst.engine.multiscale import render
from nst.engine.layers import DEFAULT_TAPS

W = "random:3"


def _smooth(h, w, seed):
    small = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def net():
    return build_extractor(W)


def test_scale_sizes():
    assert StylizeSettings(size=512).scale_sizes() == [512]
    assert StylizeSettings(size=512, scales="auto").scale_sizes() == [256, 362, 512]
    assert StylizeSettings(size=512, scales="auto", scale_start=128).scale_sizes() == [128, 181, 256, 362, 512]
    assert StylizeSettings(size=2048, scales="auto", scale_factor=2).scale_sizes() == [256, 512, 1024, 2048]
    assert StylizeSettings(size=200, scales="auto").scale_sizes() == [200]
    assert StylizeSettings(size=200, scales="auto", scale_start=128).scale_sizes() == [141, 200]
    assert StylizeSettings(size=512, scales="128,256").scale_sizes() == [128, 256, 512]
    with pytest.raises(InputError, match="increasing"):
        StylizeSettings(size=512, scales="256,128").scale_sizes()
    with pytest.raises(InputError, match="larger than the output.s long edge"):
        StylizeSettings(size=256, scales="128,512").scale_sizes()
    with pytest.raises(InputError, match="bad --scales"):
        StylizeSettings(size=256, scales="big").scale_sizes()


def test_multiscale_beats_single_scale_at_equal_work(net):
    """Same FLOPs: 24 full-size steps, against 32 steps at half size (= 8) + 16 at full size.

    Seeded, noise init, the demo's drawn landscape and painting; compared on the
    full-resolution loss, against the same targets. (Measured when written: 2.78 single
    against 0.34 multi; with content init and style weight 1e6 too, multi-scale won.)
    """
    from nst.engine.demo import make_content, make_style
    from nst.engine.imageio import pil_to_tensor

    content, style = pil_to_tensor(make_content()), pil_to_tensor(make_style(seed=1))
    base = dict(size=128, weights=W, device="cpu", init="noise", seed=4, style_weight=1e8, progress_every=4)
    single = render(content, [(style, 1.0)], StylizeSettings(steps=24, **base), extractor=net)
    coarse = render(content, [(style, 1.0)], StylizeSettings(steps=32, **{**base, "size": 64}), extractor=net)
    multi = render(content, [(style, 1.0)], StylizeSettings(steps=16, **base), extractor=net, init=coarse.image)
    assert multi.image.shape == single.image.shape == (3, 96, 128)
    assert multi.stats.final_loss < 0.7 * single.stats.final_loss
    # The same through --scales (steps per scale): the final scale's targets are the single-scale ones.
    both = render(content, [(style, 1.0)], StylizeSettings(steps=4, scales="64", **base), extractor=net)
    assert [s["size"] for s in both.stats.scales] == [64, 128]
    assert [s["steps_run"] for s in both.stats.scales] == [4, 4]
    assert both.image.shape == (3, 96, 128)


def test_planner_meets_budget_and_writes_the_size_asked(tmp_path, capsys, replay_clock):
    """The planner against an injected clock (tests/conftest.py ReplayClock: a prepare and a
    step cost what was recorded for their size): the three scales' plan, the render within
    the budget to the last step (no margin for the machine: the clock is the test's), the
    time spent calibrating named, and the size asked for written."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC).save(
        tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    budget = 14.0
    t0 = replay_clock.now
    code = main(["-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.png"), "-o",
                 str(tmp_path / "o.png"), "--weights", W, "--size", "160", "--scales", "96,128", "--time-budget",
                 str(budget), "--device", "cpu", "--budget-plan", "equal", "--stats", str(tmp_path / "st.json")])
    took = replay_clock.now - t0
    assert code == 0
    out = capsys.readouterr().out
    assert "plan for a 14 s budget" in out and "scale 3: 160x120" in out and "planned against actual" in out
    assert "s spent on loading and calibrating" in out and "of it on loading and calibrating" in out
    # Calibration: per scale an untimed first prepare (scale 1 only), a timed prepare, its warm-up step and one step.
    st = __import__("json").loads((tmp_path / "st.json").read_text())
    hws = [tuple(s["hw"]) for s in st["scales"]]
    assert hws == [(72, 96), (96, 128), (120, 160)]
    calibration = replay_clock.setup_s(hws[0]) + sum(replay_clock.setup_s(hw) + 2 * replay_clock.step_s(hw)
                                                     for hw in hws)
    assert st["schedule_s"] == pytest.approx(calibration)
    # Within the budget, and the final scale ran until one more step would not have fit.
    spare = budget_margin(budget) + 0.05  # the planner's margin, and the predicted write (a few ms here)
    assert took <= budget - budget_margin(budget) + 1e-9
    assert took > budget - spare - replay_clock.step_s(hws[-1])
    assert [s["steps_run"] for s in st["scales"][:2]] == [s["steps_planned"] for s in st["scales"][:2]]
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (160, 120)


def test_budget_too_small_is_refused_before_work(tmp_path, capsys):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "c.png")
    code = main(["-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "c.png"), "-o",
                 str(tmp_path / "o.png"), "--weights", W, "--size", "64", "--time-budget", "0.2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--time-budget 0.2 s is too small" in err and "allow at least" in err
    assert not (tmp_path / "o.png").exists()


def test_size_too_large_for_memory_plan(tmp_path, capsys):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "c.png")
    code = main(["-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "c.png"), "-o",
                 str(tmp_path / "o.png"), "--weights", W, "--size", "4096", "--memory-limit", "0.5"])
    assert code == 1
    err = capsys.readouterr().err
    assert "needs about" in err and "even with activation checkpointing" in err and "the largest that fits" in err
    assert not (tmp_path / "o.png").exists()


def test_memory_plan_chooses_checkpointing(net):
    taps = DEFAULT_TAPS
    plain = estimate_breakdown(1024, 1024, taps)
    ckpt = estimate_breakdown(1024, 1024, taps, checkpoint=True)
    assert ckpt["step"] < 0.8 * plain["step"]
    limit = (plain["resident"] + (plain["step"] + ckpt["step"]) / 2) / 0.9 / 2**30
    m = estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "auto", limit)
    assert m.checkpoint
    m = estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "auto", 100.0)
    assert not m.checkpoint
    # Without checkpointing, exact tiles take over (the largest tile that fits).
    m = estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "off", limit)
    assert not m.checkpoint and m.tile in (512, 256) and m.bytes <= limit * 0.9 * 2**30
    # When even the checkpointed step does not fit, tiles; when nothing fits, a refusal.
    tiny = (estimate_tiled_bytes(1024, 1024, 256, taps) + 1) / 0.9 / 2**30
    assert tiny * 2**30 < ckpt["resident"] + ckpt["step"]
    m = estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "auto", tiny)
    assert m.tile == 256 and "exact tiled steps, 256 px tiles" in m.describe()
    with pytest.raises(InputError, match="largest that fits is about"):
        estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "auto", 0.1)
    with pytest.raises(InputError, match="try a smaller --tile"):
        estimate_memory(1024, 1024, taps, "vgg19", 4, "max", "cpu", "auto", tiny, tile=1024)
    # And the engine runs checkpointed when the plan says so, with the same losses.
    args = (_smooth(48, 64, 1), [(_img(64, 64, 2), 1.0)])
    from nst.engine.loop import run

    a = run(*args, StylizeSettings(size=64, steps=3, weights=W, device="cpu"), extractor=net)
    b = run(*args, StylizeSettings(size=64, steps=3, weights=W, device="cpu", checkpointing="on"), extractor=net)
    assert b.stats.checkpointing and not a.stats.checkpointing
    torch.testing.assert_close(torch.tensor(a.stats.loss), torch.tensor(b.stats.loss), rtol=1e-5, atol=0)
    assert not net.checkpoint  # the caller's module is left as it was


def test_checkpointing_gives_the_same_gradient(net):
    import copy

    x = torch.rand(1, 3, 80, 96, generator=torch.Generator().manual_seed(5), requires_grad=True)
    probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(net(x))]
    g_plain = torch.autograd.grad(sum((o * p).sum() for o, p in zip(net(x), probes)), x)[0]
    ck = copy.deepcopy(net)
    ck.checkpoint = True
    g_ck = torch.autograd.grad(sum((o * p).sum() for o, p in zip(ck(x), probes)), x)[0]
    torch.testing.assert_close(g_ck, g_plain, rtol=0, atol=0)


MEASURE = r'''
import ctypes, gc, json, sys
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks come from mmap and go back to the OS on free,
libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD   so RSS follows the live tensors
import torch
torch.set_num_threads(2)
from nst.engine import StylizeSettings
from nst.engine.session import prepare
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
size, ck = int(sys.argv[1]), sys.argv[2]
tile = int(sys.argv[3]) if len(sys.argv) > 3 else None
g = torch.Generator().manual_seed(0)
p = prepare(torch.rand(3, size, size, generator=g), [(torch.rand(3, size, size, generator=g), 1.0)],
            StylizeSettings(size=size, device="cpu", weights="random:0", checkpointing=ck, tile=tile))
p.stepper.step()
gc.collect(); libc.malloc_trim(0)
rss0 = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
p.stepper.step()
print(json.dumps({"step_peak": status("VmHWM:") - rss0}))
'''


@pytest.mark.slow
def test_memory_estimate_against_measured_peak_on_cpu(tmp_path):
    """Stated error: plain steps within 25% of the measured peak; checkpointed steps are
    over-estimated (a safe side for a plan) by less than 60%; tiled steps (128 px tiles)
    within 40%."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read the peak RSS")
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    size = 384
    for ck, lo, hi in (("off", 0.75, 1.25), ("on", 1.0, 1.6)):
        r = subprocess.run([sys.executable, str(script), str(size), ck], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, NST_OFFLINE="1"), cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 0, r.stderr
        measured = __import__("json").loads(r.stdout.strip().splitlines()[-1])["step_peak"]
        est = estimate_breakdown(size, size, DEFAULT_TAPS, checkpoint=(ck == "on"))["step"]
        assert lo <= est / measured <= hi, (ck, est / 2**20, measured / 2**20)
    r = subprocess.run([sys.executable, str(script), str(size), "off", "128"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, NST_OFFLINE="1"), cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    measured = __import__("json").loads(r.stdout.strip().splitlines()[-1])["step_peak"]
    est = estimate_tiled_bytes(size, size, 128, DEFAULT_TAPS) - estimate_breakdown(size, size, DEFAULT_TAPS)["resident"]
    assert 0.6 <= est / measured <= 1.4, ("tiled", est / 2**20, measured / 2**20)
    assert est < estimate_breakdown(size, size, DEFAULT_TAPS)["step"]  # a tile's step is smaller than the whole's


@pytest.mark.slow
def test_budget_holds_from_process_start_with_the_image_written(tmp_path):
    """The promise as a user sees it: from the moment `nst` is started to the moment the
    image file is complete, no more than --time-budget seconds (start-up, weights, targets
    at each scale, warm-up and writing included), at 384 px on this CPU.

    Sized from a measurement, so that it holds on a loaded machine: a one-step render of the
    same image, process start to file, gives the cost of starting (T1) and of one full-size
    step (S). The budget is max(30 s, 6 T1), which pays the calibration of every scale
    (about a start-up and two steps per scale) with room for steps. The margin over it is
    2 S, stated: the machine's load may change between the calibration and the last step,
    and the planner's own margin (5%, at least 1 s) was sized for an idle one; a step
    slower than calibrated by more than twice its time fails the test."""
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((384, 288), Image.BICUBIC).save(
        tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)).resize((384, 384)).save(tmp_path / "s.png")
    common = [sys.executable, "-m", "nst", "-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.png"),
              "--weights", W, "--size", "384", "--device", "cpu"]
    env = dict(os.environ, NST_OFFLINE="1")
    t0 = time.time()
    r = subprocess.run([*common, "-o", str(tmp_path / "one.png"), "--steps", "1", "--stats",
                        str(tmp_path / "one.json")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    t1 = os.path.getmtime(tmp_path / "one.png") - t0
    step_s = json.loads((tmp_path / "one.json").read_text())["loop_s"]
    budget = max(30.0, math.ceil(6 * t1))
    out = tmp_path / "o.png"
    t0 = time.time()
    r = subprocess.run([*common, "-o", str(out), "--scales", "auto", "--time-budget", str(budget)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert os.path.getmtime(out) - t0 <= budget + 2 * step_s, (budget, step_s, r.stdout)
    with Image.open(out) as im:
        assert im.size == (384, 288)


def test_the_budget_plan_from_measured_costs():
    """The cost model's arithmetic: setup and warm-up once per scale, then steps; the
    coarsest scales go first when the time cannot pay every scale's setup and one step."""
    from nst.engine.budget import ScaleCost, ScaleSchedule, affordable, allocate, replan

    cost = ScaleCost(setup_s=1.0, warmup_s=0.5, step_s=0.25)
    assert cost.seconds(4) == 2.5 and cost.steps_within(2.5) == 4 and cost.steps_within(0.1) == 1
    plans = [ScaleSchedule(s, (s, s), ScaleCost(0.5 * k, 0.1, 0.1 * k)) for k, s in enumerate((128, 256, 512), 1)]
    allocate(plans, 20.0)
    assert plans[-1].planned_s >= 10.0 - plans[-1].cost.step_s  # half to the final scale, plus the rounding
    assert sum(sc.planned_s for sc in plans) <= 20.0
    assert all(sc.planned_s == sc.cost.seconds(sc.steps) for sc in plans[:-1])
    # Only the final scale's setup and step fit: the coarse ones are dropped.
    assert [sc.size for sc in affordable(plans, 2.0)] == [512]
    assert [sc.size for sc in affordable(plans, 3.3)] == [256, 512]
    assert [sc.size for sc in affordable(plans, 4.0)] == [128, 256, 512]
    # The last scale runs to the end the caller gives (the budget less margin and writing).
    for sc in plans:
        sc.initial_steps, sc.initial_planned_s = sc.steps, sc.planned_s
    assert replan(plans, 2, 15.0, 19.0) == pytest.approx(4.0)
    assert replan(plans, 0, 0.0, 19.0) == pytest.approx(plans[0].planned_s)


def test_the_budget_report_says_what_the_schedule_did():
    """A scale re-planned before it ran is not reported as 'all planned steps' against the
    first plan's count, and the time calibration took is named (issue #27)."""
    from nst.engine.stats import RunStats
    from nst.engine.summary import outcome_lines

    scale = {"hw": [48, 64], "steps_planned": 17, "steps_replanned": 2, "steps_run": 2, "planned_s": 5.0,
             "actual_s": 1.0, "why": "all planned steps"}
    stats = RunStats(steps_planned=2, schedule_s=13.0, scales=[scale, dict(scale, steps_replanned=17, steps_run=17)])
    lines = outcome_lines(stats, StylizeSettings(time_budget=30), 29.0)
    assert "29.0 s of a 30 s budget, image written; 13.0 s of it on loading and calibrating" in lines[0]
    assert "planned 17 steps / 5.0 s, ran 2 steps" in lines[1] and "all 2 steps re-planned before it ran" in lines[1]
    assert lines[2].endswith("ended: all planned steps")
