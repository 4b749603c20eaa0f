"""`nst stylize` and `nst demo` through the command line: results, stops and every error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main
from nst.inputs import parse_style_spec

W = "random:3"


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 72), Image.BICUBIC).save(tmp_path / "content.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(tmp_path / "style.jpg")
    Image.fromarray(rng.integers(0, 256, size=(80, 48, 3), dtype=np.uint8)).save(tmp_path / "style2.png")
    return tmp_path


def _args(d, *extra, out="out.png"):
    return ["-q", "stylize", str(d / "content.png"), "--style", str(d / "style.jpg"), "-o", str(d / out),
            "--weights", W, "--size", "64", "--steps", "4", "--device", "cpu", *extra]


def _one_error_line(err):
    lines = [l for l in err.strip().splitlines() if l.startswith("nst: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_stylize_writes_image_and_stats(images, capsys):
    code = main(_args(images, "--stats", str(images / "stats.json"), "--style", f"{images / 'style2.png'}:0.3"))
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "cpu fp32 fast path" in out
    with Image.open(images / "out.png") as im:
        assert im.size == (64, 48) and im.mode == "RGB"
    stats = json.loads((images / "stats.json").read_text())
    assert stats["steps_run"] == 4 and len(stats["loss"]) == 4 and stats["weights"] == W
    assert stats["total_s"] >= stats["setup_s"] + stats["loop_s"] > 0  # single-scale runs record it too
    # The CPU default step: eager, nothing compiled or captured, not chosen by a trial.
    assert (stats["step_variant"], stats["compile_s"], stats["capture_s"], stats["variant_choice"]) == ("eager", 0, 0,
                                                                                                        None)


@pytest.mark.slow
def test_compile_seconds_and_the_step_are_in_the_stats_of_every_scale(images):
    """--compile --stats: which step ran and what its compile cost, for the render and for
    each scale of a multi-scale one (each size compiles once)."""
    code = main(_args(images, "--compile", "--size", "40", "--scales", "32", "--steps", "2", "--content-layers",
                      "relu2_1", "--style-layers", "relu1_1,relu2_1", "--stats", str(images / "c.json")))
    assert code == 0
    stats = json.loads((images / "c.json").read_text())
    assert stats["step_variant"] == "compiled" and stats["compile_s"] > 0 and stats["capture_s"] == 0
    assert [s["size"] for s in stats["scales"]] == [32, 40]
    for scale in stats["scales"]:
        assert scale["step_variant"] == "compiled" and scale["compile_s"] > 0, scale
        assert scale["capture_s"] == 0 and scale["variant_cached"] is None  # on the CPU: no graph, no trial
    assert stats["scales"][-1]["compile_s"] == stats["compile_s"]


@pytest.mark.slow
def test_stylize_subprocess_end_to_end(images):
    r = subprocess.run([sys.executable, "-m", "nst", *_args(images, out="sub.jpg")[1:]],
                       capture_output=True, text=True, env=dict(os.environ, NST_OFFLINE="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NOT a trained network" in r.stderr
    with Image.open(images / "sub.jpg") as im:
        assert im.format == "JPEG"


def test_save_every_writes_intermediates(images):
    assert main(_args(images, "--save-every", "2")) == 0
    assert (images / "out_00002.png").exists() and (images / "out_00004.png").exists()


def test_save_every_and_gif_frames_count_steps_over_all_scales(images):
    """Two scales of 7 steps: intermediates at render steps 5 and 10 (the second inside the
    second scale), and a GIF frame every 3 render steps plus the final image."""
    code = main(_args(images, "--steps", "7", "--scales", "48", "--save-every", "5", "--gif", str(images / "g.gif"),
                      "--gif-every", "3"))
    assert code == 0
    saved = sorted(p.name for p in images.glob("out_*.png"))
    assert saved == ["out_00005.png", "out_00010.png"]
    with Image.open(images / "g.gif") as gif:
        assert gif.n_frames == 4 + 1  # render steps 3, 6, 9, 12, then the image written


def test_init_from_file(images):
    assert main(_args(images, "--init", str(images / "style2.png"))) == 0


def test_interrupt_writes_best_image_and_says_so(images, monkeypatch, capsys):
    from nst.engine import steppers as opt

    real = opt.AdamStep.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(opt.AdamStep, "step", step)
    code = main(_args(images, "--steps", "50"))
    assert code == 130
    assert "stopped early (interrupted by SIGINT) after 2 of 50 steps" in capsys.readouterr().err
    assert (images / "out.png").exists()


def test_nan_keeps_last_good_image_and_exits_1(images, monkeypatch, capsys):
    from nst.engine import objective as opt

    real = opt.WholeImage._evaluate
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += 1
        parts = real(self, x)
        return parts * float("nan") if calls["n"] > 3 else parts

    monkeypatch.setattr(opt.WholeImage, "_evaluate", poisoned)
    code = main(_args(images, "--steps", "20", "--progress-every", "2"))
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "NaN or Inf at step 4 of 20" in line and "last good image is from step 2" in line and "wrote it to" in line
    assert (images / "out.png").exists()


def test_style_spec_parsing():
    assert parse_style_spec("a.jpg") == ("a.jpg", 1.0)
    assert parse_style_spec("a.jpg:0.3") == ("a.jpg", 0.3)
    assert parse_style_spec("C:/dir/a.jpg") == ("C:/dir/a.jpg", 1.0)
    assert parse_style_spec("dir:x/a.jpg:2") == ("dir:x/a.jpg", 2.0)


@pytest.mark.parametrize("case,message", [
    ("missing", "file not found"),
    ("directory", "is a directory"),
    ("truncated", "truncated or corrupt"),
    ("text", "not an image file"),
    ("empty", "file is empty"),
    ("bomb", "over the limit"),
    ("small-size", "too small for the network"),
    ("small-image", "too small"),
    ("extension", "unknown output extension .bmp"),
    ("weights", "weights file not found"),
    ("layer", "unknown tap 'relu7_1'"),
    ("style-weight", "style weights must not all be zero"),
    ("precision", "needs a CUDA GPU"),
    ("extractor", "has no manifest.json"),
])
def test_errors_are_one_line_and_write_nothing(images, capsys, case, message):
    d = images
    content = d / "content.png"
    extra, out = [], "out.png"
    if case == "missing":
        content = d / "nope.png"
    elif case == "directory":
        content = d
    elif case == "truncated":
        data = (d / "style.jpg").read_bytes()
        content = d / "cut.jpg"
        content.write_bytes(data[: len(data) // 2])
    elif case == "text":
        content = d / "notes.png"
        content.write_text("not an image")
    elif case == "empty":
        content = d / "empty.png"
        content.write_bytes(b"")
    elif case == "bomb":
        extra = ["--max-pixels", "1000"]
    elif case == "small-size":
        extra = ["--size", "16"]
    elif case == "small-image":
        content = d / "tiny.png"
        Image.new("RGB", (12, 12)).save(content)
    elif case == "extension":
        out = "out.bmp"
    elif case == "weights":
        extra = ["--weights", str(d / "nope.pth")]
    elif case == "layer":
        extra = ["--style-layers", "relu1_1,relu7_1"]
    elif case == "style-weight":
        extra = ["--style", f"{d / 'style2.png'}:0"]
    elif case == "precision":
        extra = ["--precision", "bf16"]
    elif case == "extractor":
        extra = ["--extractor", str(d)]
    weights = [] if case == "extractor" else ["--weights", W]  # an export carries its own weights
    args = ["-q", "stylize", str(content), "--style", str(d / "style.jpg") + (":0" if case == "style-weight" else ""),
            "-o", str(d / out), *weights, "--size", "64", "--steps", "2", "--device", "cpu", *extra]
    code = main(args)
    assert code == 1
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (d / out).exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".out")], "no temporary file left"


def test_demo_runs_and_says_which_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))  # no cached checkpoint: random weights
    code = main(["-q", "demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--size", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "seeded random weights (random:0): NOT a trained network" in out
    for name in ("content.png", "style.png", "result.png", "sheet.png"):
        assert (tmp_path / "demo" / name).exists(), name
    with Image.open(tmp_path / "demo" / "sheet.png") as im:
        assert im.width > 3 * 64


def test_demo_prefers_cached_imagenet(tmp_path, monkeypatch, full_model_state):
    from nst.engine import demo
    from nst.engine.weights import IMAGENET_URLS

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert demo.pick_weights("auto") == "random:0"
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / IMAGENET_URLS["vgg19"].rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save(full_model_state, ckpt)
    assert demo.pick_weights("auto") == "imagenet"


def test_time_limit_through_cli(images, capsys):
    code = main(_args(images, "--steps", "100000", "--time-limit", "1"))
    assert code == 0
    assert "stopped early (the time limit was reached)" in capsys.readouterr().err
    assert (images / "out.png").exists()
