"""examples/cpp: build the C++ host against the wheel's libtorch, run it, compare with Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine import StylizeSettings
from nst.cli import main
from nst.engine.loop import run

ROOT = Path(__file__).resolve().parents[1]
W = "random:4"
STEPS = 6


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """Configure and build examples/cpp with the documented commands."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.fail("cmake and a C++ compiler are needed to build examples/cpp")
    build = tmp_path_factory.mktemp("cpp-build")
    torch_dir = os.path.dirname(torch.__file__)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), f"-DTORCH_DIR={torch_dir}",
                    f"-DTORCH_CXX11_ABI={abi}"], check=True, capture_output=True, text=True)
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exe = build / "nst_host"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpp-job")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((80, 60), Image.BICUBIC).save(
        d / "content.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(d / "style.png")
    assert main(["-q", "export", "--weights", W, "--out", str(d / "exp"), "--formats", "torchscript",
                 "--trace-size", "64x64", "--check-size", "80x48"]) == 0
    assert main(["-q", "targets", str(d / "content.png"), "--style", str(d / "style.png"), "--extractor",
                 str(d / "exp"), "-o", str(d / "targets.pt"), "--size", "64", "--style-weight", "1e8",
                 "--tv-weight", "2", "--init", "noise", "--seed", "3"]) == 0
    return d


def _host(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cpp_matches_python(host, job):
    r = _host(host, job / "exp", job / "targets.pt", job / "out.ppm", "--steps", STEPS, "--print-every", 2,
              "--losses", job / "losses.txt")
    assert r.returncode == 0, r.stderr
    assert "step 2/6 loss" in r.stdout and "wrote" in r.stdout
    cpp = np.loadtxt(job / "losses.txt")  # (steps, 4): total, content, style, tv
    assert cpp.shape == (STEPS, 4)

    # The Python engine, same start, same settings, on the same TorchScript file.
    from nst.engine.imageio import load_image

    settings = StylizeSettings(size=64, steps=STEPS, extractor=str(job / "exp"), reference=True,
                               device="cpu", style_weight=1e8, tv_weight=2, init="noise", seed=3)
    py = run(load_image(job / "content.png"), [(load_image(job / "style.png"), 1.0)], settings)
    py_losses = np.array([py.stats.loss, py.stats.content, py.stats.style, py.stats.tv]).T
    # Stated tolerance: every loss term within 1e-4 relative at every step (same kernels,
    # summation order of the Gram may differ).
    np.testing.assert_allclose(cpp, py_losses, rtol=1e-4, atol=1e-12)
    assert cpp[-1, 0] < cpp[0, 0]
    with Image.open(job / "out.ppm") as im:
        assert im.format == "PPM" and im.size == (64, 48) and im.mode == "RGB"


@pytest.mark.cuda
@pytest.mark.slow
def test_cpp_matches_python_on_cuda(host, job):
    """`nst_host --device cuda` against the Python engine's reference path on CUDA, both in
    IEEE float32 (TF32 off), from the same start on the same TorchScript file."""
    r = _host(host, job / "exp", job / "targets.pt", job / "out-cuda.ppm", "--steps", STEPS, "--device", "cuda",
              "--losses", job / "losses-cuda.txt")
    assert r.returncode == 0, r.stderr
    assert "on cuda" in r.stdout
    cpp = np.loadtxt(job / "losses-cuda.txt")
    from nst.engine.imageio import load_image

    settings = StylizeSettings(size=64, steps=STEPS, extractor=str(job / "exp"), reference=True,
                               device="cuda", style_weight=1e8, tv_weight=2, init="noise", seed=3)
    py = run(load_image(job / "content.png"), [(load_image(job / "style.png"), 1.0)], settings)
    assert py.stats.float32_math == "ieee"
    py_losses = np.array([py.stats.loss, py.stats.content, py.stats.style, py.stats.tv]).T
    # Stated tolerance: 1e-3 relative per term and step. Both sides run IEEE float32 cuDNN
    # kernels, but each process picks its convolution algorithms (and their summation
    # order) itself; on the CPU the two agree to 1e-4.
    np.testing.assert_allclose(cpp, py_losses, rtol=1e-3, atol=1e-12)


@pytest.mark.slow
def test_cpp_errors(host, job, tmp_path):
    def error(*args):
        r = _host(host, *args)
        assert r.returncode == 1, r.stdout + r.stderr
        lines = [l for l in r.stderr.strip().splitlines() if l]
        assert len(lines) == 1 and lines[0].startswith("nst_host: error:"), r.stderr
        return lines[0]

    out = tmp_path / "o.ppm"
    assert "manifest.json of the export directory not found" in error(tmp_path / "nope", job / "targets.pt", out)
    assert "targets file not found" in error(job / "exp", tmp_path / "none.pt", out)
    # A TorchScript file that is missing, or corrupt.
    broken = tmp_path / "broken"
    shutil.copytree(job / "exp", broken)
    (broken / "extractor.ts").unlink()
    assert "TorchScript file not found" in error(broken, job / "targets.pt", out)
    (broken / "extractor.ts").write_bytes(b"not a zip archive")
    assert "cannot load TorchScript file" in error(broken, job / "targets.pt", out)
    # Targets made for another export are refused.
    other = tmp_path / "other"
    assert main(["-q", "export", "--weights", "random:5", "--out", str(other), "--formats", "torchscript",
                 "--trace-size", "64x64", "--check-size", "80x48"]) == 0
    assert "made for another extractor" in error(other, job / "targets.pt", out)
    # An edited manifest (two taps swapped; the TorchScript file's hash still matches).
    edited = tmp_path / "edited"
    shutil.copytree(job / "exp", edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["taps"][3], m["taps"][4] = m["taps"][4], m["taps"][3]
    (edited / "manifest.json").write_text(json.dumps(m))
    assert "does not match" in error(edited, job / "targets.pt", out) and "the manifest was edited" in \
        error(edited, job / "targets.pt", out)
    # Targets naming a layer the export does not output (a hand-made file with the right hash).
    narrow = tmp_path / "narrow"
    assert main(["-q", "export", "--weights", W, "--out", str(narrow), "--formats", "torchscript", "--taps",
                 "relu1_1", "--trace-size", "64x64", "--check-size", "80x48"]) == 0
    import warnings

    from nst.export.targets_file import EXTRA_NAME, _Holder

    sha = json.loads((narrow / "manifest.json").read_text())["artefacts"]["torchscript"]["sha256"]
    info = {"format": "nst-targets", "extractor_sha256": sha, "content_layers": [["relu4_2", 1.0]],
            "style_layers": [["relu1_1", 1.0]], "content_weight": 1, "style_weight": 1, "tv_weight": 0, "lr": 0.1}
    holder = _Holder({"content_0": torch.zeros(1, 512, 8, 8), "gram_0": torch.zeros(1, 64, 64),
                      "init": torch.rand(1, 3, 64, 64)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(holder), str(tmp_path / "t1.pt"), _extra_files={EXTRA_NAME: json.dumps(info)})
    assert "needs layer relu4_2, which the exported extractor does not output" in error(narrow, tmp_path / "t1.pt", out)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot load targets file" in error(job / "exp", tmp_path / "junk.pt", out)
    assert "must be a .ppm" in error(job / "exp", job / "targets.pt", tmp_path / "o.png")
    assert "unknown --device tpu" in error(job / "exp", job / "targets.pt", out, "--device", "tpu")
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA GPU is available" in error(job / "exp", job / "targets.pt", out, "--device", "cuda")
    assert not out.exists()


def test_targets_command_errors(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    # A usage error (argparse's exit status 2): the usage line shows --extractor as required.
    with pytest.raises(SystemExit) as e:
        main(["-q", "targets", str(tmp_path / "c.png"), "--style", str(tmp_path / "c.png"), "-o",
              str(tmp_path / "t.pt")])
    assert e.value.code == 2
    assert "the following arguments are required: --extractor" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists()


def test_targets_file_contents(job):
    import json
    import warnings

    files = {"nst_targets.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = torch.jit.load(str(job / "targets.pt"), _extra_files=files)
    info = json.loads(files["nst_targets.json"])
    assert info["format"] == "nst-targets" and info["content_layers"] == [["relu4_2", 1.0]]
    assert [n for n, _ in info["style_layers"]] == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert info["style_weight"] == 1e8 and info["tv_weight"] == 2 and info["size"] == [48, 64]
    assert t.init.shape == (1, 3, 48, 64) and t.gram_0.shape == (1, 64, 64) and t.content_0.shape[1] == 512
    manifest = json.loads((job / "exp" / "manifest.json").read_text())
    assert info["extractor_sha256"] == manifest["artefacts"]["torchscript"]["sha256"]
