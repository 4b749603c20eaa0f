"""engine/kernels.py: the Triton kernels of the style term (forward and backward) and the
image update, against their references.

On the CPU the kernels run in Triton's interpreter, which Triton chooses once, at import
(TRITON_INTERPRET=1): the tests marked ``triton_interpreter`` run in a child pytest
started with it set (``test_the_kernels_in_triton_s_interpreter``; tests/conftest.py keeps
them out of every other process). Run them directly with
``TRITON_INTERPRET=1 pytest tests/test_kernels.py -m triton_interpreter``. There the kernels
take float32 operands, or bf16 ones upcast before the dot (the interpreter's bf16 dot
multiplies bit patterns), at odd sizes (C not a multiple of the block, M not a multiple of
the rows per block, bands of one row) with small blocks, so that every kernel runs
several programs. The bf16 tensor-core path is checked on a GPU only (``cuda``).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nst.engine import kernels
from nst.engine.kernels import (ImageAdam, Tuning, gram_backward_reference, style_tap_backward, style_tap_forward,
                                style_tap_reference)
from nst.engine.layers import IMAGENET_MEAN, IMAGENET_STD
from nst.engine.losses import gram, style_value, tv_value

needs_triton = pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed")
interpreted = pytest.mark.triton_interpreter

# Small blocks: several tiles, splits, row blocks, bands and row chunks at test sizes.
SMALL = Tuning(gram_block_c=16, gram_block_m=32, gram_split=3, bwd_block_m=32, bwd_block_n=16, bwd_block_k=16,
               image_rows=3, image_block_w=8)


@pytest.fixture
def interp(monkeypatch):
    """Triton's interpreter (this process was started with TRITON_INTERPRET=1), small blocks."""
    assert kernels.interpreting(), "run through test_the_kernels_in_triton_s_interpreter"
    monkeypatch.delenv("NST_TRITON", raising=False)
    monkeypatch.setattr(kernels, "TUNING", SMALL)
    _scalar_index_for_numpy_2_4(monkeypatch)
    return kernels


def _scalar_index_for_numpy_2_4(monkeypatch):
    """Triton 3.6's interpreter (the GPU machine's) turns a scalar into a loop bound with
    int() of a one-element array, which NumPy 2.4 refuses: every loop with a runtime bound
    fails there. Triton 3.8 squeezes the array first; do the same for older releases."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


@pytest.fixture
def gpu(monkeypatch):
    """Compiled kernels at the default tuning (never the interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NST_TRITON", raising=False)
    monkeypatch.setattr(kernels, "TUNING", Tuning())
    return kernels


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _feats(c, h, w, seed, *, relu=True, channels_last=False, dtype=torch.float32, device="cpu"):
    """Tap features (1, C, H, W): post-ReLU (zeros included) unless relu=False."""
    f = torch.randn(1, c, h, w, generator=_gen(seed))
    f = torch.relu(f) if relu else f
    f = f.to(device=device, dtype=dtype)
    return f.contiguous(memory_format=torch.channels_last) if channels_last else f


def _target(c, h, w, seed, device="cpu"):
    """A style target Gram (C, C) float32: the normalised Gram of other features."""
    return gram(_feats(c, h, w, seed))[0].to(device)


@pytest.fixture
def shuffled(monkeypatch):
    """Run the interpreter's programs in another order: "reverse" or a seed for a shuffle.
    The kernels hand work from program to program (tickets, deferred rows); their results
    must not depend on which program runs first. Returns the order actually used."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = type(builder).set_grid_idx
    order: list = []

    def use(how):
        perms = {}

        def set_grid_idx(x, y, z):
            gx, gy, _ = builder.grid_dim
            if (gx, gy) not in perms:
                p = list(range(gx * gy))
                p.reverse() if how == "reverse" else random.Random(how).shuffle(p)
                perms[gx, gy] = p
            k = perms[gx, gy][x * gy + y]
            order.append(k)
            real(builder, k // gy, k % gy, z)

        monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)
        return order

    return use


# -- guards -----------------------------------------------------------------------------------


def test_guards_say_no_without_a_gpu_the_interpreter_or_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NST_TRITON", raising=False)
    f, a, x = _feats(8, 5, 6, 0), _target(8, 5, 6, 1), torch.rand(1, 3, 5, 6)
    s = torch.randn(8, 8)
    assert not kernels.style_tap_ok(f, a)  # a CPU tensor, compiled kernels: no
    assert not kernels.gram_backward_ok(f, s)
    assert not kernels.image_update_ok(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_TRITON", {"importable": False})  # as if triton were not installed
    assert not (kernels.style_tap_ok(f, a) or kernels.gram_backward_ok(f, s) or kernels.image_update_ok(x))
    # ... and the entry points are the references then.
    for got, ref in zip(style_tap_forward(f, a, 2.0), style_tap_reference(f, a, 2.0)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(style_tap_backward(f, s), gram_backward_reference(f, s), rtol=0, atol=0)
    assert not ImageAdam(x, 0.1).fused


@interpreted
def test_guards_in_the_interpreter(interp, monkeypatch):
    f, a, x, s = _feats(8, 5, 6, 0), _target(8, 5, 6, 1), torch.rand(1, 3, 5, 6), torch.randn(8, 8)
    assert interp.style_tap_ok(f, a) and interp.gram_backward_ok(f, s) and interp.image_update_ok(x)
    assert interp.style_tap_ok(f.bfloat16(), a)  # bf16 operands, upcast before the dot
    assert not interp.style_tap_ok(f.double(), a.double())  # float64 is the gradient tests' reference
    assert not interp.style_tap_ok(f, a.double())
    assert not interp.style_tap_ok(torch.cat([f, f]), a)  # one image at a time
    assert not interp.gram_backward_ok(f, s[:4])
    assert not interp.image_update_ok(x.double())
    assert not interp.image_update_ok(torch.rand(1, 3, 4, 8193))
    monkeypatch.setenv("NST_TRITON", "0")
    assert not (interp.style_tap_ok(f, a) or interp.gram_backward_ok(f, s) or interp.image_update_ok(x))


def test_the_engine_imports_and_falls_back_without_triton():
    # A fresh interpreter in which `import triton` fails: the module imports (triton is
    # imported lazily), every guard says no, and the entry points give the references.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # `import triton` raises ImportError, find_spec says None\n"
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch\n"
        "from nst.engine import kernels as k\n"
        "f = torch.relu(torch.randn(1, 8, 5, 6)); a = torch.randn(8, 8)\n"
        "assert not k.triton_importable() and not k.style_tap_ok(f, a)\n"
        "v, g, s = k.style_tap_forward(f, a, 1.0)\n"
        "d = k.style_tap_backward(f, s)\n"
        "x = torch.rand(1, 3, 5, 6); opt = k.ImageAdam(x, 0.1); opt.step(torch.randn_like(x))\n"
        "assert not opt.fused and sys.modules['triton'] is None and opt.step_count.item() == 1\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@needs_triton
def test_the_kernels_in_triton_s_interpreter():
    """The triton_interpreter tests, in a child pytest started with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NST_TRITON", None)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton_interpreter",
                        str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in r.stdout, r.stdout[-3000:]


def _compile_for_sm90(fn, args: dict, **options):
    """Compile a kernel for sm_90 (H100/H200) without a GPU, specialised as a launch would be
    (ints equal to 1 constant, 16-divisible ones and pointers marked so); its registers and
    spilled bytes from the cubin (``cuobjdump -res-usage``, shipped with Triton)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        v = args[name]
        if isinstance(v, str):  # a pointer type
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, tuple):  # a constexpr
            sig[name], consts[name] = "constexpr", v[0]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"nst-{fn.__name__}-{os.getpid()}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    cubin.unlink()
    return {w.split(":")[0]: int(w.split(":")[1]) for w in usage.split() if w.startswith(("REG:", "STACK:"))}


@needs_triton
def test_the_kernels_compile_for_hopper_without_spills():
    # The interpreter runs Python, not the compiler: this is the CPU's check that every
    # kernel, at the default tuning and at the engine's shapes (C = 64 over 1024^2 positions,
    # C = 512 over 64^2, channels-last and NCHW), lowers to sm_90 code that keeps its
    # registers (a spill to local memory would cost these memory-bound kernels dearly).
    from nst.engine import kernels_triton as kt

    if kt.INTERPRETED:
        pytest.skip("decorated for the interpreter in this process")
    tn, P, B, I = Tuning(), "*fp32", "*bf16", "*i32"
    flags = {"UPCAST": (False,), "IEEE": (False,)}
    for c, m, cl in ((64, 1 << 20, True), (512, 4096, False)):
        sm, sc = (c, 1) if cl else (1, m)
        partial = dict(T=B, P=P, COUNTER=I, M=m, C=c, stride_m=sm, stride_c=sc, chunk=4096, TILES=c // 64, CP=c,
                       BLOCK_M=(tn.gram_block_m,), BLOCK_C=(tn.gram_block_c,), **flags)
        finish = dict(P=P, A=P, G=P, S=P, PART=P, COUNTER=I, VALUE=P, C=c, SPLITS=8, TILES=c // 64, CP=c, inv_cm=0.5,
                      s_scale=0.5, inv_cc=0.5, BLOCK_C=(tn.gram_block_c,), BLOCK_T=(64,))
        backward = dict(T=B, S=P, SCALE=P, GO=B, OUT=B, M=m, C=c, stm=sm, stc=sc, sgm=sm, sgc=sc, som=sm, soc=sc,
                        BLOCK_M=(tn.bwd_block_m,), BLOCK_N=(tn.bwd_block_n,), BLOCK_K=(tn.bwd_block_k,),
                        HAS_SCALE=(True,), HAS_GO=(True,), RELU_MASK=(True,), **flags)
        usage = [_compile_for_sm90(kt.gram_partial, partial, num_warps=tn.gram_warps, num_stages=tn.stages),
                 _compile_for_sm90(kt.style_finish, finish, num_warps=tn.gram_warps),
                 _compile_for_sm90(kt.gram_backward, backward, num_warps=tn.bwd_warps, num_stages=tn.stages)]
        assert all(u["STACK"] == 0 for u in usage), usage
    image = dict(X=P, GN=B, MV=P, VV=P, STEP=P, LR=P, ROWS=P, COUNT=I, TVP=P, TV=P, H=1024, W=1024, NB=171, R=6,
                 sxn=3 << 20, sxc=1 << 20, sxh=1024, sxw=1, sgn=3 << 20, sgc=1, sgh=3072, sgw=3,
                 BLOCK_W=(tn.image_block_w,))
    image.update(dict.fromkeys("inv_std0 inv_std1 inv_std2 tv_h tv_w inv_nh inv_nw beta1 beta2 ln_beta1 ln_beta2 eps"
                               .split(), 0.5))
    usage = _compile_for_sm90(kt.image_adam, image, num_warps=tn.image_warps)
    assert usage["STACK"] == 0 and usage["REG"] <= 128, usage


# -- (a) the style term's forward --------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("c,h,w,channels_last,dtype", [
    (40, 11, 13, False, torch.float32),  # 3 tiles of 16 (the last one half empty), 3 splits of M = 143
    (24, 9, 7, True, torch.float32),  # channels-last: the contiguous (M, C) view
    (40, 11, 13, True, torch.bfloat16),  # bf16 operands, upcast in the interpreter
])
def test_style_tap_forward_matches_float64(interp, c, h, w, channels_last, dtype):
    f = _feats(c, h, w, 2, channels_last=channels_last, dtype=dtype)
    a, coef = _target(c, h, w, 3), 3.7
    value, g, s = style_tap_forward(f, a, coef)
    assert value.shape == () and g.shape == s.shape == (c, c)
    assert value.dtype == g.dtype == s.dtype == torch.float32
    # float64 on the same (bf16-rounded) values: what is left is float32 accumulation.
    rv, rg, rs = style_tap_reference(f.double(), a.double(), coef)
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-6 * rg.abs().max().item())
    torch.testing.assert_close(value.double(), rv, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-6 * rs.abs().max().item())
    assert torch.equal(g, g.t())  # mirrored tiles: exactly symmetric
    # ... and the float32 compiled path's ops agree as closely.
    for got, ref in zip((value, g, s), style_tap_reference(f, a, coef)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@interpreted
def test_style_tap_value_is_differentiable_like_the_loss_module(interp):
    # Used inside autograd, the value's backward is the next kernel (no mask: it is a
    # gradient w.r.t. the tap, and autograd's ReLU backward follows where there is one).
    c, h, w = 40, 11, 13
    f = _feats(c, h, w, 4, relu=False).requires_grad_(True)  # a conv tap: negatives stay
    a = _target(c, h, w, 5)
    value, g, s = style_tap_forward(f, a, 1.0)
    assert value.requires_grad and not g.requires_grad and not s.requires_grad
    (2.5 * value).backward()
    ref = f.detach().double().requires_grad_(True)
    (2.5 * style_value(ref, a.double().unsqueeze(0))).backward()
    torch.testing.assert_close(f.grad.double(), ref.grad, rtol=1e-5, atol=1e-6 * ref.grad.abs().max().item())


@interpreted
def test_style_tap_forward_is_deterministic_in_any_program_order(interp, shuffled):
    f, a = _feats(40, 11, 13, 6), _target(40, 11, 13, 7)
    first = style_tap_forward(f, a, 2.0)
    for how in ("reverse", 1):
        order = shuffled(how)
        again = style_tap_forward(f, a, 2.0)
        assert order[:3] != [0, 1, 2]  # the programs did run in another order
        for x, y in zip(first, again):
            assert torch.equal(x, y)  # in split and tile order whichever program finishes last


# -- (b) its backward ---------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("channels_last,relu_mask,with_scale,with_grad_out,dtype", [
    (False, True, False, False, torch.float32),  # M = 143 rows (5 blocks of 32), C = 40 (3 of 16)
    (True, True, True, True, torch.float32),
    (False, False, True, False, torch.float32),  # a conv tap: no mask
    (True, True, False, True, torch.bfloat16),
])
def test_gram_backward_matches_float64(interp, channels_last, relu_mask, with_scale, with_grad_out, dtype):
    c, h, w = 40, 11, 13
    f = _feats(c, h, w, 8, relu=relu_mask, channels_last=channels_last, dtype=dtype)
    s = torch.randn(c, c, generator=_gen(9)) * 1e-3  # not symmetric: S + S^T matters
    scale = torch.tensor(1.75) if with_scale else None
    go = _feats(c, h, w, 10, relu=False, dtype=dtype) * 0.1 if with_grad_out else None
    d = style_tap_backward(f, s, scale, go, relu_mask)
    assert d.dtype == dtype and d.shape == f.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert d.is_contiguous(memory_format=fmt)  # the features' memory format
    ref = gram_backward_reference(f.double(), s.double(), None if scale is None else scale.double(),
                                  None if go is None else go.double(), relu_mask)
    if relu_mask:
        assert torch.equal(d == 0, ref == 0) and (ref == 0).any()  # zero exactly where f <= 0
    # float32 rounding; bf16 output rounding (8 bits) for bf16 features.
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(d.double(), ref, rtol=rtol, atol=rtol * 1e-2 * ref.abs().max().item())


# -- (a) + (b) as one autograd node -----------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("channels_last,dtype,deeper", [
    (False, torch.float32, True),  # dX = mask * (F (S + S^T) d_value + dY)
    (True, torch.float32, False),  # the deepest tap: no dY
    (True, torch.bfloat16, True),
])
def test_relu_style_tap_backward_is_the_fused_kernel(interp, channels_last, dtype, deeper):
    c, h, w = 40, 11, 13
    x = _feats(c, h, w, 12, relu=False, channels_last=channels_last, dtype=dtype).requires_grad_(True)
    a, wd = _target(c, h, w, 13), torch.randn(1, c, h, w, generator=_gen(14))
    y, value = kernels.relu_style_tap(x, a)
    ((2.5 * value) + ((y.float() * wd).sum() if deeper else 0)).backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.relu(x64)
    v64 = style_value(y64, a.double().unsqueeze(0))
    # dY as the kernel gets it: the gradient of a bf16 y is bf16.
    ((2.5 * v64) + ((y64 * wd.to(dtype).double()).sum() if deeper else 0)).backward()
    assert torch.equal(y, torch.relu(x.detach()))
    rtol = 1e-5 if dtype == torch.float32 else 8e-3  # float32 rounding; bf16 output rounding
    torch.testing.assert_close(value.double(), v64.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=rtol * 0.1 * x64.grad.abs().max().item())
    assert torch.equal(x.grad == 0, x64.grad == 0)  # the ReLU's mask, exactly


# -- (c) the image update -------------------------------------------------------------------------


def _moments_close(opt, exp_avg, exp_avg_sq):
    """float32 rounding relative to each moment's scale (an element can cancel to ~0)."""
    for got, want in ((opt.exp_avg, exp_avg), (opt.exp_avg_sq, exp_avg_sq)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _adam_pair(h, w, seed, tv_weight=3.0, n=1):
    x0 = torch.rand(n, 3, h, w, generator=_gen(seed))
    x0[..., 0, :], x0[..., -1, :] = 0.0, 1.0  # rows at the bounds: the clamp acts
    return ImageAdam(x0.clone(), 0.05, tv_weight=tv_weight), ImageAdam(x0.clone(), 0.05, tv_weight=tv_weight)


@interpreted
@pytest.mark.parametrize("n,h,w,rows,channels_last,dtype", [
    (1, 11, 13, 3, False, torch.float32),  # bands of 3, 3, 3, 2 rows; rows in chunks of 8 columns
    (1, 10, 13, 3, True, torch.bfloat16),  # a last band of one row; a bf16 channels-last gradient
    (2, 7, 9, 7, False, torch.float32),  # one band per plane: no hand-off; two images
])
def test_image_update_matches_the_reference(interp, monkeypatch, n, h, w, rows, channels_last, dtype):
    monkeypatch.setattr(kernels, "TUNING", Tuning(image_rows=rows, image_block_w=8))
    fused, ref = _adam_pair(h, w, 11, n=n)
    assert fused.fused and fused.rows == rows
    ref.fused = False
    for i, lr in enumerate((0.05, 0.05, 0.02)):
        fused.set_lr(lr)
        ref.set_lr(lr)
        gn = torch.randn(n, 3, h, w, generator=_gen(20 + i)).to(dtype) * 1e-2
        gn = gn.contiguous(memory_format=torch.channels_last) if channels_last else gn
        tv, tv_ref = fused.step(gn), ref.step(gn)
        torch.testing.assert_close(tv, tv_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused.x, ref.x, rtol=0, atol=1e-6)  # pixels in [0, 1]
        _moments_close(fused, ref.exp_avg, ref.exp_avg_sq)
        assert fused.step_count.item() == ref.step_count.item() == i + 1
        assert fused.work.eq(0).all()  # the counters are back to zero for the next launch
    assert fused.x.min() == 0 and fused.x.max() == 1


def test_image_update_reference_is_torch_adam_on_autograd_gradients():
    # The reference against the textbook: autograd's gradient of (the network's input
    # normalisation, then a linear stand-in for the network) + tv_weight * tv, torch.optim.Adam,
    # clamp; a learning rate changed between steps.
    h, w, tv_weight = 10, 13, 3.0
    x0 = torch.rand(1, 3, h, w, generator=_gen(30))
    p = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05, betas=(0.8, 0.99), eps=1e-7)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mine = ImageAdam(x0.clone(), 0.05, betas=(0.8, 0.99), eps=1e-7, tv_weight=tv_weight)
    mine.fused = False
    for i, lr in enumerate((0.05, 0.05, 0.01, 0.01)):
        gn = torch.randn(1, 3, h, w, generator=_gen(40 + i)) * 1e-2  # d loss / d normalised input
        opt.param_groups[0]["lr"] = lr
        mine.set_lr(lr)
        opt.zero_grad()
        tv = tv_value(p)
        (((p - mean) / std * gn).sum() + tv_weight * tv).backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(0.0, 1.0)
        torch.testing.assert_close(mine.step(gn), tv.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(mine.x, p.detach(), rtol=0, atol=1e-6)
        st = opt.state[p]
        _moments_close(mine, st["exp_avg"], st["exp_avg_sq"])
        assert mine.step_count.item() == st["step"].item() == i + 1


@interpreted
def test_image_update_is_the_same_in_any_program_order(interp, monkeypatch, shuffled):
    # Bands of 2 rows: every band hands rows to both neighbours; in order the upper band of
    # a boundary arrives first, in reverse the lower one, shuffled either.
    monkeypatch.setattr(kernels, "TUNING", Tuning(image_rows=2, image_block_w=8))
    runs = []
    for how in (None, "reverse", 2):
        if how is not None:
            order = shuffled(how)
        opt, _ = _adam_pair(9, 11, 50)
        tvs = [opt.step(torch.randn(1, 3, 9, 11, generator=_gen(60 + i)) * 1e-2) for i in range(2)]
        runs.append((opt.x, opt.exp_avg, opt.exp_avg_sq, opt.step_count, *tvs))
    assert order and order != sorted(order)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@interpreted
def test_the_timing_script_runs(interp, monkeypatch, tmp_path):
    # bench/kernel_timing.py times on a GPU; here it only has to run (interpreted kernels).
    from nst.bench import kernel_timing

    monkeypatch.setattr(kernels, "TUNING", Tuning())
    out = tmp_path / "kernels.json"
    args = ["--device", "cpu", "--sizes", "16", "--reps", "1", "--no-compile", "--json", str(out)]
    assert kernel_timing.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["style forward", "style backward", "image update"]
    assert all(r["engine"] > 0 and r["kernel"] > 0 for r in rows)


# -- registration -----------------------------------------------------------------------------------


@interpreted
def test_the_ops_pass_opcheck(interp):
    # Schemas (declared mutations included), fake implementations, autograd registration;
    # tiny shapes: opcheck runs each op many times.
    f = _feats(16, 5, 6, 70, channels_last=True)
    t = kernels._mc(f).requires_grad_(True)
    torch.library.opcheck(kernels._style_tap, (t, _target(16, 5, 6, 71), 3.0))
    torch.library.opcheck(kernels._gram_relu_backward,
                          (kernels._mc(_feats(16, 5, 6, 72)), torch.randn(16, 16), torch.tensor(2.0), t.detach(), True))
    torch.library.opcheck(kernels._relu_style_tap,
                          (kernels._mc(_feats(16, 5, 6, 74, relu=False)).requires_grad_(True), _target(16, 5, 6, 75)))
    x = torch.rand(1, 3, 5, 4, generator=_gen(73))
    o = ImageAdam(x, 0.05, tv_weight=2.0)
    torch.library.opcheck(kernels._image_adam, (x, torch.randn_like(x), o.exp_avg, o.exp_avg_sq, o.step_count, o.lr,
                                                o.work, 0.9, 0.999, 1e-8, 2.0, o.rows))


@interpreted
def test_compiled_entry_points_take_the_kernels_and_match_eager(interp):
    f, a = _feats(24, 9, 7, 80), _target(24, 9, 7, 81)
    x0 = torch.rand(1, 3, 10, 9, generator=_gen(82))
    gn = torch.randn(1, 3, 10, 9, generator=_gen(83)) * 1e-2
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(opt, f, a, gn):
        value, g, s = style_tap_forward(f, a, 3.0)
        return value, style_tap_backward(f, s), opt.step(gn)

    eager, compiled = ImageAdam(x0.clone(), 0.05, tv_weight=2.0), ImageAdam(x0.clone(), 0.05, tv_weight=2.0)
    want = step(eager, f, a, gn)
    got = torch.compile(step, backend=backend, fullgraph=True)(compiled, f, a, gn)
    ops = {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}
    assert {"nst.style_tap.default", "nst.gram_relu_backward.default", "nst.image_adam.default"} <= ops, ops
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    for name in ("x", "exp_avg", "exp_avg_sq", "step_count"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name))


# -- the GPU: bf16 tensor cores, compiled kernels, CUDA graphs ------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("c,h,w,channels_last", [
    (64, 512, 512, True), (128, 256, 256, True), (256, 128, 128, False), (512, 64, 64, True), (512, 32, 32, True),
    (96, 37, 53, False),  # odd: C not a multiple of 64, M not of 128
])
def test_cuda_style_tap_bf16(gpu, c, h, w, channels_last):
    f = _feats(c, h, w, 90, channels_last=channels_last, dtype=torch.bfloat16, device="cuda")
    a, coef = _target(c, h // 2, w // 2, 91, "cuda"), 5.0
    assert gpu.style_tap_ok(f, a)
    value, g, s = style_tap_forward(f, a, coef)
    rv, rg, rs = style_tap_reference(f.double(), a.double(), coef)  # the same bf16 values, exactly
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-5 * rg.abs().max().item())
    torch.testing.assert_close(value.double(), rv, rtol=1e-4, atol=0)
    torch.testing.assert_close(s.double(), rs, rtol=1e-4, atol=1e-5 * rs.abs().max().item())
    # ... and the engine's own path (nst::gram_mc, bf16 tensor cores) agrees as closely.
    for got, ref in zip((value, g, s), style_tap_reference(f, a, coef)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    again = style_tap_forward(f, a, coef)
    assert all(torch.equal(x, y) for x, y in zip((value, g, s), again))  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("c,h,w,channels_last", [(64, 512, 512, True), (512, 64, 64, True), (96, 37, 53, False)])
def test_cuda_gram_backward_bf16(gpu, c, h, w, channels_last):
    f = _feats(c, h, w, 92, channels_last=channels_last, dtype=torch.bfloat16, device="cuda")
    s = torch.randn(c, c, generator=_gen(93)).cuda() * 1e-3
    go = _feats(c, h, w, 94, relu=False, dtype=torch.bfloat16, device="cuda") * 0.1
    scale = torch.tensor(1.5, device="cuda")
    d = style_tap_backward(f, s, scale, go)
    ref = gram_backward_reference(f.double(), s.double(), scale.double(), go.double())
    assert d.dtype == torch.bfloat16 and torch.equal(d == 0, ref == 0)
    # S + S^T in bf16 (as nst::gram_mc's bf16 backward) and a bf16 result: bf16 tolerances.
    torch.testing.assert_close(d.double(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("c,h,w", [(64, 512, 512), (512, 64, 64), (96, 37, 53)])
def test_cuda_relu_style_tap_bf16(gpu, c, h, w):
    x = _feats(c, h, w, 120, relu=False, channels_last=True, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    a, wd = _target(c, h // 2, w // 2, 121, "cuda"), torch.randn(1, c, h, w, generator=_gen(122)).cuda()
    y, value = kernels.relu_style_tap(x, a)
    (2.5 * value + (y.float() * wd).sum()).backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.relu(x64)
    (2.5 * style_value(y64, a.double().unsqueeze(0)) + (y64 * wd.bfloat16().double()).sum()).backward()
    torch.testing.assert_close(value.double(), style_value(y64, a.double().unsqueeze(0)).detach(), rtol=1e-4, atol=0)
    assert torch.equal(x.grad == 0, x64.grad == 0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1.6e-2, atol=1e-2 * x64.grad.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("h,w", [(1024, 1024), (517, 771)])
def test_cuda_image_update_matches_the_reference(gpu, h, w):
    # Hundreds of bands running at once: the hand-offs under real concurrency.
    x0 = torch.rand(1, 3, h, w, generator=_gen(95)).cuda()
    fused, ref = ImageAdam(x0.clone(), 0.05, tv_weight=3.0), ImageAdam(x0.clone(), 0.05, tv_weight=3.0)
    ref.fused = False
    again = ImageAdam(x0.clone(), 0.05, tv_weight=3.0)
    assert fused.fused
    for i in range(5):
        gn = (torch.randn(1, 3, h, w, generator=_gen(96 + i)) * 1e-2).cuda().bfloat16()
        gn = gn.contiguous(memory_format=torch.channels_last)
        tv, tv_ref, tv_again = fused.step(gn), ref.step(gn), again.step(gn)
        torch.testing.assert_close(tv, tv_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(fused.x, ref.x, rtol=0, atol=1e-6)
        _moments_close(fused, ref.exp_avg, ref.exp_avg_sq)
        assert torch.equal(fused.x, again.x) and torch.equal(tv, tv_again)  # deterministic
    assert fused.step_count.item() == 5 and fused.work.eq(0).all()


@pytest.mark.cuda
def test_cuda_graph_replays_the_kernels(gpu):
    # Captured once, replayed with new inputs and learning rates: the step count, lr and
    # counters live on the device, nothing is decided on the host between replays.
    a = _target(64, 8, 8, 98, "cuda")
    f0 = _feats(64, 128, 128, 97, channels_last=True, dtype=torch.bfloat16, device="cuda")
    x0 = torch.rand(1, 3, 256, 256, generator=_gen(99)).cuda()
    f, gn = f0.clone(), torch.zeros(1, 3, 256, 256, device="cuda")
    opt, ref = ImageAdam(x0.clone(), 0.05, tv_weight=3.0), ImageAdam(x0.clone(), 0.05, tv_weight=3.0)
    ref.fused = False

    def step():
        value, _, s = style_tap_forward(f, a, 2.0)
        return value, style_tap_backward(f, s), opt.step(gn)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # one real step: compiles the kernels, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    ref.step(gn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()  # recorded, not run
    for i, lr in enumerate((0.05, 0.03, 0.01)):
        f.copy_(_feats(64, 128, 128, 100 + i, channels_last=True, dtype=torch.bfloat16, device="cuda"))
        gn.copy_(torch.randn(1, 3, 256, 256, generator=_gen(110 + i)).cuda() * 1e-2)
        opt.set_lr(lr)
        ref.set_lr(lr)
        graph.replay()
        value, _, s = style_tap_reference(f, a, 2.0)
        torch.testing.assert_close(out[0], value, rtol=1e-4, atol=0)
        d_ref = gram_backward_reference(f.double(), s.double())
        torch.testing.assert_close(out[1].double(), d_ref, rtol=1.6e-2, atol=1e-2 * d_ref.abs().max().item())
        torch.testing.assert_close(out[2], ref.step(gn), rtol=1e-5, atol=0)
        torch.testing.assert_close(opt.x, ref.x, rtol=0, atol=1e-6)
    assert opt.step_count.item() == ref.step_count.item() == 1 + 3 and opt.work.eq(0).all()
