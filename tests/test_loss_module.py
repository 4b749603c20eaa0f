"""The loss module (engine/losses.py): every term's explicit gradient against autograd in
float64, under every --gram-norm and --content-norm, at sizes that are not multiples of
anything; the coefficients as functions of the shape; the spec's parts against the terms."""

import pytest
import torch

from nst.engine.losses import (LossSpec, content_coef, content_grad, content_value, gram, gram_backward, gram_raw,
                               style_coef, style_grad_raw, style_value, style_value_raw, tv_grad, tv_value)
from nst.engine.norms import CONTENT_NORMS, GRAM_NORMS, content_norm_factor, style_norm_factor

D = torch.float64


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("norm", CONTENT_NORMS)
@pytest.mark.parametrize("chw", [(5, 7, 9), (3, 1, 13)])
def test_content_gradient_is_autograds(norm, chw):
    c, h, w = chw
    f = _rand(1, c, h, w, seed=1).requires_grad_(True)
    p = _rand(1, c, h, w, seed=2)
    k = content_coef(norm, 0.7, c, h * w)
    (want,) = torch.autograd.grad(k * content_value(f, p), f)
    got = content_grad(f.detach(), p, k)
    assert got.dtype == D
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", GRAM_NORMS)
@pytest.mark.parametrize("chw", [(6, 5, 7), (4, 11, 3)])
def test_style_gradient_in_the_gram_is_autograds(norm, chw):
    c, h, w = chw
    f = _rand(1, c, h, w, seed=3)
    a = gram(_rand(1, c, h + 2, w + 1, seed=4))  # (1, C, C), a target from another image
    k = style_coef(norm, 1.3, c, h * w)
    g = gram_raw(f).requires_grad_(True)  # (C, C), unnormalised
    (want,) = torch.autograd.grad(k * style_value_raw(g, a, c, h * w), g)
    got = style_grad_raw(g.detach(), a, c, h * w, k)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # and through the Gram to the features: dL/dF = (S + S^T) F
    fr = f.clone().requires_grad_(True)
    (want_f,) = torch.autograd.grad(k * style_value(fr, a), fr)
    torch.testing.assert_close(gram_backward(f, got), want_f, rtol=1e-10, atol=0)


def test_gram_backward_in_channels_last_and_with_an_asymmetric_s():
    f = _rand(1, 6, 4, 5, seed=5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    s = _rand(6, 6, seed=6)  # not symmetric: both operands of G = F F^T carry a gradient
    (want,) = torch.autograd.grad((gram_raw(f) * s).sum(), f)
    torch.testing.assert_close(gram_backward(f.detach(), s), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("hw", [(7, 9), (2, 13), (16, 3)])
def test_tv_gradient_is_autograds(hw):
    x = _rand(1, 3, *hw, seed=7).requires_grad_(True)
    (want,) = torch.autograd.grad(tv_value(x), x)
    torch.testing.assert_close(tv_grad(x.detach()), want, rtol=1e-12, atol=1e-15)


def test_coefficients_are_functions_of_the_shape():
    # Python ints: the constants the factors always were (exact, rounded once by the weight).
    assert style_coef("raw", 2.0, 64, 1024 * 1024) == 2.0 * (64 * 1024 * 1024) ** 2
    assert content_coef("half-sum", 0.5, 512, 17 * 23) == 0.5 * 512 * 17 * 23 / 2
    for norm in GRAM_NORMS:
        assert style_coef(norm, 1.0, 3, 5) == style_norm_factor(norm, 3, 5)
    for norm in CONTENT_NORMS:
        assert content_coef(norm, 1.0, 3, 5) == content_norm_factor(norm, 3, 5)
    # Tensors (what a graph with dynamic sizes computes them from): the same values.
    c, m = torch.tensor(64.0, dtype=D), torch.tensor(37.0 * 41, dtype=D)
    for norm in GRAM_NORMS:
        assert float(style_coef(norm, 1.5, c, m)) == pytest.approx(style_coef(norm, 1.5, 64, 37 * 41), rel=1e-15)
    with pytest.raises(ValueError, match="unknown Gram normalisation"):
        style_coef("nope", 1.0, 1, 1)


def test_spec_parts_are_the_sum_of_the_terms():
    """LossSpec.parts (what the whole-image objective differentiates) equals the terms
    summed by hand, with each coefficient taken at the features' own size."""
    feats = (_rand(1, 4, 10, 12, seed=8), _rand(1, 8, 5, 6, seed=9), _rand(1, 8, 5, 6, seed=10))
    x = _rand(1, 3, 20, 24, seed=11)
    p = _rand(1, 8, 5, 6, seed=12)
    grams = [gram(_rand(1, 4, 9, 9, seed=13)), gram(_rand(1, 8, 7, 7, seed=14))]
    spec = LossSpec(content=((2, 0.5),), style=((0, 1.0), (1, 2.0)), content_norm="half-sum", gram_norm="hw",
                    content_weight=2.0, style_weight=10.0, tv_weight=3.0)
    parts = spec.parts(x, feats, [p], grams)
    c = content_coef("half-sum", 0.5, 8, 30) * content_value(feats[2], p)
    s = style_coef("hw", 1.0, 4, 120) * style_value(feats[0], grams[0]) + \
        style_coef("hw", 2.0, 8, 30) * style_value(feats[1], grams[1])
    tv = tv_value(x)
    torch.testing.assert_close(parts, torch.stack([2 * c + 10 * s + 3 * tv, c, s, tv]), rtol=1e-14, atol=0)
