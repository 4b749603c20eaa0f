"""The adaptive budget plan (engine/adaptive.py): its decisions replayed exactly against an
injected clock and recorded loss curves (tests/data/loss_curves.json, a real two-scale
render on this CPU), and one real budgeted render with a generous margin."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main
from nst.engine.adaptive import (FINAL_MIN_SHARE, MoveOnRule, coarse_limit, move_on_threshold, progress_interval,
                                 worth_running)
from nst.engine.budget import ScaleCost, ScaleSchedule, allocate, budget_margin
from nst.engine.multiscale import _Pacer
from nst.engine.settings import StylizeSettings

CURVES = json.loads((Path(__file__).parent / "data" / "loss_curves.json").read_text())["scales"]


def test_move_on_rule_on_an_exponential_curve():
    """L(i) = 1 + 9 exp(-i / 20), seen every 5 steps: the rate over two intervals has a
    closed form, so the step at which the rule moves on is known exactly."""
    loss = [1 + 9 * math.exp(-i / 20) for i in range(400)]
    threshold = 0.004
    rule = MoveOnRule(threshold)
    stopped = next(i for i in range(0, 400, 5) if rule.observe(i, loss[i]))

    def rate(i):  # ln(L(i - 10) / L(i)) / 10
        return math.log(loss[i - 10] / loss[i]) / 10

    want = next(i for i in range(10, 400, 5) if rate(i) < threshold)
    assert stopped == want
    assert rate(want - 5) >= threshold  # not a moment before


def test_rule_reads_the_best_loss_so_far_and_waits_for_three_points():
    rule = MoveOnRule(0.01)
    assert rule.observe(0, 10.0) is None and rule.observe(5, 5.0) is None
    assert rule.observe(5, 5.0) is None  # the same interval again (a run's last step)
    assert rule.observe(10, 2.0) is None  # ln(10 / 2) / 10 = 0.16 per step: go on
    why = rule.observe(15, 7.0)  # worse than the best: reads as no progress since step 10...
    assert why is None  # ...but over two intervals (from 5.0 to 2.0) it still fell 9% per step
    why = rule.observe(20, 2.5)
    assert why is not None and why.startswith("plateau") and rule.rate == 0.0
    zero = MoveOnRule(0.01)
    for i in range(0, 30, 5):
        assert zero.observe(i, 0.0) is None  # no logarithm of zero: never decides (the time cap holds)


def _plans(costs, seconds):
    plans = [ScaleSchedule(s, (s, s), c) for s, c in zip((128, 256), costs)]
    allocate(plans, seconds)
    for sc in plans:
        sc.initial_steps, sc.initial_planned_s = sc.steps, sc.planned_s
    return plans


def _replay(step_costs, rho, budget=60.0, write_s=1.0, calibration_s=3.0):
    """Run the recorded curves through the pacer with a fake clock: each step costs its
    scale's calibrated time; the rule sees the loss at the progress intervals."""
    settings = StylizeSettings(size=256, scales="128", time_budget=budget, device="cpu", move_on=rho,
                               progress_every=25, budget_plan="adaptive")
    costs = [ScaleCost(0.4, 0.1, s) for s in step_costs]
    end = budget - budget_margin(budget) - write_s
    plans = _plans(costs, end - calibration_s)
    pacer = _Pacer(plans, settings, t_start=0.0, write_s=write_s)
    clock, log = calibration_s, []
    content = torch.zeros(3, 256, 256)
    for k, (sc, curve) in enumerate(zip(plans, CURVES)):
        s_k, rule = pacer.scale_settings(k, content, clock)
        t0 = clock
        clock += sc.cost.setup_s + sc.cost.warmup_s
        why, steps = "all planned steps", 0
        losses = curve["loss"]
        for i in range(s_k.steps):
            if clock + sc.cost.step_s > t0 + s_k.time_limit:
                why = "time"
                break
            if i >= len(losses):  # beyond the recording: the curve stays flat
                losses = losses + [losses[-1]]
            clock += sc.cost.step_s
            steps = i + 1
            if rule is not None and (i % s_k.progress_every == 0):
                reason = rule(i, losses[i])
                if reason:
                    why = reason
                    break
        log.append({"steps": steps, "why": why, "every": s_k.progress_every, "rule": rule is not None})
    return log, clock, end


def test_replayed_render_moves_on_at_the_plateau_and_fits_the_budget():
    # CPU-like costs: a 256 px step costs 4x a 128 px one.
    log, clock, end = _replay([0.1, 0.4], rho=0.12)
    assert log[0]["rule"] and not log[1]["rule"]
    assert log[0]["why"].startswith("plateau")
    # The final scale runs to the end of the budget: within one of its steps of it, never past.
    assert log[1]["why"] in ("time", "all planned steps")
    assert end - 0.4 < clock <= end
    # The decision is the rule's on the recorded curve at this threshold, and nothing else.
    rule = MoveOnRule(0.12 / 4)
    every = log[0]["every"]
    stop = next(i for i in range(0, 10**4, every) if rule.observe(i, CURVES[0]["loss"][i]))
    assert log[0]["steps"] == stop + 1


def test_cheaper_next_scale_means_moving_on_sooner():
    """On a GPU, small scales are launch-bound: the next scale costs about as much per step,
    so a coarse scale should not dwell. With a cost ratio of 1.1 the coarse scale stops
    earlier than with the CPU's 4."""
    cpu, _, _ = _replay([0.1, 0.4], rho=0.12)
    gpu, _, _ = _replay([0.1, 0.11], rho=0.12)
    assert gpu[0]["steps"] < cpu[0]["steps"]


def test_coarse_scale_keeps_the_final_scale_its_share():
    plans = _plans([ScaleCost(0.4, 0.1, 0.1), ScaleCost(1.0, 0.5, 0.4)], 50.0)
    final_min = FINAL_MIN_SHARE * 50.0
    limit = coarse_limit(plans, 0, 5.0, 55.0, final_min)
    assert limit == pytest.approx(55.0 - 5.0 - (1.0 + 0.5) - final_min)
    assert move_on_threshold(0.02, plans[0], plans[1]) == pytest.approx(0.005)
    assert move_on_threshold(0.02, plans[1], plans[0]) == 0.02  # never above rho
    assert progress_interval(120, 25) == 10 and progress_interval(5, 25) == 1 and progress_interval(10**4, 25) == 25


def test_scales_not_cheaper_than_the_next_are_dropped():
    """A launch-bound GPU: the two smallest scales cost about what the third does."""
    plans = [ScaleSchedule(s, (s, s), ScaleCost(0.1, 0.1, t)) for s, t in ((128, 0.010), (181, 0.011), (256, 0.012),
                                                                         (362, 0.04), (512, 0.16))]
    assert [sc.size for sc in worth_running(plans)] == [256, 362, 512]
    cpu = [ScaleSchedule(s, (s, s), ScaleCost(0.1, 0.1, t)) for s, t in ((128, 0.1), (256, 0.4), (512, 1.6))]
    assert worth_running(cpu) == cpu
    assert [sc.size for sc in worth_running(cpu[:1])] == [128]


def test_equal_plan_has_no_rule():
    settings = StylizeSettings(size=256, scales="128", time_budget=60, device="cpu", budget_plan="equal")
    plans = _plans([ScaleCost(0.4, 0.1, 0.1), ScaleCost(1.0, 0.5, 0.4)], 50.0)
    s_k, rule = _Pacer(plans, settings, 0.0, 1.0).scale_settings(0, torch.zeros(3, 256, 256), 3.0)
    assert rule is None and s_k.steps == plans[0].initial_steps


@pytest.mark.slow
def test_adaptive_budgeted_render_end_to_end(tmp_path, capsys, replay_clock):
    """The adaptive plan against an injected clock (tests/conftest.py ReplayClock): both
    scales run, each ends by a rule, and the render keeps its budget to the planner's margin
    whatever else the machine is doing (the planner is tested, not the machine's load)."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((256, 192), Image.BICUBIC).save(
        tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).resize((256, 256)).save(tmp_path / "s.png")
    budget = 24.0
    t0 = replay_clock.now
    code = main(["-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.png"), "-o",
                 str(tmp_path / "o.png"), "--weights", "random:3", "--size", "256", "--scales", "128",
                 "--time-budget", str(budget), "--device", "cpu", "--stats", str(tmp_path / "stats.json"),
                 "--budget-plan", "adaptive"])
    took = replay_clock.now - t0
    assert code == 0
    out = capsys.readouterr().out
    assert "adaptive" in out and "ended:" in out
    assert took <= budget - budget_margin(budget) + 1e-9  # the clock is the test's: no allowance for load
    scales = json.loads((tmp_path / "stats.json").read_text())["scales"]
    assert [s["size"] for s in scales] == [128, 256]
    assert scales[0]["why"].startswith(("plateau", "its share")) and scales[1]["why"]
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (256, 192)


def test_settings_that_cannot_be_meant_are_refused():
    from nst.engine.errors import InputError

    with pytest.raises(InputError, match="below the network's smallest input side"):
        StylizeSettings(size=512, scales="auto", scale_start=8)
    with pytest.raises(InputError, match="more than 24 scales"):
        StylizeSettings(size=4096, scales="auto", scale_start=32, scale_factor=1.01)
    with pytest.raises(InputError, match="--move-on"):
        StylizeSettings(move_on=1.5)
    with pytest.raises(InputError, match="--reference .* --compile"):
        StylizeSettings(reference=True, compile=True)


def test_a_learning_rate_schedule_keeps_the_equal_split():
    from nst.engine.multiscale import adaptive_budget

    assert adaptive_budget(StylizeSettings(time_budget=10, budget_plan="adaptive"))
    assert not adaptive_budget(StylizeSettings(time_budget=10, budget_plan="adaptive", lr_schedule="cosine"))
    assert not adaptive_budget(StylizeSettings(time_budget=10))  # equal is the default
    assert not adaptive_budget(StylizeSettings(budget_plan="adaptive"))
