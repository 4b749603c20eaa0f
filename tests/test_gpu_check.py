"""bench/gpu_check.sh on the CPU, in its dry mode (GPU_CHECK_DRY=FILE): each stage's control
flow runs, nothing heavy does, and every command a lent GPU would run is checked here with
nst's own parser and settings, so that the GPU's few minutes are never lost to a mistyped
flag, a row that does not exist or a test file that moved."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nst.bench.rows import ROWS
from nst.cli import build_parser
from nst.flags import from_args

ROOT = Path(__file__).resolve().parents[1]


def _dry(stage: str, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[tuple[int, list[str]]]]:
    cmds = tmp_path / "commands"
    run_env = dict(os.environ, GPU_CHECK_DRY=str(cmds), OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    r = subprocess.run(["bash", "bench/gpu_check.sh", stage], cwd=ROOT, env=run_env, capture_output=True, text=True,
                       timeout=300)
    lines = [shlex.split(line) for line in cmds.read_text().splitlines()] if cmds.exists() else []
    return r, [(int(line[0]), line[1:]) for line in lines]


def _check(argv: list[str]) -> None:
    """A command as the GPU machine would run it (python's arguments): its nst part parses and
    makes valid settings; its pytest files exist."""
    if "nst" in argv and argv[argv.index("nst") - 1] == "-m":
        nst = argv[argv.index("nst") + 1:]
        try:
            args = build_parser(nst).parse_args(nst)
        except SystemExit:
            pytest.fail(f"nst would refuse: {shlex.join(nst)}")
        cmd = args.command_obj
        settings = from_args(cmd.settings, args)  # the settings' own checks (contradictions, ranges)
        unknown = set(getattr(settings, "rows", ())) - {r.key for r in ROWS}
        assert not unknown, f"no such bench row {unknown}: {shlex.join(nst)}"
    elif argv[:2] == ["-m", "pytest"]:
        files = [a for a in argv if a.startswith("tests/")]
        assert all((ROOT / f).exists() for f in files), files
    else:
        pytest.fail(f"an unexpected command: {shlex.join(argv)}")


def test_the_lent_stage_runs_every_part_and_each_command_is_valid(tmp_path):
    r, cmds = _dry("lent", tmp_path)
    assert r.returncode == 0, r.stderr
    for timeout, argv in cmds:
        assert 0 < timeout <= 290, (timeout, argv)  # each part within the call's LENT_S
        _check(argv)
    assert _names(cmds) == ["pytest", "bench", "bench", "stylize", "bench-quality"]  # every part, in order
    # The benchmark: what is left but the time-to-image part's 75 s (bash's SECONDS ticks
    # with the wall clock's whole seconds, so a second or two may have gone by).
    assert 290 - 75 - 2 <= cmds[1][0] <= 290 - 75
    res = tmp_path / "out" / "bench" / "results" / "dry-run-gpu"
    bench = cmds[1][1]
    assert bench[bench.index("--out") + 1] == str(res)  # the tables come back with $OUT
    assert {"user_compile_ro", "user_whole_ro", "engine"} <= set(bench[bench.index("--rows") + 1:])
    assert (res / "gpu-check-summary.md").exists() and "| lent |" in (res / "gpu-check-summary.md").read_text()
    assert "skipped" not in (res / "gpu-check-summary.md").read_text()


def _names(cmds):
    return [argv[argv.index("nst") + 1] if "nst" in argv else argv[1] for _, argv in cmds]


def test_the_lent_stage_skips_what_its_time_cannot_pay(tmp_path):
    """LENT_S bounds the call: no part's timeout reaches past it, and a part whose minimum
    does not fit in what is left is skipped with a row that says so (in the dry run no time
    passes, so only LENT_S decides)."""
    r, cmds = _dry("lent", tmp_path, LENT_S="100")
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "out" / "gpu-check" / "summary.md").read_text()
    assert re.search(r"\| lent \| nst bench 512 1024 2048 \| skipped \| out of time \(\d+ s left of 100\) \|", summary)
    names = _names(cmds)  # the bench (150 s at least) is not there; the quality part needs 100 s, and the
    # helper scripts before it take real seconds
    assert names[:3] == ["pytest", "bench", "stylize"] and "--renders" in cmds[1][1]
    assert names[3:] == ["bench-quality"] or "| lent | quality 2048 px / 20 s | skipped |" in summary
    assert all(0 < t <= 100 for t, _ in cmds)


@pytest.mark.slow
def test_every_stage_s_commands_are_valid(tmp_path):
    r, cmds = _dry("all", tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(cmds) >= 10
    for _, argv in cmds:
        _check(argv)
