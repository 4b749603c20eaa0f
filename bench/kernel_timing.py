"""Time engine/kernels.py's Triton kernels against the ops they replace, per part of a step.

    python -m nst.bench.kernel_timing --sizes 512 1024 2048 --json $OUT/bench/results/<gpu>/kernels.json

For each image size: the five default style taps (relu1_1..relu5_1: C = 64..512 over
(S/2^k)^2 positions, bf16 channels-last post-ReLU features) and the image (3, S, S). Each
candidate runs captured in a CUDA graph (the engine replays its step that way), timed over
replays with CUDA events; on the CPU (the tests, under TRITON_INTERPRET=1) it runs eagerly
once per repeat, which only checks that the script works.

Parts and candidates, ms per step (the five taps summed):
- style forward: value and S = dL/dG of each tap. "engine" = nst::gram_mc + the loss
  module's value and gradient (kernels.style_tap_reference); "compiled" = the same under
  torch.compile; "kernel" = kernels.style_tap_forward.
- style backward: dX = [F > 0] (F (S + S^T) + dY) at each tap. "engine" = what autograd
  runs today (nst::gram_mc_backward's bf16 product, the add of the deeper gradient, the
  ReLU's threshold backward); "compiled" = the same under torch.compile; "kernel" =
  kernels.style_tap_backward with grad_out.
- image update: kernels.image_update_reference eager and compiled; "kernel" = ImageAdam.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from nst.engine import kernels
from nst.engine.gram_op import gram_mc_backward
from nst.engine.losses import gram

TAPS = ((64, 1), (128, 2), (256, 4), (512, 8), (512, 16))  # (C, stride) of relu1_1..relu5_1


def _engine_backward(f, s, go):
    """Today's autograd ops for one tap: the Gram's backward, the add, the ReLU's backward."""
    t = kernels._mc(f)
    sym = s + s.t()
    d = gram_mc_backward(t, sym, sym.to(t.dtype)).reshape(1, f.shape[2], f.shape[3], f.shape[1]).permute(0, 3, 1, 2)
    return torch.ops.aten.threshold_backward(d + go, f, 0)


def _time(fn, device: torch.device, reps: int) -> float:
    """Median ms per call: CUDA-graph replays on a GPU, eager calls on the CPU."""
    if device.type != "cuda":
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # compiles (Triton, inductor) and warms up, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _inputs(size: int, device: torch.device, dtype: torch.dtype):
    """Per tap (features, target Gram, deeper gradient, S); the image and its input gradient."""
    gen = torch.Generator().manual_seed(size)

    def cl(t):  # channels-last, the compute dtype, on the device
        return t.to(device, dtype).contiguous(memory_format=torch.channels_last)

    taps = []
    for c, stride in TAPS:
        hw = max(1, size // stride)
        f = cl(torch.relu(torch.randn(1, c, hw, hw, generator=gen)))
        a = gram(torch.relu(torch.randn(1, c, hw, hw, generator=gen)))[0].to(device)
        go = cl(torch.randn(1, c, hw, hw, generator=gen) * 1e-3)
        taps.append((f, a, go, kernels.style_tap_reference(f, a, 1.0)[2]))
    x = torch.rand(1, 3, size, size, generator=gen).to(device)
    return taps, x, cl(torch.randn(1, 3, size, size, generator=gen) * 1e-2)


def _compiled(fn):
    """torch.compile with static shapes (each tap's shape compiled for itself)."""
    for name in ("recompile_limit", "cache_size_limit"):  # five taps x sizes: above the default of 8
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(fn, dynamic=False)


def _candidates(taps, x, gx, compile_: bool):
    """{part: {candidate: fn}}; every fn runs the part for the whole step."""
    def fwd(impl):
        return lambda: [impl(f, a, 1.0) for f, a, _, _ in taps]

    def bwd(impl):
        return lambda: [impl(f, s, go) for f, _, go, s in taps]

    def image(fused: bool, compiled: bool):
        opt = kernels.ImageAdam(x.clone(), 0.02, tv_weight=1.0)
        opt.fused = opt.fused and fused
        step = _compiled(opt.step) if compiled else opt.step
        return lambda: step(gx)

    parts = {
        "style forward": {"engine": fwd(kernels.style_tap_reference), "kernel": fwd(kernels.style_tap_forward)},
        "style backward": {"engine": bwd(_engine_backward),
                           "kernel": bwd(lambda f, s, go: kernels.style_tap_backward(f, s, None, go, True))},
        "image update": {"engine": image(False, False), "kernel": image(True, False)},
    }
    if compile_:
        parts["style forward"]["compiled"] = fwd(_compiled(kernels.style_tap_reference))
        parts["style backward"]["compiled"] = bwd(_compiled(_engine_backward))
        parts["image update"]["compiled"] = image(False, True)
    return parts


def run(sizes, reps: int, device: torch.device, compile_: bool = True) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's operands on the CPU
    rows = []
    for size in sizes:
        taps, x, gx = _inputs(size, device, dtype)
        for part, cands in _candidates(taps, x, gx, compile_).items():
            row = {"size": size, "part": part}
            row.update({name: round(_time(fn, device, reps), 4) for name, fn in cands.items()})
            rows.append(row)
            best = min(row["engine"], row.get("compiled", row["engine"]))
            print(f"| {size} | {part} | {row['engine']} | {row.get('compiled', '-')} | {row['kernel']} |"
                  f" {best / row['kernel']:.2f}x |", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--reps", type=int, default=50, help="graph replays per timing (5 timings, the median kept)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates (their compile time)")
    p.add_argument("--json", help="write the rows here as JSON too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print("| px | part | engine ms | compiled ms | kernel ms | best other / kernel |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: |")
    rows = run(args.sizes, args.reps, device, not args.no_compile)
    if args.json:
        import triton

        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "triton": triton.__version__, "tuning": dataclasses.asdict(kernels.TUNING)}
        with open(args.json, "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
