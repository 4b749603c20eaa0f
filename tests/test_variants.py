"""The step variants chosen by measurement (engine/variants.py, engine/session.py
choose_step), on the CPU with an injected timer: the fastest candidate that passes the parity
check runs, the choice is cached and reused, a new torch version or GPU model tries again,
a candidate whose losses disagree is never chosen. Also: the fused (kernels) step against
the reference step, the compiled objective's last evaluation without a second compile, the
weights cast once, the flags that say how the step runs without contradictions."""

import json

import pytest
import torch

from nst.engine import variants
from nst.engine.errors import InputError
from nst.engine.plan import resolve_plan, with_variant
from nst.engine.session import choose_step, prepare
from nst.engine.settings import StylizeSettings

W = "random:4"
SMALL = dict(weights=W, content_layers="relu2_1", style_layers="relu1_1,relu2_1", style_weight=1e6, device="cpu")


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


class FakeStepper:
    """Losses that fall by 10% a step; ``drift`` adds to them from the second step on (a
    backward or an update that is wrong while the forward is right)."""

    warmup_steps = 2

    def __init__(self, losses, cost, clock, drift=0.0):
        self.losses, self.cost, self.clock, self.drift, self.n = torch.tensor(losses), cost, clock, drift, 0

    def step(self):
        self.clock[0] += self.cost
        self.n += 1
        return self.losses * 0.9 ** self.n + (self.drift if self.n > 1 else 0.0)


def _candidates(costs, clock, bad=(), drifting=()):
    good = [1.0, 0.5, 0.4, 0.1]
    return [variants.Candidate(name, lambda name=name, c=c: FakeStepper([2.0, 0, 0, 0] if name in bad else good, c,
                                                                          clock, 0.05 if name in drifting else 0.0))
            for name, c in costs.items()]


def _timer(clock):
    def timer(fn):
        t0 = clock[0]
        fn()
        return clock[0] - t0
    return timer


def test_the_fastest_candidate_that_passes_parity_is_chosen():
    clock = [0.0]
    costs = {"graph": 3.0, "compiled": 2.0, "kernels": 1.0}
    choice, stepper = variants.trial(_candidates(costs, clock), _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "kernels" and choice.ms == {"graph": 3000.0, "compiled": 2000.0, "kernels": 1000.0}
    assert stepper.cost == 1.0 and "fastest" in choice.reason
    # The fastest disagrees with the first candidate: never chosen, and the error says why.
    choice, _ = variants.trial(_candidates(costs, clock, bad=("kernels",)), _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "compiled" and "differ" in choice.errors["kernels"]

    def broken():
        raise RuntimeError("no kernel image for this architecture")

    cands = _candidates(costs, clock)[:2] + [variants.Candidate("kernels", broken)]
    choice, _ = variants.trial(cands, _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "compiled" and choice.ms["kernels"] is None and "no kernel image" in choice.errors["kernels"]


def test_a_candidate_whose_later_losses_drift_is_never_chosen():
    """The first losses check the forward only: a candidate whose backward or update is
    wrong agrees at the start image and drifts after it. Every candidate runs the same
    steps from the same image, so the losses after the last timed step are compared too."""
    clock = [0.0]
    costs = {"graph": 3.0, "compiled": 2.0, "kernels": 1.0}
    choice, _ = variants.trial(_candidates(costs, clock, drifting=("kernels",)), _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "compiled"
    assert "after 9 steps differ from graph's" in choice.errors["kernels"] and choice.ms["kernels"] == 1000.0
    # The reference is the first candidate that ran: if it fails, the next one is.
    def broken():
        raise RuntimeError("out of memory")

    cands = [variants.Candidate("graph", broken)] + _candidates(costs, clock, drifting=("kernels",))[1:]
    choice, _ = variants.trial(cands, _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "compiled" and "from compiled's" in choice.errors["kernels"]
    # Losses that are not finite are never chosen, whichever candidate is first.
    cands = [variants.Candidate("graph", lambda: FakeStepper([float("nan")] * 4, 0.1, clock))]
    cands += _candidates(costs, clock)[1:]
    choice, _ = variants.trial(cands, _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "kernels" and choice.errors["graph"] == "its losses are not finite"


def test_the_parity_check_weighs_each_part_by_its_share_of_the_objective():
    """At the content image the content loss is rounding noise: two correct variants can be 2x
    apart on it. Each part, times its weight, is compared with the total; a part whose
    weighted difference is more than rtol of the total still fails."""
    total = lambda c, s, tv, w: torch.tensor([w[1] * c + w[2] * s + w[3] * tv, c, s, tv])  # noqa: E731
    w = (1.0, 1.0, 1e6, 1e-3)
    a, b = total(1e-7, 1e-6, 0.5, w), total(2e-7, 1e-6, 0.5, w)  # content 2x apart, 1e-7 of a total of 1.0005
    assert variants._agree(a, b, 1e-3, w) and abs(a[1] - b[1]) / b[1] == 0.5  # the part alone: 50% apart
    c = total(1e-7, 1.01e-6, 0.5, w)  # style 1% off: 1% of the total
    assert not variants._agree(a, c, 1e-3, w) and variants._agree(a, c, 2e-2, w)
    assert not variants._agree(a, torch.tensor([float("inf"), 0, 0, 0]), 1e-3, w)


def test_a_stepper_that_reuses_its_output_buffer_is_read_at_the_right_steps():
    """A captured step returns the same output buffer at every replay: the trial copies the
    first step's losses before the next step, and the last timed step's right after the
    timer, so such a stepper agrees with one that returns fresh tensors."""
    clock = [0.0]

    class Replayed(FakeStepper):
        def __init__(self, *args):
            super().__init__(*args)
            self.buf = torch.zeros(4)

        def step(self):
            return self.buf.copy_(super().step())

    cands = _candidates({"graph": 2.0}, clock)
    cands.append(variants.Candidate("compiled", lambda: Replayed([1.0, 0.5, 0.4, 0.1], 1.0, clock)))
    choice, stepper = variants.trial(cands, _timer(clock), rtol=1e-6, replays=5)
    assert choice.variant == "compiled" and not choice.errors and isinstance(stepper, Replayed)


def test_the_trial_warms_up_every_step_variant_enough():
    """Every candidate runs variants.WARMUP steps before it is timed (the same number, so that
    the losses after the timed steps are comparable): at least what a captured step needs."""
    from nst.engine.steppers import Captured

    assert variants.WARMUP >= Captured.warmup_steps
    clock = [0.0]

    class Slow(FakeStepper):
        warmup_steps = variants.WARMUP + 1

    cands = _candidates({"graph": 2.0}, clock) + [variants.Candidate("kernels", lambda: Slow([1.0, 0.5, 0.4, 0.1], 1.0,
                                                                                              clock))]
    choice, _ = variants.trial(cands, _timer(clock), rtol=1e-3, replays=5)
    assert choice.variant == "graph" and "warm-up steps" in choice.errors["kernels"]


def test_choices_are_cached_and_keyed_by_gpu_torch_and_size_bucket(tmp_path):
    path = tmp_path / "v.json"
    key = variants.choice_key("NVIDIA H200", "2.11.0", (512, 384), "bf16", {"network": "vgg19"})
    assert variants.cached_choice(key, path) is None
    variants.record(variants.Choice("compiled", "fastest", {"graph": 2.0, "compiled": 1.0}, key=key), path)
    got = variants.cached_choice(key, path)
    assert got.variant == "compiled" and got.cached and got.ms["graph"] == 2.0
    # Another aspect ratio or a nearby scale: the same bucket; another GPU or torch: tried again.
    assert variants.choice_key("NVIDIA H200", "2.11.0", (384, 512), "bf16", {"network": "vgg19"}) == key
    assert variants.size_bucket((400, 400)) == variants.size_bucket((512, 512)) == variants.size_bucket((700, 500)) == 512
    assert variants.size_bucket((1024, 1024)) == 1024
    for other in (("NVIDIA H100 80GB HBM3", "2.11.0"), ("NVIDIA H200", "2.14.1")):
        assert variants.cached_choice(variants.choice_key(*other, (512, 384), "bf16", {"network": "vgg19"}), path) is None
    path.write_text("{not json")  # a broken cache is ignored, and rewritten
    assert variants.cached_choice(key, path) is None
    variants.record(variants.Choice("graph", "fastest", key=key), path)
    assert json.loads(path.read_text())["format"] == variants.FORMAT


def test_the_render_runs_the_chosen_variant_and_the_next_one_reuses_it(tmp_path, monkeypatch):
    """choose_step on real candidates (on the CPU: graph is the eager step, compiled the
    compiled objective, kernels the fused step on its PyTorch references), timed by a clock
    that says the fused step is fastest: it runs, restarted from the start image, and the
    cache makes the next render skip the trial."""
    times = {"GraphAdamStep": 3.0, "AdamStep": 3.0, "FusedAdamStep": 1.0}
    monkeypatch.setattr(variants, "default_timer", lambda device: lambda fn: (fn(), times[_last[0]])[1])
    _last = ["AdamStep"]
    real_trial = variants.trial

    def spy_trial(candidates, timer, rtol, replays=variants.REPLAYS, **kwargs):
        def wrap(c):
            def build():
                s = c.build()
                _last[0] = type(s).__name__
                return s
            return variants.Candidate(c.name, build)
        assert kwargs["weights"] == (1.0, s.content_weight, s.style_weight, s.tv_weight)
        return real_trial([wrap(c) for c in candidates], timer, rtol, replays=2, **kwargs)

    monkeypatch.setattr(variants, "trial", spy_trial)
    s = StylizeSettings(size=48, variant_cache=str(tmp_path / "v.json"), **SMALL)
    p = prepare(_img(40, 48, 1), [(_img(48, 48, 2), 1.0)], s)
    plan = with_variant(p.plan, "auto")
    assert plan.variant == "auto"
    x0 = p.x.detach().clone()
    plan, objective, x, stepper, choice = choose_step(p.objective, p.x, s, plan)
    assert choice.variant == "kernels" and type(stepper).__name__ == "FusedAdamStep" and plan.variant == "kernels"
    assert set(choice.ms) == {"graph", "compiled", "kernels"} and not choice.cached
    assert torch.equal(x.detach(), x0) and float(stepper.adam.step_count) == 0  # restarted: a fresh render
    again = choose_step(p.objective, p.x, s, with_variant(p.plan, "auto"))
    assert again[4].variant == "kernels" and again[4].cached
    # Another GPU model, or another torch: the cached choice is not theirs, a trial runs again.
    for attr, value in ((variants, "device_name"), (torch, "__version__")):
        with monkeypatch.context() as m:
            m.setattr(attr, value, (lambda device: "Another GPU") if value == "device_name" else "9.9.9")
            other = choose_step(p.objective, p.x, s, with_variant(p.plan, "auto"))[4]
        assert not other.cached and set(other.ms) == {"graph", "compiled", "kernels"} and other.key != again[4].key
    assert len(json.loads((tmp_path / "v.json").read_text())["choices"]) == 3  # each kept under its own key


def test_the_fused_step_follows_the_reference_step():
    """The kernels variant's step (on the CPU: the kernels' PyTorch references, fused in the
    same places) against the engine's reference Adam step: the same losses and image, 6 steps."""
    from nst.engine.fused import FusedAdamStep, FusedObjective

    s = StylizeSettings(size=56, reference=True, tv_weight=3.0, **SMALL)
    p = prepare(_img(44, 56, 3), [(_img(50, 50, 4), 1.0)], s)
    fused_obj = FusedObjective(p.objective.problem)
    x = p.x.detach().clone()
    fused = FusedAdamStep(fused_obj, x, s.learning_rate)
    torch.testing.assert_close(fused_obj.losses(p.x), p.objective.losses(p.x), rtol=1e-5, atol=0)
    for i in range(6):
        want = p.stepper.step()
        got = fused.step()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9, msg=f"step {i}")
    torch.testing.assert_close(x, p.x.detach(), rtol=0, atol=2e-5)
    # the protocol's gradient too
    xa = p.x.detach().clone().requires_grad_(True)
    xb = p.x.detach().clone().requires_grad_(True)
    p.objective.losses_and_grad(xa)
    fused_obj.losses_and_grad(xb)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6 * float(xa.grad.abs().max()))


@pytest.mark.slow
def test_the_compiled_objective_is_not_compiled_again_for_the_last_evaluation():
    from torch._dynamo.utils import counters

    s = StylizeSettings(size=40, compile=True, steps=2, **SMALL)
    p = prepare(_img(40, 40, 5), [(_img(40, 40, 6), 1.0)], s)
    p.stepper.step()
    p.stepper.step()
    assert p.objective.compile_s > 0
    before = dict(counters["stats"])
    final = p.objective.losses(p.x.detach())  # what the loop does after the steps
    assert dict(counters["stats"]) == before and torch.isfinite(final).all()


def test_weights_are_cast_once_and_give_what_autocast_gives():
    from nst.engine import build_extractor

    net = build_extractor(W, taps=("relu1_1", "relu2_1"))
    half = net.placed("cpu", channels_last=True, weights_dtype=torch.bfloat16)
    assert net.weights_dtype == torch.float32 and half.weights_dtype == torch.bfloat16 and half is not net
    assert half.mean.dtype == torch.float32  # the normalisation stays float32
    x = torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = net.placed("cpu", channels_last=True)(x)
        got = half(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the same rounding: autocast's cast is the one done once


def test_the_flags_that_say_how_the_step_runs_do_not_contradict():
    for kw, msg in ((dict(reference=True, step_variant="compiled"), "--reference"),
                    (dict(compile=True, step_variant="graph"), "--compile is --step-variant compiled"),
                    (dict(cuda_graph=False, step_variant="graph"), "--no-cuda-graph contradicts"),
                    (dict(optimizer="lbfgs", step_variant="kernels"), "L-BFGS"),
                    (dict(tile=64, step_variant="compiled"), "tiled steps")):
        with pytest.raises(InputError, match=msg):
            StylizeSettings(**kw)
    for kw in (dict(), dict(compile=True)):  # kernels compiles too: --compile does not turn it into compiled
        with pytest.raises(InputError, match="needs a CUDA GPU"):
            resolve_plan(StylizeSettings(device="cpu", step_variant="kernels", **kw))
    # On the CPU: eager by default, compiled when asked (either way).
    assert resolve_plan(StylizeSettings(device="cpu")).variant == "eager"
    for kw in (dict(compile=True), dict(step_variant="compiled")):
        p = resolve_plan(StylizeSettings(device="cpu", **kw))
        assert p.variant == "compiled" and p.compile and not p.cuda_graph


def test_on_cuda_the_step_is_chosen_by_measurement_unless_a_flag_names_it(monkeypatch):
    """The CUDA side of the plan, on the CPU (the machine's answers stubbed): auto is left to
    the trial, captured; the flags that name a step take it; without a graph (or with
    L-BFGS) the trial's candidates are not what would run, so eager."""
    from nst.engine import plan as plan_mod

    monkeypatch.setattr(plan_mod, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for kw, variant, compiled, graph in ((dict(), "auto", False, True),
                                         (dict(compile=True), "compiled", True, True),
                                         (dict(step_variant="kernels", compile=True), "kernels", True, True),
                                         (dict(step_variant="graph"), "graph", False, True),
                                         (dict(step_variant="compiled", cuda_graph=False), "compiled", True, False),
                                         (dict(cuda_graph=False), "eager", False, False),
                                         (dict(optimizer="lbfgs"), "eager", False, False)):
        p = resolve_plan(StylizeSettings(**kw))
        assert (p.device, p.precision, p.variant, p.compile, p.cuda_graph) == ("cuda", "bf16", variant, compiled,
                                                                               graph), kw


def test_every_stepper_lets_cudnn_search_while_it_steps(monkeypatch):
    """The graph captures the convolution algorithms chosen during the warm-up steps, so each
    stepper steps inside cudnn_search (on for CUDA tensors): the trial compares the
    variants on equal terms. Spied on the CPU: the eager step and the fused (kernels) step."""
    from nst.engine import device, steppers
    from nst.engine.fused import FusedAdamStep, FusedObjective

    entered = []
    real = device.cudnn_search

    def spy(on):
        entered.append(on)
        return real(on)

    monkeypatch.setattr(device, "cudnn_search", spy)
    monkeypatch.setattr(steppers, "cudnn_search", spy)
    s = StylizeSettings(size=40, **SMALL)
    p = prepare(_img(40, 40, 3), [(_img(40, 40, 4), 1.0)], s)
    fused = FusedAdamStep(FusedObjective(p.objective.problem), p.x.detach().clone(), s.learning_rate)
    for stepper in (p.stepper, fused):
        entered.clear()
        stepper.step()
        assert entered == [False], type(stepper).__name__  # off the GPU: nothing changes


def test_cudnn_search_restores_the_callers_setting():
    from nst.engine.device import cudnn_search

    before = torch.backends.cudnn.benchmark
    with cudnn_search(True):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with cudnn_search(False):
        assert torch.backends.cudnn.benchmark == before


@pytest.mark.cuda
def test_cuda_the_trial_chooses_records_and_the_next_render_reuses(tmp_path):
    s = StylizeSettings(size=256, weights=W, device="cuda", variant_cache=str(tmp_path / "v.json"))
    p = prepare(_img(192, 256, 1), [(_img(256, 256, 2), 1.0)], s)
    c = p.choice
    assert c is not None and not c.cached and c.variant in ("graph", "compiled", "kernels")
    assert p.plan.variant == c.variant and all(c.ms[n] > 0 for n in ("graph", "compiled"))
    first = p.stepper.step()
    assert torch.isfinite(first).all()
    again = prepare(_img(192, 256, 1), [(_img(256, 256, 2), 1.0)], s)
    assert again.choice.cached and again.choice.variant == c.variant
    # Under a budget with nothing cached there is no trial: the compiled step.
    other = StylizeSettings(size=256, weights=W, device="cuda", variant_cache=str(tmp_path / "none.json"))
    q = prepare(_img(192, 256, 1), [(_img(256, 256, 2), 1.0)], other, trial=False)
    assert q.choice.variant == "compiled" and q.plan.compile and q.plan.cuda_graph


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["compiled", "kernels"])
def test_cuda_each_variant_follows_the_graph_step(variant):
    """Every candidate against the graph-captured eager step (all bf16), 12 steps at a size
    that is not a multiple of 16: the loss curves agree to 2e-2."""
    base = dict(size=200, weights=W, device="cuda")
    ref = prepare(_img(150, 200, 3), [(_img(180, 180, 4), 1.0)], StylizeSettings(step_variant="graph", **base))
    got = prepare(_img(150, 200, 3), [(_img(180, 180, 4), 1.0)], StylizeSettings(step_variant=variant, **base))
    assert got.plan.variant == variant and got.plan.cuda_graph
    a = torch.stack([ref.stepper.step().clone() for _ in range(12)])
    b = torch.stack([got.stepper.step().clone() for _ in range(12)])
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0)


def test_no_trial_where_a_clock_bounds_the_render(monkeypatch, tmp_path):
    """The trial's cold compiles are not bounded by a deadline: under --time-limit and under
    --time-budget each scale runs without one, and choose_step then takes the compiled
    step (or a cached choice); without a clock the trial may run."""
    from nst.engine import multiscale

    seen = []
    real = multiscale.run

    def spy(*args, **kwargs):
        seen.append(kwargs["trial"])
        return real(*args, **kwargs)

    monkeypatch.setattr(multiscale, "run", spy)
    content, style = _img(40, 48, 5), _img(48, 48, 6)
    for extra, want in (({}, True), ({"time_limit": 600.0}, False)):
        s = StylizeSettings(size=48, steps=2, scales="32", **SMALL, **extra)
        seen.clear()
        result = multiscale.render(content, [(style, 1.0)], s)
        assert seen == [want, want] and result.image.shape[-2:] == (40, 48)
    # Under --time-budget the calibration prepares what runs, without a trial.
    from nst.engine import budget

    class Seen(Exception):
        pass

    def spy_prepare(*args, **kwargs):
        seen.append(kwargs.get("trial", True))
        raise Seen

    monkeypatch.setattr(budget, "prepare", spy_prepare)
    seen.clear()
    with pytest.raises(Seen):
        multiscale.render(content, [(style, 1.0)], StylizeSettings(size=48, scales="32", time_budget=30.0, **SMALL))
    assert seen == [False] and not multiscale._may_trial(StylizeSettings(time_budget=30.0, **SMALL))
    s = StylizeSettings(size=48, variant_cache=str(tmp_path / "none.json"), **SMALL)  # nothing cached
    p = prepare(content, [(style, 1.0)], s)
    *_, choice = choose_step(p.objective, p.x, s, with_variant(p.plan, "auto"), trial=False)
    assert choice.variant == "compiled" and "--time-limit" in choice.reason and not choice.ms
