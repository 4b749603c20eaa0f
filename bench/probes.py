"""What the benchmarks record about the machine: device, libraries, driver."""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone

import torch

from nst.engine.device import cpu_name, float32_math_now


def environment(device) -> dict:
    from importlib import metadata

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
    }
    for dist in ("torchvision", "onnxruntime", "onnx"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_bytes=props.total_memory, driver=driver(),
                   float32_math_default=float32_math_now())
    else:
        env["device"] = f"CPU: {env['cpu']} ({torch.get_num_threads()} threads)"
    return env


def driver() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    """A file-name stem from a device name: 'CPU: AMD EPYC (2 threads)' -> 'cpu-amd-epyc-2-threads'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]
