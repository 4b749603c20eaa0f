"""Triton kernels for what inductor leaves unfused (issue #24, item 3), for a fused GPU step.

Three kernels, each with a pure-PyTorch reference beside it (the ops torch.compile fuses
on its own: the "compiled path"), a guard saying whether the kernel may run on a tensor,
and an operator torch.compile and CUDA graphs take (``torch.library.custom_op`` with a fake
implementation: opaque to the compiler, captured like any kernel):

- ``style_tap_forward(f, target, coef) -> (value, g, s)``: the style term of one tap.
  G = F^T F from the tap's features (bf16 operands, float32 accumulation, split over M
  with a deterministic reduction), then ``value = losses.style_value_raw(G, A, C, M)`` and
  ``s = losses.style_grad_raw(G, A, C, M, coef)``: two launches (``nst::style_tap``).
  ``value`` is differentiable (its backward is the next kernel), ``g`` and ``s`` are not.
- ``style_tap_backward(f, s, scale, grad_out, relu_mask) -> dX``: [F > 0] * (F (S + S^T)
  * scale + grad_out), one GEMM with its epilogue (``nst::gram_relu_backward``): with the
  mask, the gradient at the conv output under the tap's ReLU.
- ``relu_style_tap(x, target) -> (y, value)``: both inside autograd, for a step that keeps
  it: the tap's ReLU and style value as one node whose backward is the (b) kernel with the
  deeper layers' gradient and the mask, one launch (``nst::relu_style_tap``).
- ``ImageAdam(x, lr, ...).step(grad_xn) -> tv``: the normalisation's backward (grad / std),
  tv_weight * the TV gradient, one Adam step (torch.optim.Adam's formula; step count and
  lr on the device) and the clamp to [0, 1], in place, in one launch (``nst::image_adam``);
  it also returns ``losses.tv_value`` of the image before the step.

The guards (``style_tap_ok``, ``gram_backward_ok``, ``image_update_ok``): Triton
importable, ``NST_TRITON`` not "0", a CUDA tensor of a dtype the kernel is for (bf16
features; any float gradient and a float32 image), or a CPU tensor under Triton's
interpreter (``TRITON_INTERPRET=1``: how the tests run them; there the kernels take float32
operands, bf16 ones upcast before the dot, whose interpreter version multiplies bf16 bit
patterns). The entry points fall back to the references where a guard says no. The
``kernels`` step variant (engine/fused.py) runs them; on a GPU it is one of the candidates
timed at the first render of a size (engine/variants.py), so it runs only where it measured
fastest and passed the parity check.

Triton kernels compile on their first call (seconds): call each entry point once before a
CUDA graph capture (the steppers' eager warm-up steps do).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .layers import IMAGENET_STD
from .losses import gram_backward, gram_raw, style_grad_raw, style_value_raw, tv_grad, tv_value

# -- the guards ----------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter, on the CPU (``TRITON_INTERPRET=1``,
    set before Triton is imported: tests/test_kernels.py runs such tests in a child process)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON: dict = {}  # "importable" -> bool, once tried (a plain dict: torch.compile traces through it)


def triton_importable() -> bool:
    if "importable" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError:
            _TRITON["importable"] = False
        else:
            _TRITON["importable"] = True
    return _TRITON["importable"]


def enabled() -> bool:
    """Triton importable and not switched off (``NST_TRITON=0``)."""
    return os.environ.get("NST_TRITON", "1") != "0" and triton_importable()


def _device_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _feature_dtypes(t: torch.Tensor) -> tuple:
    # On a GPU the kernels are for bf16 features (float32 ones keep cuBLAS's IEEE product);
    # in the interpreter float32 too, since that is how the tests check the arithmetic.
    return (torch.bfloat16,) if t.is_cuda else (torch.bfloat16, torch.float32)


def _offsets_fit(t: torch.Tensor, rows: int) -> bool:
    """Whether offsets inside a block of ``rows`` rows of t (M, C) fit in 32 bits (the
    kernels keep 64-bit scalar bases and 32-bit block offsets)."""
    return (rows - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) < 2**31


def _tap_ok(f: torch.Tensor) -> bool:
    if not (enabled() and _device_ok(f) and f.dim() == 4 and f.shape[0] == 1 and f.numel() > 0
            and f.dtype in _feature_dtypes(f)):
        return False
    return _offsets_fit(_mc(f), max(TUNING.gram_block_m, TUNING.bwd_block_m))


def style_tap_ok(f: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``style_tap_forward`` may run the kernel on features ``f`` (1, C, H, W)."""
    return (_tap_ok(f) and target.dtype == torch.float32 and target.numel() == f.shape[1] ** 2
            and target.device == f.device)


def gram_backward_ok(f: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether ``style_tap_backward`` may run the kernel on ``f`` (1, C, H, W) and S (C, C)."""
    return _tap_ok(f) and s.dtype == torch.float32 and s.shape == (f.shape[1], f.shape[1]) and s.device == f.device


def image_update_ok(x: torch.Tensor) -> bool:
    """Whether ``ImageAdam`` may run the kernel on the image ``x`` (N, 3, H, W), float32."""
    return (enabled() and _device_ok(x) and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3
            and x.shape[2] >= 2 and 2 <= x.shape[3] <= 8192)


# -- launch settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """Block sizes and splits: first guesses for an H100/H200, compiled for sm_90 with
    triton 3.6 and 3.8 without spills (never timed: the GPU check sweeps them). Tests swap
    ``TUNING`` for small blocks, which the interpreter runs fast."""

    gram_block_c: int = 64  # G tile side
    gram_block_m: int = 128  # rows of F per dot
    gram_split: int | None = None  # splits over M; None: about two programs per SM
    gram_warps: int = 4
    bwd_block_m: int = 128
    bwd_block_n: int = 64
    bwd_block_k: int = 64
    bwd_warps: int = 8
    stages: int = 3
    image_rows: int | None = None  # rows per band; None: about four programs per SM
    image_block_w: int = 512  # columns per chunk of a row (48 registers at 4 warps, sm_90)
    image_warps: int = 4


TUNING = Tuning()


def _kt():
    """The kernels module (imported on the first launch)."""
    from . import kernels_triton as kt

    if kt.INTERPRETED != interpreting():
        # Triton reads TRITON_INTERPRET when it decorates a kernel (its own standard
        # library's included, at `import triton`): the mode is the process's.
        raise RuntimeError("TRITON_INTERPRET changed after the Triton kernels were loaded; set it before starting")
    return kt


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    d = torch.device(device)
    return torch.cuda.get_device_properties(d).multi_processor_count if d.type == "cuda" else 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mc(f: torch.Tensor) -> torch.Tensor:
    """The (M, C) view of one image's features (1, C, H, W): free for NCHW and channels-last."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"{what}: the Triton kernel cannot run on these tensors (see engine/kernels.py's guards)")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# -- (a) the style term of one tap, forward ------------------------------------------------


def style_tap_reference(f: torch.Tensor, target: torch.Tensor, coef: float):
    """The compiled path's ops: nst::gram_mc, then losses.style_value_raw / style_grad_raw.
    f (1, C, H, W); target (C, C) or (1, C, C) -> value (), g (C, C), s (C, C), float32."""
    c, m = f.shape[1], f.shape[2] * f.shape[3]
    with torch.autocast(f.device.type, enabled=False):
        g = gram_raw(f)  # (C, C)
        value = style_value_raw(g, target, c, m)
        s = style_grad_raw(g.detach(), target, c, m, coef)
    return value, g.detach(), s


def _gram_splits(m: int, c: int, device: str) -> tuple[int, int, int]:
    """(tiles per side, rows per split, splits) for G = T^T T over M rows."""
    tn = TUNING
    tiles = _cdiv(c, tn.gram_block_c)
    split = tn.gram_split or _cdiv(2 * _sm_count(device), tiles * (tiles + 1) // 2)
    split = max(1, min(split, _cdiv(m, tn.gram_block_m)))
    chunk = _cdiv(_cdiv(m, split), tn.gram_block_m) * tn.gram_block_m
    return tiles, chunk, _cdiv(m, chunk)


@torch.library.custom_op("nst::style_tap", mutates_args=())
def _style_tap(t: torch.Tensor, target: torch.Tensor, coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (M, C) features, target (C, C) float32 -> (value, G, S): see style_tap_forward."""
    _require(enabled() and _device_ok(t), "nst::style_tap")
    m, c = t.shape
    tn, kt = TUNING, _kt()
    tiles, chunk, splits = _gram_splits(m, c, str(t.device))
    cp = tiles * tn.gram_block_c
    f32 = {"dtype": torch.float32, "device": t.device}
    partial = torch.empty((splits, cp, cp), **f32)  # per split, the upper tiles of G
    part = torch.empty(tiles * tiles, **f32)  # per tile, its sum of squares
    counter = torch.empty(1, dtype=torch.int32, device=t.device)  # zeroed by gram_partial
    value, g, s = torch.empty((), **f32), torch.empty((c, c), **f32), torch.empty((c, c), **f32)
    upcast = interpreting() and t.dtype != torch.float32
    ieee = upcast or t.dtype == torch.float32
    kt.gram_partial[(tiles * tiles, splits)](
        t, partial, counter, m, c, t.stride(0), t.stride(1), chunk, tiles, cp, BLOCK_M=tn.gram_block_m,
        BLOCK_C=tn.gram_block_c, UPCAST=upcast, IEEE=ieee, num_warps=tn.gram_warps, num_stages=tn.stages)
    inv_cm = 1.0 / (c * m)
    kt.style_finish[(tiles * tiles,)](
        partial, target.reshape(c, c).contiguous(), g, s, part, counter, value, c, splits, tiles, cp, inv_cm,
        2.0 * coef * inv_cm / (c * c), 1.0 / (c * c), BLOCK_C=tn.gram_block_c, BLOCK_T=_pow2(tiles * tiles),
        num_warps=tn.gram_warps)
    return value, g, s


@_style_tap.register_fake
def _(t, target, coef):
    c = t.shape[1]
    return (t.new_empty((), dtype=torch.float32), t.new_empty((c, c), dtype=torch.float32),
            t.new_empty((c, c), dtype=torch.float32))


def _style_tap_setup(ctx, inputs, output):
    t, target, _ = inputs
    _, g, s = output
    ctx.save_for_backward(t, target, g)
    ctx.mark_non_differentiable(g, s)


def _style_tap_backward(ctx, d_value, d_g, d_s):
    # d value / dT = T (S1 + S1^T) with S1 = d value / dG (coefficient 1), times d_value.
    t, target, g = ctx.saved_tensors
    m, c = t.shape
    s1 = style_grad_raw(g, target, c, m, 1.0)  # (C, C)
    return _gram_relu_backward(t, s1, d_value.float().reshape(()), None, False), None, None


_style_tap.register_autograd(_style_tap_backward, setup_context=_style_tap_setup)


def style_tap_forward(f: torch.Tensor, target: torch.Tensor, coef: float):
    """ENTRY POINT (a): the style term of one tap, forward, in two launches.

    f: the tap's features (1, C, H, W), any memory format (bf16 on a GPU); target: its
    Gram A, (C, C) or (1, C, C), float32; coef: a Python number, the factor of this term
    in the loss being differentiated (for an explicit-gradient step: style_weight *
    style_coef_l * grad_scale). Returns (value, g, s), float32:
      value = losses.style_value_raw(G, A, C, M)  (), differentiable w.r.t. f;
      g     = G = F^T F unnormalised                 (C, C);
      s     = losses.style_grad_raw(G, A, C, M, coef) = d(coef * value)/dG  (C, C).
    The kernel where style_tap_ok(f, target), else style_tap_reference (same contract)."""
    if style_tap_ok(f, target):
        return _style_tap(_mc(f), target, float(coef))
    return style_tap_reference(f, target, coef)


# -- (b) its backward: one GEMM with the ReLU mask in its epilogue ---------------------------


def gram_backward_reference(f: torch.Tensor, s: torch.Tensor, scale: torch.Tensor | None = None,
                            grad_out: torch.Tensor | None = None, relu_mask: bool = True) -> torch.Tensor:
    """The compiled path's ops: losses.gram_backward (float32), times scale, plus grad_out,
    zero where f <= 0; in f's dtype. f, grad_out (1, C, H, W); s (C, C); scale () or None."""
    d = gram_backward(f, s)  # (1, C, H, W) float32: (S + S^T) F
    if scale is not None:
        d = d * scale
    if grad_out is not None:
        d = d + grad_out
    if relu_mask:
        d = torch.where(f > 0, d, 0.0)
    return d.to(f.dtype)


def _dense_strides(t: torch.Tensor) -> tuple[int, int]:
    """The output's strides for features t (M, C): t's own when it is the (M, C) view of
    NCHW features, else row-major (channels-last): dX has the features' memory format."""
    m, c = t.shape
    return (1, m) if c > 1 and m > 1 and t.stride() == (1, m) else (c, 1)


@torch.library.custom_op("nst::gram_relu_backward", mutates_args=())
def _gram_relu_backward(t: torch.Tensor, s: torch.Tensor, scale: torch.Tensor | None, grad_out: torch.Tensor | None,
                        relu_mask: bool) -> torch.Tensor:
    """t (M, C), s (C, C) float32 contiguous, scale () float32, grad_out (M, C) -> (M, C) in t's dtype."""
    _require(enabled() and _device_ok(t), "nst::gram_relu_backward")
    m, c = t.shape
    tn = TUNING
    out = torch.empty_strided((m, c), _dense_strides(t), dtype=t.dtype, device=t.device)
    go = out if grad_out is None else grad_out  # a placeholder pointer when there is none
    upcast = interpreting() and t.dtype != torch.float32
    _kt().gram_backward[(_cdiv(m, tn.bwd_block_m), _cdiv(c, tn.bwd_block_n))](
        t, s.contiguous(), s if scale is None else scale, go, out, m, c, *t.stride(), *go.stride(), *out.stride(),
        BLOCK_M=tn.bwd_block_m, BLOCK_N=tn.bwd_block_n, BLOCK_K=tn.bwd_block_k, UPCAST=upcast,
        IEEE=upcast or t.dtype == torch.float32, HAS_SCALE=scale is not None, HAS_GO=grad_out is not None,
        RELU_MASK=relu_mask, num_warps=tn.bwd_warps, num_stages=tn.stages)
    return out


@_gram_relu_backward.register_fake
def _(t, s, scale, grad_out, relu_mask):
    return t.new_empty_strided(t.shape, _dense_strides(t))


def style_tap_backward(f: torch.Tensor, s: torch.Tensor, scale: torch.Tensor | None = None,
                       grad_out: torch.Tensor | None = None, relu_mask: bool = True) -> torch.Tensor:
    """ENTRY POINT (b): dX = [f > 0] * (F (S + S^T) * scale + grad_out), one launch.

    f: the tap's post-ReLU features (1, C, H, W); s: S = dL/dG (C, C) float32 (from
    style_tap_forward); scale: an optional () float32 device tensor (no host sync);
    grad_out: an optional gradient (1, C, H, W) to add before the mask (the one arriving
    from deeper layers, where the step runs its own backward); relu_mask: zero where
    f <= 0, making dX the gradient at the conv output under the tap's ReLU (False for a
    conv tap, or where autograd's ReLU backward follows anyway). Returns dX in f's dtype
    and memory format. The kernel where gram_backward_ok(f, s), else the reference."""
    ok = gram_backward_ok(f, s) and (scale is None or (scale.numel() == 1 and scale.device == f.device))
    if ok and (grad_out is None or (grad_out.shape == f.shape and grad_out.device == f.device
                                    and _offsets_fit(_mc(grad_out), TUNING.bwd_block_m))):
        out = _gram_relu_backward(_mc(f), s, scale, None if grad_out is None else _mc(grad_out), relu_mask)
        return out.reshape(1, f.shape[2], f.shape[3], f.shape[1]).permute(0, 3, 1, 2)  # (1, C, H, W)
    return gram_backward_reference(f, s, scale, grad_out, relu_mask)


# -- (a) + (b) inside autograd: the tap's ReLU, its style term and their backward as one node -----


@torch.library.custom_op("nst::relu_style_tap", mutates_args=())
def _relu_style_tap(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """x (M, C) pre-ReLU -> (y = relu(x), value, G, S1 = d value / dG), as in style_tap_forward."""
    y = torch.relu(x)  # (M, C), x's strides
    value, g, s1 = _style_tap(y, target, 1.0)
    return y, value, g, s1


@_relu_style_tap.register_fake
def _(x, target):
    c = x.shape[1]
    f32 = {"dtype": torch.float32}
    return (torch.empty_like(x), x.new_empty((), **f32), x.new_empty((c, c), **f32), x.new_empty((c, c), **f32))


def _relu_style_tap_setup(ctx, inputs, output):
    y, _, g, s1 = output
    ctx.save_for_backward(y, s1)
    ctx.mark_non_differentiable(g, s1)


def _relu_style_tap_backward(ctx, d_y, d_value, d_g, d_s1):
    # dX = [y > 0] * (Y (S1 + S1^T) * d_value + d_y): the Gram's backward, the add of the
    # deeper layers' gradient and the ReLU's backward in one launch.
    y, s1 = ctx.saved_tensors
    if d_value is None:
        return torch.where(y > 0, d_y, 0.0) if d_y is not None else None, None
    return _gram_relu_backward(y, s1, d_value.float().reshape(()), d_y, True), None


_relu_style_tap.register_autograd(_relu_style_tap_backward, setup_context=_relu_style_tap_setup)


def relu_style_tap(x: torch.Tensor, target: torch.Tensor):
    """ENTRY POINT (a) + (b) for a step that keeps autograd: the ReLU of a style tap and
    the tap's style value as one autograd node.

    x: the conv output under the tap's ReLU (1, C, H, W), pre-activation (bf16 on a GPU);
    target: the tap's Gram A (C, C) float32. Returns (y, value): y = relu(x), for the deeper
    layers and any other use of the tap; value = losses.style_value_raw(G(y), A, C, M).
    Its backward, given d value and the deeper layers' dY, is one launch of the (b) kernel
    (scale = d value, grad_out = dY, ReLU mask): it replaces the Gram's backward, autograd's
    add of the two gradients and the ReLU's threshold backward. The kernels where
    style_tap_ok(x, target), else relu + style_value_raw through autograd."""
    if style_tap_ok(x, target):
        y, value, _, _ = _relu_style_tap(_mc(x), target)
        return y.reshape(1, x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2), value
    y = torch.relu(x)
    with torch.autocast(x.device.type, enabled=False):
        return y, style_value_raw(gram_raw(y), target, x.shape[1], x.shape[2] * x.shape[3])


# -- (c) the image update: normalisation backward + TV gradient + Adam + clamp -----------------


def _ln(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def image_update_reference(x: torch.Tensor, grad_xn: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           step: torch.Tensor, lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8,
                           tv_weight: float = 0.0) -> torch.Tensor:
    """The compiled path's ops, in place on x, the moments and step; returns tv_value(x)
    of the image before the step. The gradient: grad_xn / std (the normalisation's
    backward) + tv_weight * losses.tv_grad(x); then torch.optim.Adam's step (bias
    corrections from the device step count, lr a device tensor) and the clamp to [0, 1]."""
    b1, b2 = betas
    std = torch.empty(1, 3, 1, 1, dtype=torch.float32, device=x.device)
    for c, v in enumerate(IMAGENET_STD):
        std[:, c] = v  # fills, not a copy from the host: a CUDA graph can capture them
    with torch.no_grad():
        tv = tv_value(x)
        g = grad_xn.float() / std + tv_weight * tv_grad(x)  # (N, 3, H, W)
        t = step + 1
        bc1, bc2 = -torch.expm1(t * _ln(b1)), -torch.expm1(t * _ln(b2))  # 1 - beta^t
        exp_avg.lerp_(g, 1 - b1)
        exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (exp_avg_sq.sqrt() / bc2.sqrt()).add_(eps)
        x.sub_(exp_avg / denom * (lr / bc1)).clamp_(0.0, 1.0)
        step.copy_(t)
    return tv


@torch.library.custom_op("nst::image_adam", mutates_args=("x", "exp_avg", "exp_avg_sq", "step", "work"))
def _image_adam(x: torch.Tensor, grad_xn: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: torch.Tensor, lr: torch.Tensor, work: torch.Tensor, beta1: float, beta2: float, eps: float,
                tv_weight: float, rows: int) -> torch.Tensor:
    """image_update_reference in one launch; work: the int32 counters (zero between calls)."""
    n, _, h, w = x.shape
    planes, bands = 3 * n, _cdiv(h, rows)
    _require(enabled() and _device_ok(x) and rows >= 2 and work.numel() >= planes * bands + 1
             and exp_avg.stride() == x.stride() == exp_avg_sq.stride(), "nst::image_adam")
    f32 = {"dtype": torch.float32, "device": x.device}
    held = torch.empty((planes * bands * 4, w), **f32)  # per band: new rows held back (see the kernel)
    tvp = torch.empty(planes * bands, **f32)  # per band, its part of tv_value
    tv = torch.empty((), **f32)
    nh, nw = n * 3 * (h - 1) * w, n * 3 * h * (w - 1)  # tv_value's two element counts
    _kt().image_adam[(planes * bands,)](
        x, grad_xn, exp_avg, exp_avg_sq, step, lr, held, work, tvp, tv, h, w, bands, rows, *x.stride(),
        *grad_xn.stride(), *(1.0 / s for s in IMAGENET_STD), tv_weight * 2.0 / nh, tv_weight * 2.0 / nw, 1.0 / nh,
        1.0 / nw, beta1, beta2, _ln(beta1), _ln(beta2), eps, BLOCK_W=min(_pow2(w), TUNING.image_block_w),
        num_warps=TUNING.image_warps)
    return tv


@_image_adam.register_fake
def _(x, grad_xn, exp_avg, exp_avg_sq, step, lr, work, beta1, beta2, eps, tv_weight, rows):
    return x.new_empty((), dtype=torch.float32)


class ImageAdam:
    """ENTRY POINT (c): Adam on the image with the fused update, one launch per step.

    Holds torch.optim.Adam's state for the image x (N, 3, H, W) float32: exp_avg and
    exp_avg_sq (x's memory format), ``step_count`` (a float32 device tensor, as capturable
    Adam keeps it) and ``lr`` (a float32 device tensor: ``set_lr`` refills it, so a CUDA
    graph replays the new value), plus the kernel's counters. ``step(grad_xn)`` takes the
    gradient at the network's normalised input, (x - mean) / std (any float dtype and
    memory format, unscaled), and returns tv_value of the image before the step, ().
    The kernel where image_update_ok(x) said so at construction, else the reference."""

    def __init__(self, x: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, tv_weight: float = 0.0):
        self.x, self.betas = x, (float(betas[0]), float(betas[1]))
        self.eps, self.tv_weight = float(eps), float(tv_weight)
        self.exp_avg = torch.zeros_like(x, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(x, memory_format=torch.preserve_format)
        self.step_count = torch.zeros((), dtype=torch.float32, device=x.device)
        self.lr = torch.tensor(float(lr), dtype=torch.float32, device=x.device)
        self.fused = image_update_ok(x)  # decided once, on the real image
        n, _, h, _ = x.shape
        rows = TUNING.image_rows or _cdiv(3 * n * h, 4 * _sm_count(str(x.device)))
        self.rows = min(max(2, rows), h)
        self.work = torch.zeros(3 * n * _cdiv(h, self.rows) + 1, dtype=torch.int32, device=x.device)

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)  # a device-side fill: no host sync

    def state(self) -> dict:
        """torch.optim.Adam's per-parameter state (the same keys), for --resume."""
        return {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            getattr(self, key).copy_(state[key])
        self.step_count.copy_(torch.as_tensor(state["step"], dtype=torch.float32))

    def step(self, grad_xn: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        with torch.no_grad():
            if self.fused:
                return _image_adam(self.x, grad_xn, self.exp_avg, self.exp_avg_sq, self.step_count, self.lr,
                                   self.work, b1, b2, self.eps, self.tv_weight, self.rows)
            return image_update_reference(self.x, grad_xn, self.exp_avg, self.exp_avg_sq, self.step_count, self.lr,
                                          (b1, b2), self.eps, self.tv_weight)
