"""The Gram product as one custom operator: ``nst::gram_mc``, G = T^T T for T (M, C).

Why an operator of our own:

- **bf16 features, float32 Gram, on tensor cores.** On the bf16 path the features come
  out of the convolutions in bf16. Upcasting them to float32 first runs the Gram on
  the FFMA units after a copy (on an H100, for C = 64 and M = 1024^2: 0.49 ms upcast +
  fp32, against 0.058 ms for bf16 operands with float32 accumulation and output, relative
  error 3e-5 against float64; issue #14). ``torch.mm(a, b, out_dtype=torch.float32)``
  does the latter, but only on CUDA and without an autograd formula (torch 2.11), so the
  operator carries its own backward and its own CPU fallback.
- **Half the backward.** Autograd through ``t.t() @ t`` runs two (M, C) x (C, C)
  products, one per operand; since both operands are T, dT = T (dG + dG^T) needs one.
- **Compilable.** A ``torch.library.custom_op`` with a fake (meta) implementation is
  opaque to torch.compile, which traces around it instead of through a Python
  autograd.Function, and the engine's CUDA graph captures it like any other kernel.

The guard: the fast kernel runs for bf16/fp16 CUDA tensors when this torch has it
(checked once per device and dtype on real tensors, outside any graph capture or trace:
the backward is an opaque op of its own, ``nst::gram_mc_backward``, so that a compiled
backward decides when it runs, not when it is traced); ``NST_FAST_GRAM=0`` forces the
fallback (upcast, then an ordinary float32 matmul, forward and backward) everywhere.
The backward of bf16 features is a bf16 product on the fast path; of fp16 features
always a float32 one (fp16's range is too small for dG). Float32 and float64 inputs
take the ordinary matmul in their own dtype: that is the reference path.
"""

from __future__ import annotations

import os

import torch

_HALF = (torch.bfloat16, torch.float16)
_WORKS: dict = {}  # (device, dtype) -> whether the out_dtype kernel ran there (tried once)


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision features, else the input's own (float64 for gradcheck)."""
    return torch.float32 if t.dtype in _HALF else t.dtype


def _mm_out_dtype_works(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=float32)`` runs here (tried on a tiny matrix)."""
    try:
        a = torch.ones(8, 16, device=device, dtype=dtype)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tracer's stand-in or a tracer is running (torch.compile, export,
    make_fx, a FakeTensorMode or any other dispatch mode): what runs now is a trace, not
    the kernel, so nothing learnt here says whether the kernel works."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if type(t) not in (torch.Tensor, torch.nn.Parameter):  # FakeTensor, FunctionalTensor, ...
        return True
    return torch._C._len_torch_dispatch_stack() > 0  # FakeTensorMode, ProxyTorchDispatchMode, ...


def fast_path(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the tensor-core path (bf16/fp16 operands, float32 accumulation).

    Decided once per device and dtype on real tensors only. Under tracing the probe would
    run on fake tensors, where ``mm(out_dtype=...)`` "works" whether or not the kernel
    exists (and would be cached for the real run): a trace gets the answer an eager call
    already found, else the safe path, and caches nothing. The operator's own forward and
    backward decide inside opaque ops, so they always decide on real tensors."""
    if os.environ.get("NST_FAST_GRAM", "1") == "0" or not t.is_cuda or t.dtype not in _HALF:
        return False
    key = (str(t.device), t.dtype)
    if key not in _WORKS:
        if tracing(t) or torch.cuda.is_current_stream_capturing():
            return False  # never try a kernel for the first time in a trace or a capture: the safe path
        _WORKS[key] = _mm_out_dtype_works(*key)
    return _WORKS[key]


@torch.library.custom_op("nst::gram_mc", mutates_args=())
def gram_mc(t: torch.Tensor) -> torch.Tensor:
    """G = T^T T, (M, C) -> (C, C); float32 for bf16/fp16/fp32 input, float64 for float64."""
    if fast_path(t):
        return torch.mm(t.t(), t, out_dtype=torch.float32)  # (C, C) fp32, bf16 tensor cores
    tf = t.to(_out_dtype(t))
    return tf.t() @ tf  # (C, C)


@gram_mc.register_fake
def _(t):
    return t.new_empty((t.shape[1], t.shape[1]), dtype=_out_dtype(t))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # T as is: no copy of the features


@torch.library.custom_op("nst::gram_mc_backward", mutates_args=())
def gram_mc_backward(t: torch.Tensor, s: torch.Tensor, s_cast: torch.Tensor) -> torch.Tensor:
    """dT = T S for S = dG + dG^T (C, C) of G = T^T T; ``s_cast`` is S in T's dtype.
    (M, C) -> (M, C) in T's dtype, contiguous. An opaque op of its own so that the
    fast-path choice is made when it runs, on real tensors, and never baked into a compiled
    backward while tracing it; S and its cast are formed outside, where a compiled
    backward fuses them with the loss's other elementwise work."""
    if t.dtype == torch.bfloat16 and fast_path(t):
        # The gradient of bf16 features is bf16 whatever we do (autocast's cast node makes it
        # so), which is what the convolutions' bf16 backward takes: one bf16 product with
        # float32 accumulation. (bf16 has float32's range, so dG survives the cast.)
        return t @ s_cast  # (M, C) bf16
    if t.dtype in _HALF:
        # fp16: dG is often below fp16's normal range (about 4e-6 at relu5_1 for the default
        # weights), so the product runs in float32 and only the result is cast.
        return (t.float() @ s).to(t.dtype)
    return (t @ s_cast).contiguous()  # (M, C)


@gram_mc_backward.register_fake
def _(t, s, s_cast):
    return t.new_empty(t.shape)  # (M, C), contiguous, T's dtype


def _backward(ctx, g):  # g: (C, C), float32 (or float64)
    (t,) = ctx.saved_tensors
    s = g + g.t()  # (C, C): dG + dG^T, since both operands of the product are T
    return gram_mc_backward(t, s, s.to(t.dtype))


gram_mc.register_autograd(_backward, setup_context=_setup)
