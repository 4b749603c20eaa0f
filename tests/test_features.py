import pytest
import torch
import torchvision

from nst.engine import DEFAULT_TAPS, IMAGENET_MEAN, IMAGENET_STD, build_extractor
from nst.engine.errors import InputError


def _x(h, w, seed):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_matches_torchvision_with_normalisation_inside(weight_files, full_model_state):
    """Our taps equal torchvision's vgg19 run on the normalised image (independent path)."""
    tv = torchvision.models.vgg19()
    tv.load_state_dict({**tv.state_dict(), **{k: v for k, v in full_model_state.items() if k.startswith("features.")}})
    tv.eval()
    m = build_extractor(str(weight_files["full"]))
    x = _x(40, 72, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = m(x)
        h = (x - mean) / std
        ref = {}
        for i, layer in enumerate(tv.features[:30]):
            h = layer(h.clone())  # torchvision's ReLUs are in-place
            ref[i] = h
    for out, idx in zip(ours, (1, 6, 11, 20, 22, 29)):
        torch.testing.assert_close(out, ref[idx], rtol=1e-5, atol=1e-5)
    assert [o.shape[1] for o in ours] == [64, 128, 256, 512, 512, 512]
    assert m.taps == DEFAULT_TAPS


def test_conv_tap_keeps_negative_values(eager, weight_files):
    m = build_extractor(str(weight_files["features"]), taps=("conv4_2", "relu4_2"))
    with torch.no_grad():
        conv, relu = m(_x(48, 48, 2))
    assert (conv < 0).any()
    torch.testing.assert_close(relu, conv.clamp_min(0))


def test_frozen_and_differentiable_wrt_input(eager):
    assert not any(p.requires_grad for p in eager.parameters())
    assert not eager.training
    x = _x(32, 48, 3).requires_grad_(True)
    sum(o.square().mean() for o in eager(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in eager.parameters())


def test_avg_pool_differs_from_max(weight_files):
    mx = build_extractor(str(weight_files["features"]), taps=("relu2_1",), pool="max")
    av = build_extractor(str(weight_files["features"]), taps=("relu2_1",), pool="avg")
    x = _x(32, 32, 4)
    with torch.no_grad():
        a, b = mx(x)[0], av(x)[0]
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert isinstance(av.body.pool1, torch.nn.AvgPool2d)


def test_too_small_and_malformed_inputs(eager):
    with pytest.raises(InputError, match=r"too small for tap relu5_1: height and width must be at least 32 px"):
        eager(torch.rand(1, 3, 31, 64))
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        eager(torch.rand(3, 64, 64))
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        eager(torch.rand(1, 4, 64, 64))
    with pytest.raises(InputError, match="floating-point"):
        eager(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_channels_last_matches_contiguous(weight_files):
    a = build_extractor(str(weight_files["features"]))
    b = build_extractor(str(weight_files["features"])).to_format(channels_last=True)
    x = _x(48, 64, 5)
    with torch.no_grad():
        for p, q in zip(a(x), b(x)):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


def test_weights_hash_is_file_independent(weight_files):
    hashes = {build_extractor(str(p)).weights_sha256() for p in weight_files.values()}
    assert len(hashes) == 1
    assert build_extractor("random:1").weights_sha256() not in hashes
