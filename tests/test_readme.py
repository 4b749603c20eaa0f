"""The README tells the truth: its links resolve inside the repository, its pictures exist,
its Python example runs offline as written, and every measured figure it quotes is the
one in the committed results file it names."""

from __future__ import annotations

import json
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "bench" / "results"


def _section(title: str) -> str:
    start = README.index(title)
    nxt = re.search(r"\n#{2,3} ", README[start + len(title):])
    return README[start: start + len(title) + (nxt.start() if nxt else len(README))]


def test_links_and_pictures_stay_in_the_repository():
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets, "the README links its documents and pictures"
    for target in targets:
        assert not target.startswith(("../", "/")), f"{target} points outside the repository"
        if "://" in target:
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"{target} does not exist"
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert "docs/demo-sheet.png" in pictures and any(p.startswith("bench/results/") for p in pictures)


def test_the_python_example_runs_offline_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", _section("The same from Python"), re.S).group(1)
    assert 'weights="random:0"' in block and "save_image" in block
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NST_OFFLINE", "1")
    exec(compile(block, "README.md", "exec"), {})
    from PIL import Image

    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (128, 96)


def test_cpu_benchmark_figures_are_the_committed_ones():
    section = _section("Latest CPU run")
    md = (RESULTS / "cpu-amd-epyc-2-threads.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 5
    for line in rows:
        assert line in md, f"not in the committed results: {line}"
    data = json.loads((RESULTS / "cpu-amd-epyc-2-threads.json").read_text())
    t = data["targets"]
    m = re.search(r"engine ([\d.]+)x the fastest baseline .*?(\d+)% of the measured fp32 matmul peak", section, re.S)
    assert m, "the targets sentence"
    assert float(m[1]) == round(t["cpu_256_vs_fastest_baseline"]["got"], 2)
    assert int(m[2]) == round(100 * t["cpu_256_peak_fraction"]["got"])
    g = data["profile"]["groups"]
    m = re.search(r"convolutions (\d+)% of the step .*?Grams (\d+)%,\s+everything else (\d+)%", section, re.S)
    assert m, "the profile sentence"
    conv = g["convolution forward"]["share"] + g["convolution input-gradient"]["share"]
    gram = g["Gram and its backward"]["share"]
    assert [int(m[1]), int(m[2]), int(m[3])] == [round(100 * conv), round(100 * gram),
                                                  round(100 * (1 - conv - gram))]
    tti = data["time_to_image"]["renders"]
    for render, entry in tti.items():
        for cmd, v in entry.items():
            assert f"| {render} | {cmd} | {v['cold_s']:.1f} | {v['warm_s']:.1f} |" in section, (render, cmd)


def test_recipe_and_quality_figures_are_the_committed_ones():
    rows = json.loads((RESULTS / "recipes-cpu-amd-epyc-2-threads.json").read_text())["rows"]
    text = " ".join(_section("### Recipes against their original loops").split())
    for r in rows:
        assert f"{r['recipe']} {r['speedup']:.2f}x" in text, r["recipe"]
    worst = max(r["parity"]["rel_err"] for r in rows)
    assert float(re.search(r"parity within ([\d.e+-]+)\.", text)[1]) == float(f"{worst:.1e}")
    quality = (RESULTS / "quality-cpu-512.md").read_text()
    lines = [line for line in _section("### Quality at equal time").splitlines()
             if line.startswith("| ") and "---" not in line]
    assert len(lines) >= 4
    for line in lines:
        assert line in quality, f"not in the committed results: {line}"


def test_the_demo_picture_is_a_real_sheet():
    from PIL import Image

    with Image.open(ROOT / "docs" / "demo-sheet.png") as im:
        assert im.width > 3 * 200 and im.height >= 256


def test_tile_figures_are_the_committed_ones():
    section = _section("### Very large renders")
    md = (RESULTS / "tiles-cpu-amd-epyc-2-threads.md").read_text()
    data = json.loads((RESULTS / "tiles-cpu-amd-epyc-2-threads.json").read_text())
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(data["rows"])
    for line in rows:
        assert line in md, f"not in the committed results: {line}"
    text = " ".join(section.split())
    goal = next(r for r in data["rows"] if r["tile"] == 2048)
    assert f"With 2048 px tiles a step costs {goal['ratio']:.2f}x the untiled one" in text
    reach = data["reach"]
    assert (f"plain step up to about {reach['plain']} px square, a checkpointed one up to about "
            f"{reach['checkpointed']} px and tiles up to about {reach['tiled_64px']} px") in text
    assert "docs/tiles-no-seams.png" in section and (ROOT / "docs" / "tiles-no-seams.png").exists()


def test_commands_name_no_path_outside_the_repository_and_every_quick_check():
    """A clone has no ../shared/...: every command and path the README quotes is its own."""
    for code in re.findall(r"`([^`\n]+)`", README) + re.findall(r"```\w*\n(.*?)```", README, re.S):
        assert "../" not in code, code
    for cmd in ("nst bench --quick", "nst bench-tiles --quick", "nst bench-recipes --quick"):
        assert cmd in README, cmd


def test_the_tile_cost_it_quotes_is_the_plans():
    from nst.engine.layers import DEFAULT_TAPS
    from nst.engine.memory import tile_work

    text = " ".join(_section("### Failure behaviour").split())
    n, work = tile_work(512, 512, 16, DEFAULT_TAPS)
    assert f"{n} tiles, each step computes {work:.1f}x the image's pixels" in text
    n, work = tile_work(512, 512, 128, DEFAULT_TAPS)
    assert f"128 px tiles: {n} tiles, {work:.1f}x" in text
