"""nst::gram_mc (engine/gram_op.py): gradcheck in float64, torch.library's opcheck, the
bf16 fallback against float64, the guard, compiled use, and the CUDA kernel (marked)."""

import pytest
import torch

from nst.engine.gram_op import fast_path, gram_mc
from nst.engine.losses import gram


def _t(m, c, seed, dtype=torch.float32):
    return torch.randn(m, c, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("m,c", [(37, 5), (64, 16)])
def test_gradcheck_float64(m, c):
    t = _t(m, c, m).double().requires_grad_(True)
    assert torch.autograd.gradcheck(gram_mc, (t,))


def test_gradcheck_on_a_channels_last_view():
    # The engine passes a (M, C) view of channels-last features, not a contiguous tensor.
    f = torch.randn(1, 6, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: gram_mc(f.permute(0, 2, 3, 1).reshape(35, 6)), (f,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(dtype):
    torch.library.opcheck(gram_mc, (_t(48, 8, 1, dtype).requires_grad_(True),))


def test_matches_autograd_through_the_plain_product():
    t = _t(100, 12, 2).double().requires_grad_(True)
    g_up = torch.randn(12, 12, dtype=torch.float64)
    (gram_mc(t) * g_up).sum().backward()
    mine = t.grad.clone()
    t.grad = None
    ((t.t() @ t) * g_up).sum().backward()
    torch.testing.assert_close(mine, t.grad, rtol=1e-12, atol=1e-12)


def test_bf16_features_give_a_float32_gram_within_bf16_tolerance():
    t = _t(4096, 32, 3, torch.bfloat16)
    g = gram_mc(t)
    assert g.dtype == torch.float32
    ref = t.double().t() @ t.double()  # the same bf16 values, exactly
    # Float32 accumulation of exact bf16 products: float32 rounding only.
    torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-3)
    # The gradient is bf16, like the features', and within bf16 rounding of float64's.
    tt = t.clone().requires_grad_(True)
    gu = torch.randn(32, 32)
    (gram_mc(tt) * gu).sum().backward()
    assert tt.grad.dtype == torch.bfloat16
    ref_grad = t.double() @ (gu + gu.t()).double()
    torch.testing.assert_close(tt.grad.double(), ref_grad, rtol=1.6e-2, atol=1e-2)


def test_guard_and_switch(monkeypatch):
    t = _t(16, 4, 4, torch.bfloat16)
    assert not fast_path(t)  # a CPU tensor never takes the CUDA kernel
    monkeypatch.setenv("NST_FAST_GRAM", "0")
    assert not fast_path(t)


def test_compiled_gram_matches_eager():
    # Under torch.compile the operator is opaque: traced around, never through.
    f = torch.randn(1, 8, 9, 11, generator=torch.Generator().manual_seed(5))

    def loss(f):
        return (gram(f) - 0.1).square().mean()

    fe = f.clone().requires_grad_(True)
    loss(fe).backward()
    fc = f.clone().requires_grad_(True)
    lc = torch.compile(loss, backend="aot_eager")(fc)
    lc.backward()
    torch.testing.assert_close(lc, loss(f), rtol=1e-6, atol=0)
    torch.testing.assert_close(fc.grad, fe.grad, rtol=1e-5, atol=1e-8)


def test_the_probe_is_never_decided_under_tracing(monkeypatch):
    """Under FakeTensorMode (how torch.compile traces) ``mm(out_dtype=...)`` "works" on a fake
    CUDA tensor whether or not the kernel exists: fast_path must neither probe there nor
    cache, and the backward must not consult it while traced (issue #24, item 2)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nst.engine import gram_op

    # Without a driver the capture check raises: stubbed, so that only the tracing rule
    # stands between a fake CUDA tensor and the probe.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gram_op, "_WORKS", {})
    probes, real_probe = [], gram_op._mm_out_dtype_works
    monkeypatch.setattr(gram_op, "_mm_out_dtype_works", lambda *key: probes.append(key) or real_probe(*key))
    with FakeTensorMode():
        t = torch.empty(64, 8, device="cuda", dtype=torch.bfloat16)
        assert not fast_path(t)
        assert gram_mc(t).shape == (8, 8)
        # The registered backward, as AOT autograd traces it (autograd's engine itself needs
        # a CUDA context for CUDA tensors, fake or not).
        ctx = type("Ctx", (), {"saved_tensors": (t,)})
        dt = gram_op._backward(ctx, torch.empty(8, 8, device="cuda"))
        assert dt.shape == (64, 8) and dt.dtype == torch.bfloat16
    assert probes == [] and gram_op._WORKS == {}
    # A trace takes what an eager probe on real tensors found (simulated here).
    gram_op._WORKS[("cuda:0", torch.bfloat16)] = True
    with FakeTensorMode():
        assert fast_path(torch.empty(64, 8, device="cuda", dtype=torch.bfloat16))
    assert probes == []


def test_the_backward_is_one_opaque_op_in_a_compiled_graph():
    # The fast-path choice of the backward is made when the op runs, not baked into the trace.
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm)

    t = _t(40, 6, 7).requires_grad_(True)
    aot_function(lambda t: gram_mc(t).square().sum(), fw_compiler=keep, bw_compiler=keep)(t).backward()
    targets = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert "nst.gram_mc_backward.default" in targets and "aten.mm.default" not in targets, targets
    ref = _t(40, 6, 7).double().requires_grad_(True)
    (ref.t() @ ref).square().sum().backward()
    torch.testing.assert_close(t.grad.double(), ref.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_cuda_fast_gram_parity():
    t = _t(1 << 16, 64, 6, torch.bfloat16).cuda()
    assert fast_path(t)
    g = gram_mc(t)
    ref = t.double().t() @ t.double()
    torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-2)
    tt = t.clone().requires_grad_(True)
    gu = torch.randn(64, 64, device="cuda")
    (gram_mc(tt) * gu).sum().backward()
    ref_grad = t.double() @ (gu + gu.t()).double()
    torch.testing.assert_close(tt.grad.double(), ref_grad, rtol=1.6e-2, atol=5e-2)
