"""``--compile``: the objective under torch.compile against the float32 eager reference,
at sizes other than any compiled before, with fresh random inputs (CPU; CUDA marked)."""

import pytest
import torch

from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings

# A cut after relu2_1 keeps each compile to seconds on two CPU cores; the objective's code
# is the same for any cut.
SMALL = dict(weights="random:7", content_layers="relu2_1", style_layers="relu1_1,relu2_1", style_weight=1e6)


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _value_and_grad(prep, x0):
    x = x0.clone().requires_grad_(True)
    parts = prep.objective.losses_and_grad(x)
    return parts, x.grad


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(44, 60), (52, 36)])
def test_compiled_objective_matches_reference(hw):
    h, w = hw
    content, style = _img(h, w, h), _img(w, h, w)
    base = StylizeSettings(resize=f"{w}x{h}", device="cpu", **SMALL)
    ref = prepare(content, [(style, 1.0)], StylizeSettings(**{**base.__dict__, "reference": True}))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**{**base.__dict__, "compile": True}))
    assert comp.plan.compile and not ref.plan.compile
    x0 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    parts_r, grad_r = _value_and_grad(ref, x0)
    parts_c, grad_c = _value_and_grad(comp, x0.contiguous(memory_format=torch.channels_last))
    # float32 both; inductor reorders sums (fused reductions), nothing more.
    torch.testing.assert_close(parts_c, parts_r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_r, rtol=1e-3, atol=1e-7)


@pytest.mark.slow
def test_compiled_adam_follows_the_eager_trajectory():
    content, style = _img(40, 48, 1), _img(48, 40, 2)
    kw = dict(resize="48x40", device="cpu", **SMALL)
    eager = prepare(content, [(style, 1.0)], StylizeSettings(**kw))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**kw, compile=True))
    le = torch.stack([eager.stepper.step() for _ in range(5)])
    lc = torch.stack([comp.stepper.step() for _ in range(5)])
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(comp.x.detach(), eager.x.detach(), rtol=0, atol=1e-4)


def test_reference_path_is_never_compiled():
    from nst.engine.errors import InputError
    from nst.engine.plan import resolve_plan

    with pytest.raises(InputError, match="--reference runs the plain eager loop"):
        StylizeSettings(device="cpu", reference=True, compile=True, **SMALL)
    assert not resolve_plan(StylizeSettings(device="cpu", reference=True, **SMALL)).compile
    assert resolve_plan(StylizeSettings(device="cpu", compile=True, **SMALL)).compile


@pytest.mark.cuda
@pytest.mark.parametrize("hw", [(72, 88), (104, 56)])
def test_cuda_compiled_graph_step_matches_eager_bf16(hw):
    """bf16 + compiled objective + CUDA graph against the same step eager (no compile)."""
    h, w = hw
    content, style = _img(h, w, 3), _img(w, h, 4)
    kw = dict(resize=f"{w}x{h}", device="cuda", precision="bf16", **SMALL)
    eager = prepare(content, [(style, 1.0)], StylizeSettings(**kw, cuda_graph=False))
    comp = prepare(content, [(style, 1.0)], StylizeSettings(**kw, compile=True, cuda_graph=True))
    le = torch.stack([eager.stepper.step() for _ in range(8)])
    lc = torch.stack([comp.stepper.step() for _ in range(8)])
    torch.testing.assert_close(lc, le, rtol=2e-2, atol=1e-6)


_SECOND_RUN = """
import json, time, torch
from torch._dynamo.utils import counters
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings
s = StylizeSettings(size=40, compile=True, weights="random:4", content_layers="relu2_1",
                    style_layers="relu1_1,relu2_1", device="cpu")
g = torch.Generator().manual_seed(0)
p = prepare(torch.rand(3, 40, 40, generator=g), [(torch.rand(3, 40, 40, generator=g), 1.0)], s)
t0 = time.perf_counter()
p.stepper.step()
print(json.dumps({"s": time.perf_counter() - t0, "inductor": dict(counters["inductor"]),
                  "aot": dict(counters["aot_autograd"])}))
"""


@pytest.mark.slow
def test_a_second_process_at_the_same_size_reuses_the_compiled_step(tmp_path):
    """Inductor's FX graph cache and AOTAutograd's cache (on disk) hold the compiled step:
    the second run at a size compiles nothing (counted by torch's own counters), and its
    first step is measured several times faster than the first run's."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), NST_OFFLINE="1")
    runs = [json.loads(subprocess.run([sys.executable, "-c", _SECOND_RUN], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    cold, warm = runs
    assert cold["inductor"].get("fxgraph_cache_miss", 0) > 0 and "fxgraph_cache_hit" not in cold["inductor"]
    assert warm["inductor"].get("fxgraph_cache_hit", 0) > 0 and "fxgraph_cache_miss" not in warm["inductor"]
    assert warm["aot"].get("autograd_cache_hit", 0) > 0
    assert warm["s"] < cold["s"] / 2, runs
