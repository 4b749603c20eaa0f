"""The optimisation loop: convergence, fast vs reference, TorchScript vs eager, targets
computed once, inits, seeds, multi-style blends, colours, stops."""

import math

import pytest
import torch
from torch import nn

from nst.engine import NonFiniteLossError, StylizeSettings, build_extractor, load_export, stylize
from nst.engine.color import rgb_to_yiq
from nst.engine.loop import run
from nst.engine.layers import parse_layer_weights
from nst.engine.targets import compute_targets

W = "random:3"


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _smooth(h, w, seed):
    """A smooth random image (natural images are smoother than noise)."""
    small = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _settings(**kw):
    base = dict(size=64, steps=8, weights=W, device="cpu", progress_every=4, style_weight=1e8)
    if "extractor" in kw:
        del base["weights"]  # an export carries its own weights
    base.update(kw)
    return StylizeSettings(**base)


class Counting(nn.Module):
    """Wraps an extractor and records every forward call."""

    def __init__(self, inner, fail_after=None, exc=None):
        super().__init__()
        self.inner = inner
        self.taps, self.min_side, self.weights_info = inner.taps, inner.min_side, inner.weights_info
        self.calls = []
        self.fail_after, self.exc = fail_after, exc

    def forward(self, x):
        self.calls.append((tuple(x.shape), x.requires_grad))
        out = self.inner(x)
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            if self.exc is not None:
                self.fail_after = None  # one-shot, like a single Ctrl-C
                raise self.exc
            out = tuple(o * float("nan") for o in out)
        return out


@pytest.fixture(scope="module")
def net():
    return build_extractor(W)


def test_loss_decreases(net):
    r = stylize(_smooth(48, 64, 1), _img(64, 64, 2), _settings(steps=12), extractor=net)
    assert r.stats.steps_run == 12 and len(r.stats.loss) == 12
    assert r.stats.final_loss < 0.7 * r.stats.loss[0]
    assert r.image.shape == (3, 48, 64) and r.image.min() >= 0 and r.image.max() <= 1
    assert r.stats.path == "fast" and r.stats.device == "cpu"


def test_lbfgs_decreases_loss(net):
    r = stylize(_smooth(48, 64, 1), _img(64, 64, 2), _settings(steps=6, optimizer="lbfgs", lbfgs_history=5),
                extractor=net)
    assert r.stats.final_loss < 0.7 * r.stats.loss[0]
    assert r.stats.optimizer == "lbfgs"


def test_fast_and_reference_paths_agree_on_cpu(net):
    """Stated tolerance: per-step total loss within 1e-4 relative over 10 steps."""
    args = (_smooth(40, 64, 5), [(_img(48, 48, 6), 1.0)])
    fast = run(*args, _settings(steps=10), extractor=net)
    ref = run(*args, _settings(steps=10, reference=True), extractor=net)
    assert fast.stats.path == "fast" and ref.stats.path == "reference"
    torch.testing.assert_close(torch.tensor(fast.stats.loss), torch.tensor(ref.stats.loss), rtol=1e-4, atol=0)
    # Images: channels-last convolutions sum in another order, and Adam turns a rounding-level
    # gradient difference into a full lr-sized step where a pixel's gradient is near zero;
    # so the pixels agree on average, and no pixel is off by more than about two steps.
    assert fast.stats.memory_format == "channels_last" and ref.stats.memory_format == "contiguous"
    diff = (fast.image - ref.image).abs()
    assert diff.mean() < 2e-3 and diff.max() < 2.5 * 0.02


def test_torchscript_extractor_gives_the_same_trajectory(tmp_path, net):
    from nst.export import ExportSettings, export_extractor

    out = tmp_path / "exp"
    export_extractor(ExportSettings(out=out, weights=W, trace_size="64x64", check_size="72x40",
                                    formats=("torchscript",)))
    args = (_smooth(40, 56, 7), [(_img(48, 48, 8), 1.0)])
    eager = run(*args, _settings(steps=6), extractor=net)
    scripted = run(*args, _settings(steps=6, extractor=str(out)))
    torch.testing.assert_close(torch.tensor(scripted.stats.loss), torch.tensor(eager.stats.loss), rtol=1e-5, atol=0)
    torch.testing.assert_close(scripted.image, eager.image, rtol=0, atol=1e-5)
    assert isinstance(load_export(out).taps, tuple)


def test_targets_are_computed_once(net):
    counting = Counting(net)
    steps = 5
    run(_smooth(48, 48, 1), [(_img(40, 40, 2), 1.0), (_img(56, 40, 3), 0.5)], _settings(steps=steps),
        extractor=counting)
    calls = counting.calls
    # 1 content + 2 styles (no grad), then one call per step on the optimised image, then
    # one final evaluation of the returned image: never the content or style images again.
    assert len(calls) == 3 + steps + 1
    assert [rg for _, rg in calls[:3]] == [False, False, False]
    assert all(rg for _, rg in calls[3:3 + steps])
    assert [s for s, _ in calls[:3]] == [(1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 46)]


def test_multi_style_grams_are_the_weighted_blend(net):
    c, s1, s2 = _img(48, 48, 1)[None], _img(48, 48, 2)[None], _img(64, 48, 3)[None]
    layers = parse_layer_weights("relu1_1,relu3_1")
    t = compute_targets(net, c, [(s1, 1.0), (s2, 0.3)], parse_layer_weights("relu4_2"), layers)
    t1 = compute_targets(net, c, [(s1, 1.0)], parse_layer_weights("relu4_2"), layers)
    t2 = compute_targets(net, c, [(s2, 1.0)], parse_layer_weights("relu4_2"), layers)
    for g, g1, g2 in zip(t.grams, t1.grams, t2.grams):
        torch.testing.assert_close(g, (1.0 * g1 + 0.3 * g2) / 1.3)
    assert t.grams[0].dtype == torch.float32 and t.grams[0].shape == (1, 64, 64)


def test_original_colors_keep_content_chroma(net):
    content = _smooth(48, 64, 9)
    r = stylize(content, _img(64, 64, 2), _settings(steps=6, original_colors=True), extractor=net)
    plain = stylize(content, _img(64, 64, 2), _settings(steps=6), extractor=net)
    yiq_c, yiq_r, yiq_p = rgb_to_yiq(content), rgb_to_yiq(r.image), rgb_to_yiq(plain.image)
    # Chroma (I, Q) is the content's (up to clamping to [0, 1]); luminance is the result's.
    assert (yiq_r[1:] - yiq_c[1:]).abs().mean() < 0.01
    assert (yiq_r[0] - yiq_p[0]).abs().mean() < 0.02
    assert (yiq_p[1:] - yiq_c[1:]).abs().mean() > (yiq_r[1:] - yiq_c[1:]).abs().mean()


@pytest.mark.parametrize("init", ["content", "noise", "style", "tensor"])
def test_inits(net, init):
    content, style = _smooth(48, 64, 1), _img(64, 64, 2)
    start = _img(30, 40, 3) if init == "tensor" else init
    s = _settings(steps=1, init=start if isinstance(start, str) else "content")
    r = run(content, [(style, 1.0)], s, extractor=net, init=start)
    assert r.image.shape == (3, 48, 64)
    # The first loss is the loss of the start image: content init has zero content loss (up
    # to the rounding between the NCHW targets and the channels-last loop).
    if init == "content":
        assert r.stats.content[0] < 1e-10
    else:
        assert r.stats.content[0] > 1e-6


def test_noise_init_deterministic_by_seed(net):
    args = (_smooth(48, 48, 1), [(_img(48, 48, 2), 1.0)])
    a = run(*args, _settings(steps=4, init="noise", seed=5), extractor=net)
    b = run(*args, _settings(steps=4, init="noise", seed=5), extractor=net)
    c = run(*args, _settings(steps=4, init="noise", seed=6), extractor=net)
    assert a.stats.loss == b.stats.loss and torch.equal(a.image, b.image)
    assert a.stats.loss != c.stats.loss


def test_size_and_style_scale(net):
    counting = Counting(net)
    r = run(_img(30, 60, 1), [(_img(100, 50, 2), 1.0)], _settings(steps=1, size=128, style_scale=0.5),
            extractor=counting)
    assert r.image.shape == (3, 64, 128)
    assert counting.calls[1][0] == (1, 3, 64, 32)  # style long edge = 0.5 * 128


def test_nan_stops_with_step_and_keeps_last_good_image(net):
    # Calls: 1 content + 1 style, then steps; NaN from the 7th step on.
    bad = Counting(net, fail_after=2 + 6)
    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf at step 7 of 20; the last good image is from step 4; "
                                                 r"try a lower --lr") as e:
        run(_smooth(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(steps=20, progress_every=4), extractor=bad)
    res = e.value.result
    assert res is not None and torch.isfinite(res.image).all()
    assert res.stats.stopped == "non-finite" and res.stats.image_from_step == 4


def test_interrupt_returns_best_image(net):
    bad = Counting(net, fail_after=2 + 5, exc=KeyboardInterrupt())
    r = run(_smooth(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(steps=50), extractor=bad)
    assert r.stats.stopped == "interrupted" and r.stats.steps_run == 5
    assert torch.isfinite(r.image).all()


def test_time_limit_stops_early(net):
    r = run(_smooth(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(steps=10_000, time_limit=1.5), extractor=net)
    assert r.stats.stopped == "time-limit"
    assert 0 < r.stats.steps_run < 10_000
    assert r.stats.setup_s + r.stats.loop_s < 1.5 + 2.0  # generous: the machine is noisy


def test_callback_sees_every_step_and_losses_at_progress_intervals(net):
    steps, images = [], []

    def every_2(info):
        steps.append((info.step, info.steps, info.losses is not None))
        if info.step % 2 == 0:
            images.append((info.step, tuple(info.image().shape)))

    run(_smooth(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(steps=6, progress_every=4), extractor=net,
        callback=every_2)
    # Losses are read (a host sync) at steps 1 and 5 (every 4 from the first) and at the last.
    # Step 0 comes once before the first step.
    assert steps == [(0, 6, False), (1, 6, True), (2, 6, False), (3, 6, False), (4, 6, False), (5, 6, True),
                     (6, 6, True)]
    assert images == [(0, (3, 64, 64)), (2, (3, 64, 64)), (4, (3, 64, 64)), (6, (3, 64, 64))]


def test_bad_settings(net):
    from nst.engine.errors import InputError

    with pytest.raises(InputError, match="too small for the network"):
        run(_img(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(size=16), extractor=net)
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        run(_img(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(precision="bf16"), extractor=net)
    with pytest.raises(InputError, match="--steps"):
        run(_img(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(steps=0), extractor=net)
    with pytest.raises(InputError, match="unknown tap"):
        run(_img(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(style_layers="relu9_9"), extractor=net)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            run(_img(48, 48, 1), [(_img(48, 48, 2), 1.0)], _settings(device="cuda"), extractor=net)


def test_layer_weight_syntax():
    assert parse_layer_weights("relu2_1:0.75,relu1_1") == (("relu1_1", 1.0), ("relu2_1", 0.75))
    from nst.engine.errors import InputError

    with pytest.raises(InputError, match="LAYER:WEIGHT"):
        parse_layer_weights("relu1_1:abc")


@pytest.mark.slow
def test_acceptance_256px_50_steps(net, tmp_path):
    """The issue's acceptance run: 256 px, 50 steps on this CPU, lower loss, valid image."""
    from PIL import Image

    from nst.engine.imageio import save_image

    r = stylize(_smooth(192, 256, 11), _img(256, 256, 12), StylizeSettings(size=256, steps=50, weights=W, device="cpu"),
                extractor=net)
    assert r.stats.final_loss < r.stats.loss[0]
    assert math.isfinite(r.stats.final_loss)
    p = save_image(r.image, tmp_path / "out.png")
    with Image.open(p) as im:
        assert im.size == (256, 192) and im.mode == "RGB"


# ---- GPU behaviour: runs only where CUDA is present ----------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_fast_path_tracks_reference(precision):
    net = build_extractor(W)
    args = (_smooth(96, 128, 1), [(_img(128, 128, 2), 1.0)])
    ref = run(*args, _settings(size=128, steps=20, device="cuda", reference=True), extractor=net)
    fast = run(*args, _settings(size=128, steps=20, device="cuda", precision=precision), extractor=net)
    assert fast.stats.cuda_graph and fast.stats.memory_format == "channels_last"
    assert fast.stats.precision == precision
    tol = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}[precision]  # relative, per step
    torch.testing.assert_close(torch.tensor(fast.stats.loss), torch.tensor(ref.stats.loss), rtol=tol, atol=0)
    assert fast.stats.final_loss < fast.stats.loss[0]


@pytest.mark.cuda
def test_cuda_graph_equals_eager_fast_path():
    net = build_extractor(W)
    args = (_smooth(64, 96, 1), [(_img(96, 96, 2), 1.0)])
    g = run(*args, _settings(size=96, steps=12, device="cuda", precision="fp32"), extractor=net)
    e = run(*args, _settings(size=96, steps=12, device="cuda", precision="fp32", cuda_graph=False), extractor=net)
    assert g.stats.cuda_graph and not e.stats.cuda_graph
    torch.testing.assert_close(torch.tensor(g.stats.loss), torch.tensor(e.stats.loss), rtol=1e-3, atol=0)


@pytest.mark.cuda
def test_cuda_graph_follows_a_learning_rate_schedule():
    """The captured step reads its rate from a device tensor that set_lr refills: the graph
    replays follow the step schedule as the eager fast path does (and differ from a
    constant rate)."""
    net = build_extractor(W)
    args = (_smooth(64, 96, 1), [(_img(96, 96, 2), 1.0)])
    sched = dict(size=96, steps=12, device="cuda", precision="fp32", lr_schedule="step", lr_decay_every=2,
                 lr_gamma=0.3)
    g = run(*args, _settings(**sched), extractor=net)
    e = run(*args, _settings(cuda_graph=False, **sched), extractor=net)
    c = run(*args, _settings(size=96, steps=12, device="cuda", precision="fp32"), extractor=net)
    assert g.stats.cuda_graph and not e.stats.cuda_graph
    torch.testing.assert_close(torch.tensor(g.stats.loss), torch.tensor(e.stats.loss), rtol=1e-3, atol=0)
    assert abs(g.stats.loss[-1] - c.stats.loss[-1]) > 1e-3 * abs(c.stats.loss[-1])
