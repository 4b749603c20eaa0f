"""Time to image: what a user waits for, from process start to the file written (issue #14).

Each command runs as its own process, timed from just before it starts until it has
exited with its output file written: imports, set-up, compiles, every step and the PNG.
Each runs twice with the same compiler cache directory (inductor's and Triton's): "cold"
with the directory empty, "warm" with what the first run left there. Nothing of the
inputs, targets or outputs is cached. The engine runs with its defaults and with
``--compile``; the baseline is bench/user_loop.py, the strongest loop a user could write,
run as a plain script (it imports nothing of the engine).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import user_loop
from .inputs import drawn_pair

log = logging.getLogger("nst")

GPU_RENDERS = ((512, 500), (2048, 200))  # (px, Adam steps), as issue #14 asks
CPU_RENDERS = ((128, 30),)  # the same kind of render, sized for a CPU
QUICK_RENDERS = ((64, 2),)


def _save(img: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    save_image(img, path)


def compile_cache_env(directory: Path) -> dict[str, str]:
    """The environment that points inductor's and Triton's on-disk caches at ``directory``,
    and the engine's cache of step variants chosen by measurement (engine/variants.py): a cold
    run pays for compiling and for the variant trial, a warm one for neither."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(directory), "TRITON_CACHE_DIR": str(directory / "triton"),
            "NST_CACHE_DIR": str(directory / "nst")}


def _script(path: str) -> list[str]:
    """Run a file as a script without putting its folder first on sys.path (python -P, for
    Python 3.10 too): bench/ holds modules named like the standard library's (profile)."""
    run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-c", run, path]


def _commands(size: int, steps: int, device: str, files: dict) -> dict[str, list[str]]:
    common = ["--size", str(size), "--steps", str(steps), "--weights", str(files["weights"]), "--device", device]
    engine = [sys.executable, "-m", "nst", "-q", "stylize", str(files["content"]), "--style", str(files["style"]),
              "--output", "{out}", *common]
    mode = "reduce-overhead" if device == "cuda" else "default"
    return {
        "engine defaults": engine,
        "engine --compile": [*engine, "--compile"],
        f"user loop + torch.compile ({mode})": [*_script(user_loop.__file__), str(files["content"]),
                                                str(files["style"]), "{out}", *common, "--mode", mode],
    }


def _run_once(cmd: list[str], out: Path, env: dict, timeout: float) -> dict:
    out.unlink(missing_ok=True)
    argv = [a.replace("{out}", str(out)) for a in cmd]
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return {"s": wall}


def time_to_image(device: torch.device, weights_state: dict, tmp: Path, quick: bool, timeout: float = 900,
                  renders=(), on_command=None) -> dict:
    """{render: {command: {cold_s, warm_s}}} for ``renders`` ((px, steps) pairs), else the renders
    sized for this device. ``on_command(results so far)`` after each command, if given."""
    renders = renders or (QUICK_RENDERS if quick else (GPU_RENDERS if device.type == "cuda" else CPU_RENDERS))
    files = {"weights": tmp / "vgg19-features.pth"}
    torch.save(weights_state, files["weights"])
    results: dict = {"method": __doc__.strip().split("\n\n")[1].replace("\n", " "), "renders": {}}
    for size, steps in renders:
        content, style = drawn_pair(size)
        files["content"], files["style"] = tmp / f"content-{size}.png", tmp / f"style-{size}.png"
        _save(content, files["content"])
        _save(style, files["style"])
        entry = results["renders"][f"{size} px / {steps} steps"] = {}
        for name, cmd in _commands(size, steps, device.type, files).items():
            cache = tmp / f"cache-{size}-{len(entry)}"
            env = {**os.environ, **compile_cache_env(cache)}
            log.info("time to image, %d px / %d steps: %s (cold, then warm)", size, steps, name)
            cold = _run_once(cmd, tmp / "out.png", env, timeout)
            warm = _run_once(cmd, tmp / "out.png", env, timeout) if "error" not in cold else {}
            entry[name] = {"cold_s": cold.get("s"), "warm_s": warm.get("s"),
                           **({"error": cold.get("error") or warm.get("error")} if "s" not in cold or "s" not in warm
                              else {})}
            if on_command is not None:
                on_command(results)
    return results
