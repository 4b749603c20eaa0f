"""The engine's losses against an independent, straightforward implementation."""

import torch
import torchvision

from nst.engine import StylizeSettings, build_extractor
from nst.engine.losses import gram
from nst.engine.layers import parse_layer_weights
from nst.engine.objective import Problem, WholeImage
from nst.engine.plan import resolve_plan
from nst.engine.targets import compute_targets


def _img(h, w, seed):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _reference_losses(full_model_state, x, content, styles, blend, cw, sw, tvw):
    """Written from the formulas in the README, on torchvision's own vgg19."""
    tv = torchvision.models.vgg19()
    tv.load_state_dict({**tv.state_dict(), **{k: v for k, v in full_model_state.items() if k.startswith("features.")}})
    feats_net = tv.features[:30].eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    idx = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu4_2": 22, "relu5_1": 29}

    def taps(img):
        out, h = {}, (img - mean) / std
        for i, layer in enumerate(feats_net):
            h = layer(h.clone())
            for name, j in idx.items():
                if i == j:
                    out[name] = h
        return out

    def g(f):
        _, c, hh, ww = f.shape
        m = f.reshape(c, hh * ww)
        return m @ m.t() / (c * hh * ww)

    fx = taps(x)
    with torch.no_grad():
        fc = taps(content)
        grams = {n: sum(b * g(taps(s)[n]) for s, b in zip(styles, blend)) for n in idx}
    content_l = ((fx["relu4_2"] - fc["relu4_2"]) ** 2).mean()
    style_l = sum(((g(fx[n]) - grams[n]) ** 2).mean() for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))
    tv_l = ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean() + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean()
    return cw * content_l + sw * style_l + tvw * tv_l, content_l, style_l, tv_l


def test_losses_match_independent_implementation(weight_files, full_model_state):
    settings = StylizeSettings(content_weight=2.0, style_weight=1e5, tv_weight=3.0, device="cpu")
    net = build_extractor(str(weight_files["full"]))
    content, s1, s2 = _img(48, 64, 1), _img(64, 64, 2), _img(40, 72, 3)
    targets = compute_targets(net, content, [(s1, 1.0), (s2, 3.0)], parse_layer_weights("relu4_2"),
                              parse_layer_weights(settings.style_layers))
    assert targets.style_blend == (0.25, 0.75)
    obj = WholeImage(Problem.build(net, targets, settings, resolve_plan(settings)))
    x = _img(48, 64, 4).requires_grad_(True)
    parts = obj.losses_and_grad(x)
    ref = _reference_losses(full_model_state, x, content, [s1, s2], (0.25, 0.75), 2.0, 1e5, 3.0)
    for got, want in zip(parts, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    g_engine = x.grad
    (g_ref,) = torch.autograd.grad(ref[0], x)
    torch.testing.assert_close(g_engine, g_ref, rtol=1e-3, atol=1e-6 * g_ref.abs().max().item())


def test_gram_channels_last_equals_contiguous():
    f = torch.randn(2, 16, 9, 7)
    g1 = gram(f)
    g2 = gram(f.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(g1, g2)
    ref = torch.einsum("nchw,ndhw->ncd", f, f) / (16 * 9 * 7)
    torch.testing.assert_close(g1, ref)


def test_gram_is_float32_from_half_features():
    f = (torch.randn(1, 8, 32, 32) * 300).to(torch.bfloat16)
    g = gram(f)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_losses_keep_their_meaning_across_resolution():
    """A pattern and its 2x upsampling have nearly the same normalised Gram."""
    f = torch.rand(1, 8, 16, 16)
    up = torch.nn.functional.interpolate(f, scale_factor=2, mode="nearest")
    torch.testing.assert_close(gram(f), gram(up))


def test_gram_backward_matches_plain_autograd():
    """The one-matmul Gram backward equals autograd through F F^T, in both layouts."""
    for channels_last in (False, True):
        f = torch.randn(1, 12, 7, 9)
        if channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        probe = torch.randn(12, 12)
        a = f.clone().requires_grad_(True)
        (gram(a)[0] * probe).sum().backward()
        b = f.clone().requires_grad_(True)
        m = b.reshape(12, 63)
        ((m @ m.t() / (12 * 63)) * probe).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    x = torch.rand(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gram(t.float()).double(), (x,), eps=1e-3, atol=1e-3)
