"""examples/node (the Node host on onnxruntime-node) and examples/web (the page on
onnxruntime-web's WebAssembly backend) on an export's step graphs, against Python's
`nst stylize --runtime onnxruntime` on the same pre-sized images with the same settings.

The Node host and Python run the same ONNX Runtime version (pyproject's dev extra pins the
one examples/node/package.json pins) on the same graph with the same intra-op thread count,
so the same kernels: their loss curves agree to 1e-5 relative at every step (measured:
equal in float32; the host's file holds 9 significant digits). The page runs other kernels
(WebAssembly SIMD, one thread) and drifts further: see WEB_RTOL.

Seeded random weights; the npm packages come from `npm ci` (CI runs it): examples/node,
examples/web, and tests/browser (playwright-core, driving Debian's /usr/bin/chromium).
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.cli import main

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = ROOT / "examples" / "node"
WEB_DIR = ROOT / "examples" / "web"
BROWSER = ROOT / "tests" / "browser"
STEPS = 12
# Not the defaults, so that each one is seen to reach both sides.
SETTINGS = {"steps": STEPS, "lr": 0.03, "content-weight": 2.0, "style-weight": 3e5, "tv-weight": 0.5}
CONTENT_WH, STYLE_WH = (75, 53), (60, 75)  # odd sides; the style's long edge is the content's: Python keeps its size
# The page against native ONNX Runtime (WebAssembly SIMD kernels, one thread, sum in another
# order), relative, measured over these 12 steps: the first evaluation (the content image, the
# same input on both sides) 1.2e-5 per term; the total 9.2e-5 at worst; single terms drift
# further as the trajectories part (Adam moves a pixel whose gradient is near 0 by a full
# step either way), 1.2e-3 at worst (the content term, under 4% of the total).
WEB_RTOL_FIRST, WEB_RTOL_TOTAL, WEB_RTOL_TERMS = 1e-4, 5e-4, 5e-3


def _flags() -> list[str]:
    return [x for k, v in SETTINGS.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("node-job")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)).resize(CONTENT_WH, Image.BICUBIC).save(
        d / "content.png")
    Image.fromarray(rng.integers(0, 256, size=(STYLE_WH[1], STYLE_WH[0], 3), dtype=np.uint8)).save(d / "style.png")
    assert main(["-q", "export", "--weights", "random:0", "--out", str(d / "exp"), "--formats", "step",
                 "--trace-size", "64x64", "--check-size", "80x48"]) == 0
    return d


@pytest.fixture(scope="module")
def python_run(job):
    """Python's render in ONNX Runtime: its stats (per-step losses) and its image."""
    stats, out = job / "py.json", job / "py.png"
    assert main(["-q", "stylize", str(job / "content.png"), "--style", str(job / "style.png"), "--size",
                 str(max(CONTENT_WH)), "--extractor", str(job / "exp"), "--runtime", "onnxruntime", "--device", "cpu",
                 *_flags(), "-o", str(out), "--stats", str(stats)]) == 0
    s = json.loads(stats.read_text())
    assert s["steps_run"] == STEPS and tuple(s["size"]) == CONTENT_WH[::-1]
    assert s["image_from_step"] == STEPS, "the comparison of images needs Python's final image"
    return np.array([s["loss"], s["content"], s["style"], s["tv"]]).T, s["final_loss"], _pixels(out)


def _pixels(png) -> np.ndarray:
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)  # (H, W, 3)


def _host(*args, timeout=600):
    assert (HOST_DIR / "node_modules" / "onnxruntime-node").is_dir(), \
        "run `ONNXRUNTIME_NODE_INSTALL=skip npm ci` in examples/node (CI does)"
    assert shutil.which("node"), "needs Node 20"
    return subprocess.run(["node", "nst_host.mjs", *map(str, args)], cwd=HOST_DIR, capture_output=True, text=True,
                          timeout=timeout)


def _versions() -> str:
    import onnxruntime

    lock = json.loads((HOST_DIR / "package-lock.json").read_text())
    return f"onnxruntime {onnxruntime.__version__} in Python, {lock['packages']['node_modules/onnxruntime-node']['version']} in Node"


@pytest.mark.slow
def test_node_host_matches_python(job, python_run):
    py, py_final, py_image = python_run
    threads = torch.get_num_threads()  # what Python's sessions use (engine/loader.py)
    r = _host(job / "exp", job / "content.png", job / "style.png", job / "node.png", *_flags(), "--threads", threads,
              "--print-every", 5, "--losses", job / "node.txt", "--size", "x".join(map(str, CONTENT_WH)))
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^step (\d+)/12 loss", r.stdout, re.M) == ["1", "6", "11", "12"], r.stdout
    node = np.loadtxt(job / "node.txt")  # (steps, 4): total, content, style, tv
    assert node.shape == (STEPS, 4)
    np.testing.assert_allclose(node, py, rtol=1e-5, atol=0, err_msg=_versions())
    final = float(re.search(r"^final loss (\S+);", r.stdout, re.M)[1])
    assert final == pytest.approx(py_final, rel=1e-5) and final < node[0, 0]
    # The image: 1e-5 parity leaves at most a rounding step between the two PNGs.
    image = _pixels(job / "node.png")
    assert image.shape == py_image.shape and np.abs(image - py_image).max() <= 1


def _edited(job, tmp_path, name, edit=None, drop=()):
    """An export directory with the job's files (linked) and an edited manifest."""
    d = tmp_path / name
    d.mkdir()
    for f in (job / "exp").iterdir():
        if f.name not in drop and f.name != "manifest.json":
            (d / f.name).symlink_to(f)
    m = json.loads((job / "exp" / "manifest.json").read_text())
    if edit:
        edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.slow
def test_node_host_errors_are_one_line(job, tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not a png")
    c, s, exp, out = job / "content.png", job / "style.png", job / "exp", tmp_path / "out.png"

    def version(m):
        m["format_version"] = 2

    def unwritten(m):
        m["artefacts"]["step"] = {"written": False, "reason": "the step graphs are float32 only"}

    def hashed(m):
        m["artefacts"]["step"]["weights_file"]["sha256"] = "0" * 64

    cases = [
        ((tmp_path / "nope", c, s, out), "nope/manifest.json not found: not an nst export directory"),
        ((exp, tmp_path / "none.png", s, out), "content " + str(tmp_path / "none.png") + ": file not found"),
        ((exp, c, tmp_path / "text.png", out), "not a PNG"),
        ((exp, c, s, out, "--size", "64x48"), "is 75x53 px, not the 64x48 asked for (--size)"),
        ((exp, c, tmp_path / "small.png", out), "40x20 px is too small; the step graphs need at least 32 px"),
        ((_edited(job, tmp_path, "v2", version), c, s, out), "format nst-extractor version 2; this host reads"),
        ((_edited(job, tmp_path, "nostep", unwritten), c, s, out), "has no step graphs (the step graphs are float32"),
        ((_edited(job, tmp_path, "gone", drop=("objective.onnx",)), c, s, out), "step file objective.onnx is missing"),
        ((_edited(job, tmp_path, "hash", hashed), c, s, out), "step_weights.bin: SHA-256 does not match"),
        ((exp, c, s, out, "--steps", "0"), "--steps 0: expected a whole number >= 1"),
        ((exp, c, s, out, "--steps", "2", "--style-weight", "1e45"), "step 1: the loss is Infinity"),
        ((exp, c, s, tmp_path / "no" / "o.png"), "its directory does not exist"),
    ]
    for args, why in cases:
        r = _host(*args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("nst_host: error: "), (args, r.stderr)
        assert why in lines[0], (why, lines[0])
        assert not out.exists() and not r.stdout
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "manifest.json").write_text("{")
    r = _host(tmp_path / "badjson", c, s, out, timeout=120)
    assert r.returncode == 1 and "manifest.json: not valid JSON" in r.stderr and len(r.stderr.splitlines()) == 1


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(job, tmp_path):
    """A static server on 127.0.0.1 (any free port) for examples/web and the job's files."""
    assert (WEB_DIR / "node_modules" / "onnxruntime-web").is_dir(), "run `npm ci` in examples/web (CI does)"
    assert (BROWSER / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in tests/browser (CI does)"
    assert shutil.which("node") and Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists(), \
        "needs node and Debian's chromium (apt-get install -y chromium; CI installs it)"
    root = tmp_path / "www"
    root.mkdir()
    (root / "web").symlink_to(WEB_DIR)
    (root / "job").symlink_to(job)
    (root / "v2").symlink_to(_edited(job, tmp_path, "v2", lambda m: m.update(format_version=2)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _page(url: str, *pick) -> dict:
    r = subprocess.run(["node", "step_page.js", url, *map(str, pick)], cwd=BROWSER, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_web_page_matches_python(served, job, python_run):
    py, py_final, py_image = python_run
    query = "&".join(f"{k.replace('-', '_')}={v}" for k, v in SETTINGS.items())
    res = _page(f"{served}/web/index.html?export=/job/exp&content=/job/content.png&style=/job/style.png&every=4&{query}")
    assert res.get("state") == "done", res
    assert not res["offsite"] and not res["errors"], res
    got = res["nst"]
    assert (got["width"], got["height"]) == CONTENT_WH
    web = np.array(got["losses"])  # (steps, 4)
    assert web.shape == (STEPS, 4)
    np.testing.assert_allclose(web[0], py[0], rtol=WEB_RTOL_FIRST, atol=0)
    np.testing.assert_allclose(web[:, 0], py[:, 0], rtol=WEB_RTOL_TOTAL, atol=0)
    np.testing.assert_allclose(web, py, rtol=WEB_RTOL_TERMS, atol=0)
    assert got["final_loss"] == pytest.approx(py_final, rel=WEB_RTOL_TOTAL)
    # The image read back from the page's canvas: Python's, within the drift (measured: 0.86
    # levels on average, 13 at worst, against 28 levels that the steps moved it from the content).
    with Image.open(io.BytesIO(base64.b64decode(got["image"].split(",", 1)[1]))) as im:
        image = np.asarray(im.convert("RGB")).astype(np.int16)
    moved = np.abs(py_image - _pixels(job / "content.png")).mean()
    assert image.shape == py_image.shape and np.abs(image - py_image).mean() < 0.1 * moved
    # The form: the export directory and the two images picked as a user would, the default
    # weights; its first evaluation (of the content image) has the run's unweighted style term.
    res = _page(f"{served}/web/index.html", job / "exp", job / "content.png", job / "style.png", 2)
    assert res.get("state") == "done" and not res["offsite"] and not res["errors"], res
    assert len(res["nst"]["losses"]) == 2
    np.testing.assert_allclose(res["nst"]["losses"][0][2], web[0, 2], rtol=1e-6, atol=0)  # style: weights apart
    # A manifest it does not understand: the page says so, and stops.
    res = _page(f"{served}/web/index.html?export=/v2&content=/job/content.png&style=/job/style.png")
    assert res.get("state") == "error" and "version 2; this page reads nst-extractor version 1" in res["nst"]["error"]
