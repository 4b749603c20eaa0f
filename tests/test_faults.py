"""Faults at the edges: disks, paths, special files, signals, overflow, diverged runs.

Every case ends in one clear line on stderr and a non-zero exit (or succeeds correctly),
with no traceback, no half-written file and no special file or link replaced. The cases
that need a small or read-only filesystem mount a tmpfs (CI runs as root); they skip
where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main
from nst.engine import StylizeSettings, stylize
from nst.engine.errors import InputError, WeightsError
from nst.engine.weights import resolve_weights

W = "random:3"


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((96, 72), Image.BICUBIC).save(
        tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path


def _stylize(d, *extra, out=None):
    return ["-q", "stylize", str(d / "c.png"), "--style", str(d / "s.png"), "-o", str(out or d / "o.png"),
            "--weights", W, "--size", "64", "--steps", "2", "--device", "cpu", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("nst: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def mount(tmp_path):
    """mount(size, read_only=False) -> a directory on a fresh tmpfs of that size."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"needs a tmpfs mount (root; CI runs as root): {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


# 1. A full disk: the render is not lost.
def test_full_disk_keeps_the_image_and_names_where(images, mount, capsys):
    full = mount("4k")
    code = main(_stylize(images, "--size", "128", out=full / "o.png"))
    assert code == 1
    line = _one_line(capsys)
    assert "no space left on the device" in line and "was written to" in line, line
    rescued = Path(line.rsplit("was written to ", 1)[1].split(" instead")[0])
    with Image.open(rescued) as im:
        assert im.size == (128, 96)
    rescued.unlink()
    assert list(full.iterdir()) == [], "no partial file on the full disk"


# 2. Output paths are checked before any work.
def test_output_paths_are_checked_before_work(images, mount, capsys, tmp_path):
    ro = mount("1m", read_only=True)
    checks = [
        (_stylize(images, "--stats", str(ro / "s.json")), "not writable"),
        (_stylize(images, out=images / "c.png" / "o.png"), "is not a directory"),
        (["-q", "targets", str(images / "c.png"), "--style", str(images / "s.png"), "--extractor", str(images),
          "-o", str(ro / "t.pt")], "not writable"),
        (["-q", "export", "--weights", W, "--out", str(ro / "exp")], "cannot write there"),
    ]
    for argv, message in checks:
        t0 = time.perf_counter()
        assert main(argv) == 1, argv
        assert message in _one_line(capsys), argv
        assert time.perf_counter() - t0 < 5, "refused before any work"
    assert not (images / "o.png").exists()


# 3. Special files and links are never replaced.
def test_special_files_are_refused_and_links_written_through(images, capsys):
    assert main(_stylize(images, "--stats", "/dev/null")) == 1
    assert "not a regular file" in _one_line(capsys)
    fifo = images / "fifo"
    os.mkfifo(fifo)
    assert main(_stylize(images, out=images / "x.png", *("--stats", str(fifo)))) == 1
    assert "not a regular file" in _one_line(capsys) and fifo.is_fifo()
    # A link is written through: it stays a link, its target gets the file.
    (images / "real.png").write_bytes(b"")
    (images / "link.png").symlink_to(images / "real.png")
    (images / "stats-real.json").write_text("{}")
    (images / "stats.json").symlink_to(images / "stats-real.json")
    assert main(_stylize(images, "--stats", str(images / "stats.json"), out=images / "link.png")) == 0
    assert (images / "link.png").is_symlink() and (images / "stats.json").is_symlink()
    with Image.open(images / "real.png") as im:
        assert im.size == (64, 48)
    assert json.loads((images / "stats-real.json").read_text())["steps_run"] == 2


# 4. Huge sizes meet the memory plan, before anything is resized.
@pytest.mark.parametrize("extra,message", [
    (["--size", "100000"], "needs about"),
    (["--resize", "100000x100000"], "needs about"),
    (["--style-scale", "1000"], "lower --style-scale"),
])
def test_huge_sizes_are_refused_by_the_memory_plan(images, capsys, extra, message):
    assert main(_stylize(images, *extra)) == 1
    assert message in _one_line(capsys)
    assert not (images / "o.png").exists()


# 5. Seeds that do not fit.
def test_seeds_out_of_range(images, capsys):
    assert main(_stylize(images, "--seed", str(2**64), "--init", "noise")) == 1
    assert "--seed must be an integer from 0 to 2**63-1" in _one_line(capsys)
    assert main(_stylize(images, "--weights", f"random:{2**64}")) == 1
    assert "the seed after 'random:' must be an integer from 0 to 2**63-1" in _one_line(capsys)
    with pytest.raises(WeightsError):
        resolve_weights("random:-1")


# 6. The export under faults leaves nothing behind.
def test_export_on_a_full_disk_is_refused_before_writing(mount, capsys):
    full = mount("1m")
    assert main(["-q", "export", "--weights", W, "--out", str(full / "exp"), "--trace-size", "64x64",
                 "--check-size", "80x48"]) == 1
    assert "MB free" in _one_line(capsys)
    assert [p.name for p in (full / "exp").iterdir()] == []


def test_export_cleans_the_leftovers_of_killed_exports(tmp_path):
    from nst.export import ExportSettings, export_extractor

    out = tmp_path / "exp"
    dead = out / ".nst-export-999999999-abcd"
    dead.mkdir(parents=True)
    (dead / "extractor.ts").write_bytes(b"x" * 100)
    export_extractor(ExportSettings(out=out, weights=W, taps=("relu1_1",), formats=("torchscript",),
                                    trace_size="64x64", check_size="80x48"))
    assert not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == ["extractor.ts", "manifest.json"]


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_staging_directory(tmp_path):
    out = tmp_path / "exp"
    p = subprocess.Popen([sys.executable, "-m", "nst", "-q", "export", "--weights", W, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, NST_OFFLINE="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".nst-export-*")):
        time.sleep(0.05)
    assert list(out.glob(".nst-export-*")), "the export never started staging"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []


# 7. A diverged run does not "succeed".
def test_diverged_runs_fail_with_the_likely_cause(images, capsys):
    assert main(_stylize(images, "--lr", "inf")) == 1
    assert "--lr must be a positive finite number" in _one_line(capsys)
    assert main(_stylize(images, "--style-weight", "1e40")) == 1
    assert "--style-weight must be a number from 0 to 1e+30" in _one_line(capsys)
    assert main(_stylize(images, "--lr", "1e6", "--steps", "10", "--progress-every", "1")) == 1
    line = _one_line(capsys)
    assert "never went below its first value" in line and "learning rate" in line and str(images / "o.png") in line
    assert (images / "o.png").exists()  # the image is still written, and named
    # A recipe's rate kept for another optimiser: named in the diagnosis (and in a short run's note).
    from nst.engine.stats import RunStats
    from nst.engine.summary import diagnose

    stats = RunStats(steps_planned=10, steps_run=10, loss=[3.5] * 10, first_loss=3.5, image_from_step=0)
    found = diagnose(stats, StylizeSettings(optimizer="adam", lr=1.0), "gatys")
    assert found.diverged and "--recipe gatys sets --lr for its own optimizer (lbfgs)" in found.text
    assert main(_stylize(images, "--recipe", "gatys", "--optimizer", "adam", "--size", "64", "--steps", "3",
                         "--progress-every", "1")) == 0
    err = capsys.readouterr().err
    assert "not gone below its first value" in err and "--recipe gatys sets --lr for its own optimizer" in err


# 7b. A short run is not called a failure: before MIN_STEPS (10) steps divergence cannot be
# told from a normal start (Adam's first steps often raise the loss).
def test_a_short_run_that_has_not_improved_yet_is_a_note_not_a_failure(images, capsys):
    assert main(_stylize(images, "--lr", "1e6", "--steps", "2", "--progress-every", "1")) == 0
    err = capsys.readouterr().err
    assert "nst: note: the loss has not gone below its first value" in err and "in 2 steps yet" in err, err
    assert "judged from step 10" in err and "nst: error" not in err and (images / "o.png").exists()


# 8. Signals stop a render as Ctrl-C does, and the image is written.
def _render_then_signal(images, signals, gap=0.0):
    out = images / "sig.png"
    p = subprocess.Popen([sys.executable, "-m", "nst", "stylize", str(images / "c.png"), "--style",
                          str(images / "s.png"), "-o", str(out), "--weights", W, "--size", "64", "--steps", "100000",
                          "--progress-every", "1", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, NST_OFFLINE="1"))
    err = []
    for line in p.stderr:  # not a terminal: one log line per step
        err.append(line)
        if line.startswith("nst: step 3/"):
            break
    for s in signals:
        p.send_signal(s)
        time.sleep(gap)
    out_text, rest = p.communicate(timeout=120)
    return p.returncode, "".join(err) + rest, out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_write_the_best_image(images, sig):
    code, err, out = _render_then_signal(images, [sig])
    assert code == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    with Image.open(out) as im:
        assert im.size == (64, 48)


@pytest.mark.slow
def test_two_quick_ctrl_c_still_write_the_image(images):
    code, err, out = _render_then_signal(images, [signal.SIGINT, signal.SIGINT], gap=0.01)
    assert code == 130 and "Traceback" not in err, err
    assert out.exists()


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line(images):
    p = subprocess.Popen([sys.executable, "-m", "nst", *_stylize(images)[1:]], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, NST_OFFLINE="1"))
    time.sleep(0.6)  # inside the imports
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert p.returncode in (0, 130)  # 0 only if the whole render was faster than the signal


# 9. Quick benchmark checks never overwrite the committed results.
def test_quick_benchmarks_write_elsewhere():
    from nst.bench.report import RESULTS, results_dir

    assert results_dir(None, quick=False) == RESULTS
    quick = results_dir(None, quick=True)
    assert quick.is_dir() and RESULTS.resolve() not in quick.resolve().parents
    quick.rmdir()
    assert results_dir("mine", quick=True) == Path("mine")


# 11. The API checks what the command line checks.
def test_api_validates_style_weights_like_the_cli(images):
    c, s = images / "c.png", images / "s.png"
    settings = StylizeSettings(size=64, steps=1, weights=W, device="cpu")
    for bad in ([(s, -1.0), (c, 2.0)], [(s, float("nan"))], [(s, -1.0)], [(s, float("inf"))]):
        with pytest.raises(InputError, match="bad style weight"):
            stylize(c, bad, settings)
    with pytest.raises(InputError, match="must not all be zero"):
        stylize(c, [(s, 0.0)], settings)
    r = stylize(c, (str(s), 0.3), settings)  # one (image, weight) pair
    assert r.image.shape == (3, 48, 64)
    assert torch.isfinite(r.image).all()


def test_newcomer_slips(images, capsys, tmp_path):
    """Found by following the README as a newcomer."""
    # --out under a directory that does not exist is refused, not created.
    assert main(["-q", "export", "--weights", W, "--out", str(tmp_path / "nope" / "exp")]) == 1
    assert "does not exist" in _one_line(capsys) and not (tmp_path / "nope").exists()
    assert main(["-q", "demo", "--out", str(tmp_path / "nope" / "demo")]) == 1
    assert "does not exist" in _one_line(capsys) and not (tmp_path / "nope").exists()
    # A weight that is not a number, after a file that exists, is a bad weight, not a missing file.
    assert main(_stylize(images, "--style", f"{images / 's.png'}:abc")) == 1
    assert "bad style weight" in _one_line(capsys)
    # The summary line says when the weights were random.
    assert main(_stylize(images)) == 0
    assert "seeded random weights, NOT a trained network" in capsys.readouterr().out


def test_api_progress_shows_without_logging_set_up(tmp_path):
    code = ("import nst.engine\nfrom nst.engine.demo import make_content, make_style\n"
            "nst.engine.stylize(make_content(), make_style(), weights='random:0', size=64, steps=3, "
            "progress_every=1, device='cpu', progress=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, NST_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert "step 3/3 loss" in r.stderr, r.stderr



# 12. No output replaces an input or another output (issue #27): paths, symlinks, hard links.
def test_no_output_replaces_an_input_or_another_output(images, capsys, tmp_path):
    d = images
    c, st = d / "c.png", d / "s.png"
    (d / "w.pth").write_bytes(b"weights")
    export = d / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    (d / "link.png").symlink_to(c)
    os.link(st, d / "hard.png")
    before = {p: p.read_bytes() for p in (c, st, d / "w.pth", export / "manifest.json")}
    cases = [
        (["--state", str(c)], "--state", "is the content image"),
        (["--stats", str(c)], "--stats", "is the content image"),
        ([], "-o", "is the style image", dict(out=st)),
        ([], "-o", "is the content image", dict(out=d / "link.png")),
        (["--stats", str(d / "hard.png")], "--stats", "is the style image"),
        (["--stats", str(d / "link.png")], "--stats", "(the same file under another name)"),
        (["--state", str(d / "o.png")], "--state", "is the -o"),
        (["--init", str(c), "--stats", str(d / "c.png")], "--stats", "is the content image"),
        (["--stats", str(d / "w.pth"), "--weights", str(d / "w.pth")], "--stats", "is the --weights file"),
        (["--stats", str(export / "manifest.json"), "--extractor", str(export), "--weights", "imagenet"],
         "--stats", "is the --extractor file"),
        (["--progress", str(d / "c")], "--progress's image", "is the content image"),
        (["--gif", str(d / "g.gif"), "--stats", str(d / "g.gif")], "--gif", "is the --stats"),
        (["--variant-cache", str(c)], "--variant-cache", "is the content image"),
    ]
    for extra, label, msg, *kw in cases:
        args = _stylize(d, *extra, **(kw[0] if kw else {}))
        if "--weights" in extra or "--extractor" in extra:  # the test's own --weights goes
            i = args.index("--weights")
            del args[i:i + 2]
        assert main(args) == 1, extra
        line = _one_line(capsys)
        assert line.startswith(f"nst: error: {label} ") and msg in line, (extra, line)
    # --save-every's numbered files: one of them is the content image.
    os.replace(c, d / "o_00002.png")
    assert main(_stylize(d, "--save-every", "2", "--style", str(d / "o_00002.png"))) == 1
    assert "--save-every" in _one_line(capsys)
    os.replace(d / "o_00002.png", c)
    assert {p: p.read_bytes() for p in before} == before
    assert not (d / "o.png").exists() and not list(d.glob("*.lock"))


# 13. Extreme numbers: one line before any work, not a traceback or a huge allocation.
@pytest.mark.parametrize("flag,value", [("--time-budget", "inf"), ("--time-budget", "1e300"), ("--time-budget", "nan"),
                                        ("--time-limit", "inf"), ("--rank-timeout", "inf"), ("--style-scale", "inf"),
                                        ("--loss-scale", "inf"), ("--memory-limit", "1e300"),
                                        ("--scale-factor", "inf"), ("--time-budget", "1e9")])
def test_extreme_numbers_are_one_line(images, capsys, flag, value):
    assert main(_stylize(images, flag, value)) == 1
    line = _one_line(capsys)
    assert line.startswith(f"nst: error: {flag} must be"), line
    assert not (images / "o.png").exists()


def test_huge_step_counts_allocate_nothing_up_front(images, capsys):
    """--steps 2000000000 with a time limit: the per-step history grows with the run (2e9
    steps at 16 bytes would be 32 GB)."""
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(_stylize(images, "--steps", "2000000000", "--time-limit", "3", "--progress-every", "1000")) == 0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 2 * 2**20, grown_kib  # under 2 GiB of new peak (the buffers would be 32 GB)
    assert "stopped early (the time limit was reached)" in capsys.readouterr().err


# 14. --time-limit under --time-budget: the earlier end wins.
def test_time_limit_under_a_budget(images, capsys):
    t0 = time.perf_counter()
    code = main(_stylize(images, "--time-budget", "1e6", "--time-limit", "8", "--scales", "48", "--steps", "50",
                         "--stats", str(images / "st.json")))
    assert code == 0
    assert time.perf_counter() - t0 < 60  # the budget would run for 11 days
    captured = capsys.readouterr()
    assert "stopped early (the time limit was reached)" in captured.err, captured
    st = json.loads((images / "st.json").read_text())
    assert st["stopped"] == "time-limit" and st["scales"][-1]["why"] == "--time-limit"


# 15. nst demo stopped by a signal says so and exits 128 + the signal.
@pytest.mark.slow
def test_demo_stopped_by_a_signal(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "nst", "demo", "--out", str(tmp_path / "demo"), "--size", "64",
                          "--steps", "100000", "--weights", "random:0", "--device", "cpu"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, NST_OFFLINE="1"))
    for line in p.stderr:  # not a terminal: one log line per progress interval
        if line.startswith("nst: step 26/"):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped early (interrupted by SIGTERM)" in err and "Traceback" not in err, err
    assert "wrote" in out and (tmp_path / "demo" / "result.png").exists()


# 16. A --state on a full disk: a warning that says so, and the render goes on.
def test_a_state_on_a_full_disk_is_named_so(images, mount, capsys):
    full = mount("64k")
    assert main(_stylize(images, "--state", str(full / "st.pt"), "--size", "128")) == 0
    err = capsys.readouterr().err
    assert "cannot write --state" in err and "no space left on the device" in err and "enforce fail" not in err, err
    assert (images / "o.png").exists() and not (full / "st.pt").exists()


def test_newcomer_slips_of_issue_27(images, capsys):
    """-q means quiet (the random-weights note goes; the last line still says it); --tile
    off the network's grid is refused, and the plan names what small tiles cost."""
    assert main(_stylize(images)) == 0
    captured = capsys.readouterr()
    assert "using random" not in captured.err and "NOT a trained network" in captured.out
    for tile in ("1", "15", "17"):
        assert main(_stylize(images, "--tile", tile)) == 1
        assert "use a multiple of 16" in _one_line(capsys)
    assert main(["stylize", *_stylize(images, "--tile", "16")[2:]]) == 0
    err = capsys.readouterr().err
    assert "16 px tiles" in err and "each step computes" in err and "x the image's pixels" in err, err
