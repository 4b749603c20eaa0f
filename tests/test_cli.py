import json
import os
import subprocess
import sys

import pytest

from nst.cli import main
from nst.engine.manifest import MANIFEST_NAME


def _run(*args, env=None, timeout=300):
    e = dict(os.environ, NST_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "nst", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def _one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("nst: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_export_end_to_end(tmp_path):
    out = tmp_path / "exp"
    r = _run("export", "--weights", "random:7", "--out", str(out), "--taps", "relu1_1,relu3_1", "--pool", "avg",
             "--trace-size", "64x64", "--check-size", "72x40")
    assert r.returncode == 0, r.stderr
    # The export's own summary comes last on stdout, after any library warnings.
    assert r.stdout.strip().splitlines()[-1].startswith("  manifest")
    assert "exported vgg19 cut after relu3_1" in r.stdout
    assert "NOT a trained network" in r.stdout and "NOT a trained network" in r.stderr
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["taps"] == ["relu1_1", "relu3_1"] and m["pool"] == "avg" and m["weights"]["random"] is True
    assert m["weights"]["spec"] == "random:7"


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--weights", "--pool", "--taps", "--precision", "--channels-last", "--formats", "--opset",
                 "--trace-size", "--check-size", "--network"):
        assert flag in out, flag
    assert "(default: imagenet)" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "nope.pth"], "weights file not found: nope.pth"),
        (["--weights", "random:x"], "seed after 'random:' must be an integer"),
        (["--weights", "imagenet"], "not in the torch hub cache"),
        (["--weights", "random", "--taps", "relu9_1"], "unknown tap 'relu9_1'"),
        (["--weights", "random", "--trace-size", "64x64", "--check-size", "64x64"], "must differ"),
        (["--weights", "random", "--check-size", "big"], "bad size 'big'"),
        (["--weights", "random", "--opset", "11"], "opset 11 is too old"),
    ],
)
def test_export_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(["export", "--out", str(out), *args])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert message in line
    assert not (out / MANIFEST_NAME).exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--weights", "random"])  # --out missing
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "--out", "x", "--precision", "fp8"])
    assert e.value.code == 2


def test_wrong_shape_weights_file_through_cli(tmp_path, full_model_state):
    import torch

    bad = dict(full_model_state)
    bad["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    r = _run("export", "--weights", str(p), "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "'features.0.weight' (conv1_1 weight) has shape (32, 3, 3, 3)" in _one_error_line(r.stderr)
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_cli_types_follow_the_dataclass():
    """Optional numbers parse as numbers (a regression: `float | None` once parsed as str)."""
    from nst.cli import build_parser

    ns = build_parser().parse_args(["stylize", "c.png", "--style", "s.png", "-o", "o.png", "--lr", "0.5",
                                    "--time-limit", "2", "--steps", "3", "--original-colors"])
    assert ns.lr == 0.5 and ns.time_limit == 2.0 and ns.steps == 3 and ns.original_colors is True
    assert ns.style == ["s.png"] and ns.extractor is None


def _help_lines(argv):
    from nst.cli import build_parser

    parser = build_parser(argv)
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices[argv[0]].format_help().replace("\n                       ", " ").splitlines()


def test_help_prints_each_default_once():
    for cmd in ("stylize", "targets", "export", "demo", "bench", "bench-quality", "bench-recipes"):
        text = " ".join(_help_lines([cmd]))
        for part in text.split("(default:")[1:]:
            assert "(default:" not in part.split(")")[0], cmd
        assert "(default: )" not in text and "(default: ())" not in text, cmd


def test_targets_usage_requires_its_extractor_and_offers_no_loop_options():
    text = " ".join(_help_lines(["targets"]))
    usage = text.split("options:")[0]
    assert "--extractor DIR" in usage and "[--extractor DIR]" not in usage
    for loop_option in ("--scales", "--time-budget", "--checkpointing", "--steps", "--weights"):
        assert f"[{loop_option} " not in usage, loop_option


def test_version_names_nst_torch_and_the_device(capsys):
    import torch

    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("nst ") and lines[1].startswith(f"torch {torch.__version__}")
    assert lines[2].startswith("device: cuda" if torch.cuda.is_available() else "device: cpu")


def test_help_does_not_import_torch(tmp_path):
    """The parser and every subcommand's help come from plain dataclasses: quick."""
    code = ("import sys\nfrom nst.cli import build_parser\n"
            "for c in ('stylize', 'targets', 'export', 'demo', 'bench', 'bench-quality', 'bench-recipes', 'watch'):\n"
            "    build_parser([c]).format_help()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'PIL', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_sizes_are_width_by_height_everywhere():
    from nst.engine.sizes import parse_wxh, wxh
    from nst.export.settings import parse_size

    assert parse_wxh("911x512", "--resize") == (512, 911) == parse_size("911x512")
    assert wxh((512, 911)) == "911x512"


def test_contradictions_and_wording(tmp_path, capsys):
    from PIL import Image

    from nst.engine import StylizeSettings
    from nst.engine.errors import InputError
    from nst.engine.imageio import load_image

    Image.new("RGB", (64, 48)).save(tmp_path / "c.png")
    c = str(tmp_path / "c.png")

    def error(argv):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("nst: error:") == 1 and "Traceback" not in err, err
        return err

    assert "name it *.pt" in error(["-q", "targets", c, "--style", c, "--extractor", str(tmp_path), "-o",
                                    str(tmp_path / "t.png")])
    assert "--extractor and --weights both choose the network" in error(
        ["-q", "stylize", c, "--style", c, "-o", str(tmp_path / "o.png"), "--extractor", str(tmp_path), "--weights",
         "random:1"])
    with pytest.raises(InputError, match=r"64x48 is 3,072 pixels, over the limit of 100 \(--max-pixels"):
        load_image(tmp_path / "c.png", max_pixels=100)
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(InputError, match="a symlink that leads nowhere"):
        load_image(tmp_path / "loop.png")
    with pytest.raises(InputError, match="--extractor and --weights"):
        StylizeSettings(extractor="x", weights="random:0")


def test_recipe_pooling_against_an_export_says_who_asked(export_dir, capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "c.png")
    c = str(tmp_path / "c.png")
    assert main(["-q", "stylize", c, "--style", c, "-o", str(tmp_path / "o.png"), "--recipe", "gatys",
                 "--extractor", str(export_dir), "--size", "64", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "exported with max pooling, but the settings ask for avg (--pool, or a --recipe's)" in err, err
