"""Recipes (issue 8): every classic configuration parses into the settings it describes,
runs on the CPU and lowers its loss; the features they need (Gram normalisations, learning
rate schedules and units, --resize, --gif) do what they say."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from nst import flags
from nst.engine import demo, recipes
from nst.cli import build_parser, main
from nst.engine.errors import InputError
from nst.engine.imageio import pil_to_tensor
from nst.engine.loop import run
from nst.engine.session import prepare
from nst.engine.settings import IMAGENET_STD_MEAN, StylizeSettings
from nst.jobs import StylizeJob

# The table, written out independently of engine/recipes.py: field -> value.
CONV_STYLE = "conv1_1,conv2_1,conv3_1,conv4_1,conv5_1"
EXPECTED = {
    "gatys": {
        "content_layers": (("relu4_2", 1.0),),
        "style_layers": tuple((f"relu{b}_1", 0.2) for b in range(1, 6)),
        "optimizer": "lbfgs", "pool": "avg", "size": 512, "resize": None, "gram_norm": "4n2m2",
        "content_norm": "half-sum", "init": "noise", "tv_weight": 0.0, "style_weight": 1e3, "content_weight": 1.0,
    },
    "gatys-code": {
        "content_layers": (("relu4_2", 1.0),),
        "style_layers": tuple((f"relu{b}_1", 1e3 / n ** 2) for b, n in zip(range(1, 6), (64, 128, 256, 512, 512))),
        "optimizer": "lbfgs", "pool": "avg", "size": 512, "gram_norm": "hw", "content_norm": "mean",
        "init": "content", "style_weight": 1.0, "content_weight": 1.0,
    },
    "udacity": {
        "content_layers": (("conv4_2", 1.0),),
        "style_layers": (("conv1_1", 1.0), ("conv2_1", 0.75), ("conv3_1", 0.2), ("conv4_1", 0.2), ("conv5_1", 0.2)),
        "gram_norm": "raw-chw", "content_norm": "mean", "optimizer": "adam", "lr": 0.003, "lr_units": "imagenet",
        "style_weight": 1e6, "content_weight": 1.0, "size": 400, "resize": None, "init": "content",
        "lr_schedule": "constant", "network": "vgg19",
    },
    "plain-adam": {
        "content_layers": tuple((n, 1.0) for n in CONV_STYLE.split(",")),
        "style_layers": tuple((n, 1.0) for n in CONV_STYLE.split(",")),
        "content_weight": 1.0, "style_weight": 1e3, "optimizer": "adam", "lr": 0.03, "lr_units": "pixel",
        "resize": "911x512", "init": "content", "gram_norm": "raw",
    },
    "vgg16": {
        "network": "vgg16", "content_layers": (("relu4_3", 1.0),),
        "style_layers": tuple((n, 0.25) for n in ("relu1_2", "relu2_2", "relu3_3", "relu4_3")),
        "pool": "avg", "gram_norm": "4n2m2", "optimizer": "adam", "lr_schedule": "step", "lr_decay_every": 100,
        "lr_gamma": 0.7, "init": "content",
    },
    "lbfgs-normalised": {
        "optimizer": "lbfgs", "resize": "512x512", "steps": 500, "gram_norm": "chw", "content_norm": "mean",
        "content_layers": (("conv2_2", 1.0),),
        "style_layers": tuple((n, 1.0) for n in ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")),
    },
}
FILES = ["stylize", "c.png", "--style", "s.png", "-o", "o.png"]


def _job(*argv) -> StylizeSettings:
    """The settings of an `nst stylize` command line."""
    argv = FILES + list(argv)
    return flags.from_args(StylizeJob, build_parser(argv).parse_args(argv)).settings


def _check(settings, expected):
    content, style = settings.layer_weights()
    for field, want in expected.items():
        got = {"content_layers": content, "style_layers": style}.get(field, getattr(settings, field))
        if isinstance(want, tuple):
            assert [n for n, _ in got] == [n for n, _ in want], field
            assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12), field
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), field
        else:
            assert got == want, field


def test_every_recipe_in_the_table_exists():
    assert set(recipes.RECIPES) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recipe_flag_parses_into_the_settings_field_by_field(name):
    _check(_job("--recipe", name), EXPECTED[name])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recipe_equals_its_plain_flags(name):
    """`nst recipes` prints flags that give exactly the recipe's settings without --recipe."""
    via_recipe, via_flags = _job("--recipe", name), _job(*recipes.flags(name))
    assert via_flags == via_recipe
    _check(via_flags, EXPECTED[name])
    assert recipes.settings(name) == StylizeSettings(**{
        f: getattr(via_recipe, f) for f in StylizeSettings.__dataclass_fields__})


def test_flags_beside_a_recipe_override_it():
    job = _job("--recipe", "udacity", "--lr", "0.01", "--steps", "7")
    assert job.lr == 0.01 and job.steps == 7 and job.gram_norm == "raw-chw" and job.lr_units == "imagenet"
    # An explicit --size replaces the recipe's exact --resize; without it, --resize stays.
    assert _job("--recipe", "plain-adam", "--size", "256").resize is None
    assert _job("--recipe", "plain-adam").resize == "911x512"
    assert recipes.settings("plain-adam", size=256).resize is None
    assert recipes.settings("plain-adam", size=256, resize="300x200").resize == "300x200"


def test_recipe_cli_errors_and_listing(capsys):
    with pytest.raises(SystemExit) as e:
        main(FILES + ["--recipe", "gatsby"])
    assert e.value.code == 2 and "invalid choice: 'gatsby'" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown recipe 'gatsby'; choose one of gatys"):
        recipes.settings("gatsby")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}: " in out for n in EXPECTED) and "--gram-norm raw-chw" in out
    assert main(["recipes", "udacity"]) == 0
    assert "in-place ReLU" in capsys.readouterr().out


def test_targets_take_a_recipe_but_not_its_schedule():
    argv = ["targets", "c.png", "--style", "s.png", "-o", "t.pt", "--extractor", "exp", "--recipe", "vgg16"]
    ns = build_parser(argv).parse_args(argv)
    assert ns.gram_norm == "4n2m2" and ns.content_layers == "relu4_3"
    assert not hasattr(ns, "lr_schedule")  # the C++ host runs a constant rate


@pytest.fixture(scope="module")
def drawn():
    # Structured pictures: uniform noise has nearly the Gram of any other noise.
    return pil_to_tensor(demo.make_content()), pil_to_tensor(demo.make_style(seed=0))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recipe_runs_and_lowers_its_loss(name, drawn):
    """A few CPU steps with random weights. A random network's Gram matrices are about 100x
    smaller than ImageNet VGG's (engine/demo.py), so the style weight is raised 100x, as the
    demo does; everything else is the recipe's."""
    content, style = drawn
    base = recipes.settings(name)
    s = recipes.settings(name, weights="random:0", device="cpu", steps=8, progress_every=1, style_weight=base.style_weight * 100,
                         **({"resize": "96x54"} if base.resize else {"size": 64}))
    r = run(content, [(style, 1.0)], s)
    assert r.stats.steps_run == 8 and r.stats.optimizer == base.optimizer
    assert all(math.isfinite(v) for v in r.stats.loss)
    assert r.stats.final_loss < 0.97 * r.stats.loss[0]  # udacity's small rate: 6% in 8 steps; others 40-90%
    assert r.stats.image_from_step > 0
    if base.resize:
        assert r.stats.size == (54, 96)


# -- loss normalisations -------------------------------------------------------------

@pytest.mark.parametrize("norm", ["chw", "hw", "4n2m2", "raw-chw", "raw"])
def test_gram_norms_match_their_formulas(norm, eager):
    """The engine's style term under each --gram-norm equals the formula written out on the
    unnormalised Gram F F^T (float64), for two layers of different shapes."""
    content, style, x = (torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(i)) for i in range(3))
    layers = "relu1_1:0.7,relu3_1:1.3"
    s = StylizeSettings(style_layers=layers, content_layers="relu2_1", gram_norm=norm, reference=True,
                        weights="random:0", size=56, device="cpu")
    p = prepare(content[0], [(style[0], 1.0)], s, extractor=eager)
    with torch.no_grad():
        got = p.objective.losses(x)[2].double()
        fx, fs = eager(x), eager(style)
    want = 0.0
    for (name, w) in s.layer_weights()[1]:
        i = eager.taps.index(name)
        a, b = fx[i][0].double(), fs[i][0].double()
        c, m = a.shape[0], a.shape[1] * a.shape[2]
        g, gs = a.reshape(c, m) @ a.reshape(c, m).T, b.reshape(c, m) @ b.reshape(c, m).T
        d2 = (g - gs).square()
        want += w * {"chw": (d2 / (c * m) ** 2).mean(), "hw": (d2 / m ** 2).mean(),
                     "4n2m2": d2.sum() / (4 * c**2 * m**2), "raw-chw": d2.mean() / (c * m), "raw": d2.mean()}[norm]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("norm", ["mean", "half-sum"])
def test_content_norms_match_their_formulas(norm, eager):
    content, style, x = (torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(10 + i)) for i in range(3))
    s = StylizeSettings(content_layers="relu2_1:0.5,relu4_2", content_norm=norm, reference=True, size=56,
                        device="cpu")
    p = prepare(content[0], [(style[0], 1.0)], s, extractor=eager)
    with torch.no_grad():
        got = p.objective.losses(x)[1].double()
        fx, fc = eager(x), eager(content)
    want = 0.0
    for name, w in (("relu2_1", 0.5), ("relu4_2", 1.0)):
        i = eager.taps.index(name)
        d2 = (fx[i].double() - fc[i].double()).square()
        want += w * (d2.mean() if norm == "mean" else 0.5 * d2.sum())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# -- learning rates ------------------------------------------------------------------

def test_lr_schedules_and_units():
    s = StylizeSettings(lr=0.1, steps=10, lr_schedule="step", lr_decay_every=3, lr_gamma=0.5)
    assert [s.lr_at(i) for i in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])
    c = StylizeSettings(lr=0.1, steps=10, lr_schedule="cosine")
    lrs = [c.lr_at(i) for i in range(10)]
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert StylizeSettings(lr=0.1).lr_at(9) == 0.1
    assert StylizeSettings(lr=0.003, lr_units="imagenet").learning_rate == pytest.approx(0.003 * IMAGENET_STD_MEAN)
    assert IMAGENET_STD_MEAN == pytest.approx(0.226)
    for bad, msg in (({"lr_gamma": 0.0}, "--lr-gamma"), ({"lr_gamma": 1.5}, "--lr-gamma"),
                     ({"lr_decay_every": 0}, "--lr-decay-every"),
                     ({"lr_units": "imagenet", "optimizer": "lbfgs"}, "for Adam")):
        with pytest.raises(InputError, match=msg):
            StylizeSettings(**bad)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_step_schedule_changes_the_trajectory(optimizer, eager, drawn):
    """A step decay by 1e-6 after every step all but freezes the image after the first
    step, and the image ends where a one-step run's did; a constant rate keeps moving."""
    content, style = drawn
    common = dict(size=48, device="cpu", progress_every=1, optimizer=optimizer, reference=True, init="noise", lr=0.05
                  if optimizer == "adam" else 1.0)
    one = run(content, [(style, 1.0)], StylizeSettings(steps=1, **common), extractor=eager)
    frozen = run(content, [(style, 1.0)], StylizeSettings(steps=5, lr_schedule="step", lr_decay_every=1,
                                                          lr_gamma=1e-6, **common), extractor=eager)
    moving = run(content, [(style, 1.0)], StylizeSettings(steps=5, **common), extractor=eager)
    assert frozen.stats.loss[:2] == pytest.approx(moving.stats.loss[:2], rel=1e-6)  # the same first step
    assert frozen.stats.loss[1:] == pytest.approx([frozen.stats.loss[1]] * 4, rel=1e-4)
    assert frozen.stats.image_from_step == 5 and one.stats.image_from_step == 1
    torch.testing.assert_close(frozen.image, one.image, rtol=0, atol=1e-4)
    assert moving.stats.loss[4] < moving.stats.loss[1] * 0.99


# -- --resize ------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((120, 90)).save(tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path


def _cli(d, *extra):
    return ["-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o", str(d / "o.png"),
            "--weights", "random:1", "--device", "cpu", *extra]


@pytest.mark.slow
def test_plain_adam_recipe_writes_exactly_911x512(files):
    assert main(_cli(files, "--recipe", "plain-adam", "--steps", "1")) == 0
    with Image.open(files / "o.png") as im:
        assert im.size == (911, 512)


def test_resize_with_multiscale_keeps_the_exact_size():
    from nst.engine.multiscale import render

    r = render(torch.rand(3, 90, 120), [(torch.rand(3, 64, 64), 1.0)],
               StylizeSettings(resize="140x66", scales="70", steps=2, weights="random:1", progress_every=1,
                               device="cpu"))
    assert [tuple(s["hw"]) for s in r.stats.scales] == [(33, 70), (66, 140)]
    assert tuple(r.image.shape) == (3, 66, 140)


@pytest.mark.parametrize("spec", ["911", "911x", "x512", "axb", "0x512", "911x-2"])
def test_bad_resize_is_one_line_and_no_output(files, capsys, spec):
    assert main(_cli(files, "--resize", spec, "--steps", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("nst: error:") == 1 and "--resize" in err and "Traceback" not in err
    assert not (files / "o.png").exists()


# -- --gif ---------------------------------------------------------------------------

def test_gif_of_the_image_forming(files, capsys):
    assert main(_cli(files, "--size", "64", "--steps", "6", "--gif", str(files / "f.gif"), "--gif-every", "2",
                     "--save-every", "3")) == 0
    with Image.open(files / "f.gif") as im:
        assert im.format == "GIF" and im.is_animated and im.size == (64, 48)
        assert im.n_frames == 3  # steps 2, 4, 6 (the written image is step 6's)
    assert "(3 frames, 64x48)" in capsys.readouterr().out
    # --save-every still writes its frames beside the GIF's.
    assert sorted(p.name for p in files.glob("o_*.png")) == ["o_00003.png", "o_00006.png"]


def test_gif_spans_every_scale_and_is_scaled_down(files):
    assert main(_cli(files, "--resize", "640x64", "--scales", "320", "--steps", "2", "--gif", str(files / "m.gif"),
                     "--gif-every", "1")) == 0
    with Image.open(files / "m.gif") as im:
        assert im.n_frames == 4 and im.size == (512, 51)  # 2 steps per scale
    with Image.open(files / "o.png") as im:
        assert im.size == (640, 64)


@pytest.mark.parametrize("gif,msg", [("f.png", "must end in .gif"), ("nodir/f.gif", "does not exist")])
def test_bad_gif_path_is_one_line_and_no_output(files, capsys, gif, msg):
    assert main(_cli(files, "--size", "64", "--steps", "1", "--gif", str(files / gif))) == 1
    err = capsys.readouterr().err
    assert err.count("nst: error:") == 1 and msg in err
    assert not (files / "o.png").exists() and not list(files.glob("*.gif"))


# -- the Python API and the C++ host's targets -----------------------------------------

def test_api_takes_a_recipe(drawn):
    import nst.engine

    content, style = drawn
    r = nst.engine.stylize(content, style, recipe="lbfgs-normalised", weights="random:0", resize="72x40", steps=2,
                           device="cpu")
    assert tuple(r.image.shape) == (3, 40, 72) and r.stats.optimizer == "lbfgs" and r.stats.steps_run == 2


def test_targets_file_folds_the_normalisation_into_the_layer_weights(tmp_path, export_dir, drawn):
    """The C++ host computes mean losses; the weights it reads carry the factors."""
    import json

    from nst.export.targets_file import EXTRA_NAME, write_targets

    content, style = drawn
    s = StylizeSettings(extractor=str(export_dir), gram_norm="4n2m2", content_norm="half-sum", reference=True,
                        device="cpu", resize="64x48", style_layers="relu1_1:0.5,relu3_1", content_layers="relu4_2:2")
    p = prepare(content, [(style, 1.0)], s)
    info = write_targets(p, export_dir, tmp_path / "t.pt")
    # relu4_2: 512 channels at stride 8 -> 6x8; relu1_1: 64 channels; relu3_1: 256 channels.
    assert info["content_layers"] == [["relu4_2", pytest.approx(2 * 512 * 6 * 8 / 2)]]
    assert info["style_layers"] == [["relu1_1", pytest.approx(0.5 * 64**2 / 4)],
                                    ["relu3_1", pytest.approx(256**2 / 4)]]
    assert info["gram_norm"] == "4n2m2" and info["content_norm"] == "half-sum"
    files = {EXTRA_NAME: ""}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(tmp_path / "t.pt"), _extra_files=files)
    assert json.loads(files[EXTRA_NAME])["style_layers"] == info["style_layers"]


@pytest.mark.parametrize("extra,msg", [
    (["--lr-gamma", "2"], "--lr-gamma must be in (0, 1]"),
    (["--lr-decay-every", "0"], "--lr-decay-every must be at least 1"),
    (["--optimizer", "lbfgs", "--lr-units", "imagenet"], "--lr-units imagenet is for Adam"),
    (["--gif", "g.gif", "--gif-every", "-1"], "must be >= 0"),
    (["--recipe", "lbfgs-normalised", "--lr-units", "imagenet"], "--lr-units imagenet is for Adam"),
])
def test_bad_recipe_options_are_one_line_and_no_output(files, capsys, extra, msg):
    extra = [str(files / a) if a.endswith(".gif") else a for a in extra]
    assert main(_cli(files, "--size", "64", "--steps", "1", *extra)) == 1
    err = capsys.readouterr().err
    assert err.count("nst: error:") == 1 and msg in err and "Traceback" not in err
    assert not (files / "o.png").exists() and not list(files.glob("*.gif"))
