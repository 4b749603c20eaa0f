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
             "--trace-size", "64x64", "--check-size", "40x72")
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
