"""The house: one import namespace (nst.*), dependencies one way (engine <- export <- bench
<- cli), a settings module free of the numerical core, and a wheel that installs and runs
on its own (not editable)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "nst.engine", "export": "nst.export", "bench": "nst.bench", "nst": "nst"}
# Each package may import the ones before it, never the ones after it.
ORDER = ["nst.engine", "nst.export", "nst.bench", "nst"]


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the nst modules a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.add(node.module)
    return {m for m in out if m == "nst" or m.startswith("nst.") or m.split(".")[0] in ("engine", "export", "bench")}


def _owner(module: str) -> str:
    for pkg in ORDER[:-1]:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "nst"


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_dependencies_run_one_way(folder):
    package = PACKAGES[folder]
    rank = ORDER.index(package)
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in _imports(path, package):
            assert not module.split(".")[0] in ("engine", "export", "bench"), f"{path.name} imports {module}"
            assert ORDER.index(_owner(module)) <= rank, f"{folder}/{path.name} imports {module}, which is above it"


def test_settings_import_nothing_of_the_numerical_core():
    """engine/settings.py and what it imports are plain Python: no torch, PIL or numpy."""
    seen, todo = set(), ["settings"]
    while todo:
        name = todo.pop()
        seen.add(name)
        tree = ast.parse((ROOT / "engine" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in seen:
                todo.append(node.module)
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for m in mods:
                assert m.split(".")[0] not in ("torch", "PIL", "numpy", "torchvision"), f"{name}.py imports {m}"
    assert seen == {"settings", "errors", "layers", "norms", "sizes"}


def test_no_top_level_engine_export_or_bench_is_importable_from_elsewhere(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import nst.engine, nst.export, nst.bench, nst.cli\n"
                        "for name in ('engine', 'export', 'bench'):\n"
                        "    try:\n        __import__(name)\n    except ImportError:\n        continue\n"
                        "    raise SystemExit(name + ' is importable')"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_demo(tmp_path):
    """Build the wheel, install it (not editable) into a fresh virtual environment that
    borrows this one's torch, and run `nst demo` there with a few steps."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "nst", "engine", "export", "bench"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("nst-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"nst", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Borrow this environment's torch & co. (a .pth line: its own .pth files, such as the
    # editable install's finder, are not run, so this checkout's nst stays out of sight).
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, NST_OFFLINE="1", TORCH_HOME=str(tmp_path / "th"))
    r = subprocess.run([str(venv / "bin" / "nst"), "-q", "demo", "--steps", "2", "--size", "64", "--out", "demo"],
                       cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "seeded random weights" in r.stdout and (run_dir / "demo" / "sheet.png").stat().st_size > 1000
    r = subprocess.run([str(py), "-c", "import nst.engine; print(nst.engine.__file__)"], cwd=run_dir,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().startswith(site), r.stdout  # the installed copy, not this checkout
