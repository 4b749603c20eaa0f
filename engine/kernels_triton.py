"""The Triton kernels behind engine/kernels.py: only that module imports this one, lazily,
and only after its guard said Triton may run (so the engine imports without Triton).

Triton decides at decoration time whether a kernel is compiled or interpreted
(``TRITON_INTERPRET=1``, how the tests run them on the CPU; its own standard library is
decorated at ``import triton``, so the variable must be set before that); ``INTERPRETED``
records which, and engine/kernels.py refuses to launch when the environment says otherwise.

Conventions: pointers in capitals; sizes and strides as plain arguments; 64-bit scalar
base pointers with 32-bit offsets inside a block (at 2048 px a tap holds M*C = 268 million
elements: a block's first row is an int64 offset; engine/kernels.py's guards check that
the offsets inside a block fit in 32 bits);
``UPCAST`` turns half-precision operands into float32 before ``tl.dot`` (the interpreter's
dot multiplies bf16 bit patterns); ``IEEE`` asks float32 dots for full float32 instead of
TF32. Cross-program hand-offs (the last program of a group finishes the group's work) use
a ticket: partial results stored, a CTA barrier, one acq_rel atomic increment; the program
that draws the last ticket reads the others' results (volatile loads) and resets the
counter to zero for the next launch, so the counters stay zero between launches and a
CUDA graph can replay them.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- the style term's forward: G = T^T T split over M, then the loss and S -----------------

@triton.jit
def gram_partial(T, P, COUNTER, M, C, stride_m, stride_c, chunk, TILES, CP,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """P[s, ti-block, tj-block] = T[rows of split s, ti]^T T[rows, tj] for the tiles with ti <= tj.
    Grid (TILES * TILES, splits). T (M, C) any strides; P (splits, CP, CP) float32."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if (pid == 0) & (split == 0):
        tl.store(COUNTER, 0)  # style_finish's ticket (this launch precedes it on the stream)
    ti = pid // TILES
    tj = pid % TILES
    if ti > tj:
        return  # G is symmetric: style_finish mirrors the upper tiles
    start = split.to(tl.int64) * chunk
    rem = tl.minimum(M - start, chunk).to(tl.int32)  # this split's rows
    Ti = T + start * stride_m + (ti * BLOCK_C).to(tl.int64) * stride_c  # scalar 64-bit bases,
    Tj = T + start * stride_m + (tj * BLOCK_C).to(tl.int64) * stride_c  # 32-bit offsets in the tile
    r = tl.arange(0, BLOCK_M)
    cc = tl.arange(0, BLOCK_C)
    off = r[:, None] * stride_m + cc[None, :] * stride_c
    mi = cc[None, :] < C - ti * BLOCK_C
    mj = cc[None, :] < C - tj * BLOCK_C
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for k in range(0, chunk, BLOCK_M):
        rmask = r[:, None] < rem - k
        a = tl.load(Ti + off, mask=rmask & mi, other=0.0)
        b = tl.load(Tj + off, mask=rmask & mj, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc=acc)  # bf16 operands, float32 accumulation
        Ti += BLOCK_M * stride_m
        Tj += BLOCK_M * stride_m
    out = P + split * CP * CP + (ti * BLOCK_C + cc)[:, None] * CP + (tj * BLOCK_C + cc)[None, :]
    tl.store(out, acc)


@triton.jit
def _style_tile(g, A, G, S, rows, cols, C, inv_cm, s_scale):
    """One (BLOCK_C, BLOCK_C) tile of G at (rows, cols): d = G/(C M) - A, writes G and
    S = d * s_scale; returns the tile's sum of d^2 (losses.style_value_raw/style_grad_raw)."""
    valid = (rows[:, None] < C) & (cols[None, :] < C)
    off = rows[:, None] * C + cols[None, :]
    d = g * inv_cm - tl.load(A + off, mask=valid, other=0.0)
    d = tl.where(valid, d, 0.0)
    tl.store(G + off, g, mask=valid)
    tl.store(S + off, d * s_scale, mask=valid)
    return tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def style_finish(P, A, G, S, PART, COUNTER, VALUE, C, SPLITS, TILES, CP, inv_cm, s_scale, inv_cc,
                 BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per upper tile: G = the sum of the splits' partials (in split order), G, S and the
    mirror tile written, the tile's sum of squares to PART; the last tile to finish sums
    PART (in tile order) into VALUE = mean((G/(C M) - A)^2). Grid (TILES * TILES,)."""
    pid = tl.program_id(0)
    ti = pid // TILES
    tj = pid % TILES
    if ti > tj:
        return
    r = tl.arange(0, BLOCK_C)
    rows = ti * BLOCK_C + r
    cols = tj * BLOCK_C + r
    off = rows[:, None] * CP + cols[None, :]
    g = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for s in range(0, SPLITS):  # in split order: the sum does not depend on scheduling
        g += tl.load(P + s * CP * CP + off)
    total = _style_tile(g, A, G, S, rows, cols, C, inv_cm, s_scale)
    if ti != tj:
        total += _style_tile(tl.trans(g), A, G, S, cols, rows, C, inv_cm, s_scale)
    tl.store(PART + pid, total)
    tl.debug_barrier()  # every thread's stores issued before the ticket
    if tl.atomic_add(COUNTER, 1, sem="acq_rel") == TILES * (TILES + 1) // 2 - 1:
        idx = tl.arange(0, BLOCK_T)
        upper = (idx < TILES * TILES) & (idx // TILES <= idx % TILES)
        parts = tl.load(PART + idx, mask=upper, other=0.0, volatile=True)
        tl.store(VALUE, tl.sum(parts, axis=0) * inv_cc)
        tl.store(COUNTER, 0)


# -- its backward: dX = [T > 0] * (T (S + S^T) * scale + grad_out) -----------------------

@triton.jit
def gram_backward(T, S, SCALE, GO, OUT, M, C, stm, stc, sgm, sgc, som, soc,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                  IEEE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GO: tl.constexpr, RELU_MASK: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) block of OUT (M, C) = T (M, C) @ (S + S^T) (C, C), with the
    epilogue: times SCALE[0], plus GO, zero where T <= 0; stored in OUT's dtype. Grid
    (cdiv(M, BLOCK_M), cdiv(C, BLOCK_N))."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rem = tl.minimum(M - row0, BLOCK_M).to(tl.int32)
    r = tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r[:, None] < rem
    nmask = n[None, :] < C
    Tb = T + row0 * stm  # scalar 64-bit base, 32-bit offsets in the block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(Tb + r[:, None] * stm + ks[None, :] * stc, mask=rmask & (ks[None, :] < C), other=0.0)
        wmask = (ks[:, None] < C) & nmask
        w = tl.load(S + ks[:, None] * C + n[None, :], mask=wmask, other=0.0)
        w += tl.load(S + n[None, :] * C + ks[:, None], mask=wmask, other=0.0)  # S^T
        if UPCAST:
            a = a.to(tl.float32)
        else:
            w = w.to(a.dtype)  # bf16 operands, as nst::gram_mc's bf16 backward
        if IEEE:
            acc = tl.dot(a, w, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc=acc)
    if HAS_SCALE:
        acc = acc * tl.load(SCALE)
    omask = rmask & nmask
    if HAS_GO:
        acc += tl.load(GO + row0 * sgm + r[:, None] * sgm + n[None, :] * sgc, mask=omask, other=0.0).to(tl.float32)
    if RELU_MASK:
        f = tl.load(Tb + r[:, None] * stm + n[None, :] * stc, mask=omask, other=0.0)
        acc = tl.where(f > 0, acc, 0.0)
    tl.store(OUT + row0 * som + r[:, None] * som + n[None, :] * soc, acc.to(OUT.dtype.element_ty), mask=omask)


# -- the image update: normalisation backward + TV gradient + Adam + clamp, in place ---------

@triton.jit
def _one_minus_pow(t, ln_beta):
    """1 - beta^t in float32 without cancellation for small t |ln beta| (torch's
    single-tensor Adam computes it in float64 on the host)."""
    y = t * ln_beta  # <= 0
    series = -y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))))
    return tl.where(y > -0.25, series, 1.0 - tl.exp(y))


@triton.jit
def _copy_row(SRC, DST, W, sxw, BLOCK_W: tl.constexpr, VOLATILE: tl.constexpr):
    """A row of W values from a ROWS slot (contiguous) into the image (stride sxw)."""
    for j0 in range(0, W, BLOCK_W):
        cols = j0 + tl.arange(0, BLOCK_W)
        v = tl.load(SRC + cols, mask=cols < W, other=0.0, volatile=VOLATILE)
        tl.store(DST + cols * sxw, v, mask=cols < W)


@triton.jit
def _adam_row(x, g, MV, VV, off, mask, lr_t, bc2_sqrt, beta1, beta2, eps):
    """Adam on one row chunk (torch.optim.Adam's formula), moments updated in place; the clamped new values."""
    m = tl.load(MV + off, mask=mask, other=0.0)
    v = tl.load(VV + off, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    tl.store(MV + off, m, mask=mask)
    tl.store(VV + off, v, mask=mask)
    x = x - lr_t * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _image_row(X, GN, MV, VV, ROW, i, H, W, sxh, sxw, sgh, sgw, inv_std, tv_h, tv_w, inv_nh, inv_nw,
               lr_t, bc2_sqrt, beta1, beta2, eps, BLOCK_W: tl.constexpr):
    """Row i of one plane (X, GN, MV, VV at the plane's origin), chunk by chunk: the new
    values to ROW (contiguous), the moments in place; returns the row's part of tv_value."""
    tv = tl.zeros((BLOCK_W,), dtype=tl.float32)
    xr = X + i * sxh
    for j0 in range(0, W, BLOCK_W):
        cols = j0 + tl.arange(0, BLOCK_W)
        cm = cols < W
        cur = tl.load(xr + cols * sxw, mask=cm, other=0.0)
        prev = tl.load(xr - sxh + cols * sxw, mask=cm & (i > 0), other=0.0)
        nxt = tl.load(xr + sxh + cols * sxw, mask=cm & (i + 1 < H), other=0.0)
        left = tl.load(xr + (cols - 1) * sxw, mask=cm & (cols > 0), other=0.0)
        right = tl.load(xr + (cols + 1) * sxw, mask=cols + 1 < W, other=0.0)
        up = tl.where(i > 0, cur - prev, 0.0)  # dh[i-1]
        down = tl.where(i + 1 < H, nxt - cur, 0.0)  # dh[i]
        lft = tl.where(cols > 0, cur - left, 0.0)  # dw[j-1]
        rgt = tl.where(cols + 1 < W, right - cur, 0.0)  # dw[j]
        tv += down * down * inv_nh + rgt * rgt * inv_nw
        g = tl.load(GN + i * sgh + cols * sgw, mask=cm, other=0.0).to(tl.float32) * inv_std
        g += tv_h * (up - down) + tv_w * (lft - rgt)
        new = _adam_row(cur, g, MV, VV, i * sxh + cols * sxw, cm, lr_t, bc2_sqrt, beta1, beta2, eps)
        tl.store(ROW + cols, new, mask=cm)
    return tl.sum(tv, axis=0)


@triton.jit
def image_adam(X, GN, MV, VV, STEP, LR, ROWS, COUNT, TVP, TV, H, W, NB, R,
               sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, inv_std0, inv_std1, inv_std2,
               tv_h, tv_w, inv_nh, inv_nw, beta1, beta2, ln_beta1, ln_beta2, eps,
               BLOCK_W: tl.constexpr):
    """One program per (image plane, band of R rows). Row i's gradient is GN/std plus the
    TV gradient of the old rows i-1, i, i+1, so no row may change in X while a program
    still reads it: row i's new values wait in ROWS and are written to X after row i+1
    has been computed (write-behind; ROWS holds 4 rows per program: the band's first and
    last rows, then two alternating slots). A band's first and last rows are read by the
    neighbouring bands: the second of the two programs at a boundary copies both into X.
    The last program overall writes TV (the old image's tv_value) and STEP + 1.
    MV/VV: the moments, with X's strides."""
    pid = tl.program_id(0)
    plane = pid // NB
    band = pid % NB
    c = plane % 3
    inv_std = tl.where(c == 0, inv_std0, tl.where(c == 1, inv_std1, inv_std2))
    t = tl.load(STEP) + 1.0
    lr_t = tl.load(LR) / _one_minus_pow(t, ln_beta1)
    bc2_sqrt = tl.sqrt(_one_minus_pow(t, ln_beta2))
    xo = (plane // 3).to(tl.int64) * sxn + c * sxc  # this plane in X, MV and VV
    go = (plane // 3).to(tl.int64) * sgn + c * sgc
    r0 = band * R
    r1 = tl.minimum(r0 + R, H)
    tv = 0.0
    for i in range(r0, r1):
        first = (i == r0) & (band > 0)  # read by the band above: deferred to the boundary
        last = (i == r1 - 1) & (band < NB - 1)  # read by the band below: deferred
        slot = tl.where(first, 0, tl.where(last, 1, 2 + i % 2))
        tv += _image_row(X + xo, GN + go, MV + xo, VV + xo, ROWS + (pid * 4 + slot) * W, i, H, W, sxh, sxw, sgh, sgw,
                         inv_std, tv_h, tv_w, inv_nh, inv_nw, lr_t, bc2_sqrt, beta1, beta2, eps, BLOCK_W)
        tl.debug_barrier()  # row i-1's readers (this row's TV) are done: write it behind
        if (i > r0) & ((i - 1 != r0) | (band == 0)):
            _copy_row(ROWS + (pid * 4 + 2 + (i - 1) % 2) * W, X + xo + (i - 1) * sxh, W, sxw, BLOCK_W, False)
    if (band == NB - 1) & ((r1 - 1 != r0) | (band == 0)):  # the band's last row, when not deferred
        _copy_row(ROWS + (pid * 4 + 2 + (r1 - 1) % 2) * W, X + xo + (r1 - 1) * sxh, W, sxw, BLOCK_W, False)
    tl.store(TVP + pid, tv)
    _finish_bands(X + xo, ROWS, COUNT, TVP, TV, STEP, t, pid, band, NB, r0, r1, W, sxh, sxw, BLOCK_W)


@triton.jit
def _finish_bands(XP, ROWS, COUNT, TVP, TV, STEP, t, pid, band, NB, r0, r1, W, sxh, sxw, BLOCK_W: tl.constexpr):
    """The boundary hand-offs and the last program's TV sum and step count (see image_adam);
    XP: this program's image plane. COUNT[k] counts the arrivals at the boundary below pid k."""
    tl.debug_barrier()  # every thread's stores issued before the tickets
    if band > 0:  # the boundary above: the previous band's last row, this band's first
        if tl.atomic_add(COUNT + pid - 1, 1, sem="acq_rel") == 1:
            _copy_row(ROWS + ((pid - 1) * 4 + 1) * W, XP + (r0 - 1) * sxh, W, sxw, BLOCK_W, True)
            _copy_row(ROWS + (pid * 4) * W, XP + r0 * sxh, W, sxw, BLOCK_W, True)
            tl.store(COUNT + pid - 1, 0)
    if band < NB - 1:  # the boundary below
        if tl.atomic_add(COUNT + pid, 1, sem="acq_rel") == 1:
            _copy_row(ROWS + (pid * 4 + 1) * W, XP + (r1 - 1) * sxh, W, sxw, BLOCK_W, True)
            _copy_row(ROWS + ((pid + 1) * 4) * W, XP + r1 * sxh, W, sxw, BLOCK_W, True)
            tl.store(COUNT + pid, 0)
    n = tl.num_programs(0)
    if tl.atomic_add(COUNT + n, 1, sem="acq_rel") == n - 1:
        acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for k in range(0, n, BLOCK_W):
            acc += tl.load(TVP + k + tl.arange(0, BLOCK_W), mask=k + tl.arange(0, BLOCK_W) < n, other=0.0,
                           volatile=True)
        tl.store(TV, tl.sum(acc, axis=0))
        tl.store(STEP, t)  # every program has read the old step by now
        tl.store(COUNT + n, 0)
