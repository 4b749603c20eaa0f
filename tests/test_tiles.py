"""Exact tiled steps (engine/tiles.py): the halo from the layer table, tiles that partition
the image, and the tiled loss and image gradient against the untiled ones (float32, to
1e-5 relative) at sizes that are not multiples of 16, for tile sizes that do not divide
the image and tiles smaller than the halo; tiled targets; Adam and L-BFGS trajectories."""

import pytest
import torch

from nst.engine.layers import layer_by_name, layers_upto, tile_halo
from nst.engine.session import prepare
from nst.engine.settings import StylizeSettings
from nst.engine.targets import compute_targets
from nst.engine.tiling import make_tiles

W = "random:5"


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_halo_from_the_layer_table():
    # relu5_1's receptive field is 156 px = 16 + 2 x 70: 70 px of context, 80 on the 16 px grid.
    assert tile_halo(("relu5_1",)) == 80
    rf = 1
    jump = 1
    for layer in layers_upto(("relu5_1",)):
        if layer.kind == "conv":
            rf += 2 * jump
        elif layer.kind == "pool":
            rf += jump
            jump *= 2
    assert rf == 156 and (rf - layer_by_name("vgg19")["relu5_1"].stride) // 2 == 70
    assert tile_halo(("relu1_1", "relu2_1")) == 4  # 1 + 1 + 2 = 4 px at stride 2
    assert tile_halo(("relu3_1",)) == 12  # 1 + 1 + 2 + 2 + 4 = 10, rounded up to stride 4
    assert tile_halo(("relu5_1",), "vgg16") == 64  # 2 + 4 + 12 + 24 + 16 = 58 -> 64


@pytest.mark.parametrize("hw,tile", [((150, 181), 48), ((97, 260), 64), ((130, 130), 16), ((64, 64), 1000)])
def test_tiles_partition_the_image(hw, tile):
    h, w = hw
    cover = torch.zeros(h, w, dtype=torch.int32)
    for t in make_tiles(hw, tile, 80, 16):
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.cy0 % 16 == 0 and t.cx0 % 16 == 0  # crops stay on the pooling grid
        assert t.cy0 == max(0, t.y0 - 80) and t.cy1 == min(h, t.y1 + 80)
        assert t.y0 % 16 == 0 and (t.y1 % 16 == 0 or t.y1 == h)
    assert (cover == 1).all()


def _pair(settings, h, w, seed=0):
    content, style = _img(h, w, seed + 1), _img(w, h, seed + 2)
    ref = prepare(content, [(style, 1.0)], settings)
    x0 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed + 3))
    return content, style, ref, x0


def _value_and_grad(objective, x0, channels_last=False):
    x = x0.clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    parts = objective.losses_and_grad(x)
    return parts, x.grad


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tile", [48, 64, 32, 16])
def test_tiled_loss_and_gradient_equal_the_untiled(tile):
    # Not multiples of 16; 3 x 3 tiles or more at every tile size here (16 px tiles, each crop
    # nearly the whole image with its halo, on a smaller image: 30 tiles, not 120).
    h, w = (75, 90) if tile == 16 else (150, 181)
    base = dict(resize=f"{w}x{h}", weights=W, device="cpu", style_weight=1e7, reference=True)
    content, style, ref, x0 = _pair(StylizeSettings(**base), h, w)
    tiled = prepare(content, [(style, 1.0)], StylizeSettings(**base, tile=tile))
    assert len(tiled.objective.tiles((h, w))) >= 9
    parts_r, grad_r = _value_and_grad(ref.objective, x0)
    parts_t, grad_t = _value_and_grad(tiled.objective, x0)
    torch.testing.assert_close(parts_t, parts_r, rtol=1e-5, atol=0)
    assert _rel(grad_t, grad_r) < 1e-5
    torch.testing.assert_close(grad_t, grad_r, rtol=1e-4, atol=1e-5 * float(grad_r.abs().max()))


def test_tiled_equals_untiled_with_other_norms_and_layers_on_the_fast_path():
    h, w = 120, 99
    base = dict(resize=f"{w}x{h}", weights=W, device="cpu", style_weight=1e4, content_layers="relu3_1:0.5,relu4_2",
                style_layers="relu1_1,relu2_1:2,relu3_1,relu4_1,relu5_1", gram_norm="4n2m2", content_norm="half-sum",
                tv_weight=5.0)
    content, style, ref, x0 = _pair(StylizeSettings(**base), h, w, seed=7)
    tiled = prepare(content, [(style, 1.0)], StylizeSettings(**base, tile=32))
    parts_r, grad_r = _value_and_grad(ref.objective, x0, channels_last=True)
    parts_t, grad_t = _value_and_grad(tiled.objective, x0, channels_last=True)
    torch.testing.assert_close(parts_t, parts_r, rtol=1e-5, atol=0)
    assert _rel(grad_t, grad_r) < 1e-5


def test_tiled_targets_equal_the_untiled(eager):
    content, style = _img(131, 170, 11)[None], _img(100, 90, 12)[None]
    layers = (("relu4_2", 1.0),), tuple((n, 1.0) for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))
    whole = compute_targets(eager, content, [(style, 1.0)], *layers)
    tiled = compute_targets(eager, content, [(style, 1.0)], *layers, tile=48, network="vgg19")
    for a, b in zip(tiled.content, whole.content):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(tiled.grams, whole.grams):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert tiled.content_factors == whole.content_factors and tiled.style_factors == whole.style_factors


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_tiled_steps_follow_the_untiled_trajectory(optimizer):
    h, w = 100, 84
    base = dict(resize=f"{w}x{h}", weights=W, device="cpu", style_weight=1e7, optimizer=optimizer)
    content, style = _img(h, w, 21), _img(h, w, 22)
    plain = prepare(content, [(style, 1.0)], StylizeSettings(**base))
    tiled = prepare(content, [(style, 1.0)], StylizeSettings(**base, tile=48))
    lp = torch.stack([plain.stepper.step() for _ in range(4)])
    lt = torch.stack([tiled.stepper.step() for _ in range(4)])
    torch.testing.assert_close(lt, lp, rtol=1e-4, atol=1e-9)  # the content term starts at 0 (init = content)
    # Adam divides by the gradient's running size: a pixel whose gradient is near zero can
    # move by a visible fraction of lr on a float rounding difference (and L-BFGS takes steps of
    # lr 1). Nearly all agree.
    diff = (tiled.x.detach() - plain.x.detach()).abs()
    worst = 1e-3 if optimizer == "adam" else 1e-2
    assert float(diff.max()) < worst and float(diff.mean()) < 1e-5


@pytest.mark.slow
def test_tiled_multiscale_budgeted_render_from_the_command_line(tmp_path, export_dir, replay_clock):
    """--tile with multi-scale, a time budget and an exported TorchScript extractor. The
    budget is on an injected clock (tests/conftest.py ReplayClock): it holds on a loaded
    machine as on an idle one. Its steps cost what 32 px tiles of a 120 px image cost on a
    2-core CPU (about a second; the clock's default would plan some 140 of them)."""
    import json

    from PIL import Image

    from nst.cli import main

    replay_clock.step = (0.5, 6e-5)  # seconds per step: 1.15 at 120x90, 0.75 at 64x48

    Image.fromarray((torch.rand(90, 120, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(
        tmp_path / "c.png")
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy()).save(
        tmp_path / "s.png")
    code = main(["-q", "stylize", str(tmp_path / "c.png"), "--style", str(tmp_path / "s.png"), "-o",
                 str(tmp_path / "o.png"), "--extractor", str(export_dir), "--size", "120", "--scales", "64",
                 "--time-budget", "20", "--tile", "32", "--device", "cpu", "--stats", str(tmp_path / "st.json")])
    assert code == 0
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["tile"] == 32 and st["steps_run"] > 0 and [s["size"] for s in st["scales"]][-1] == 120
    assert st["total_s"] <= 20 and [s["steps_run"] > 1 for s in st["scales"]] == [True, True]
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (120, 90)


def test_tile_settings_and_edge_cases():
    from nst.engine.errors import InputError

    with pytest.raises(InputError, match="choose one"):
        StylizeSettings(tile=64, checkpointing="on")
    with pytest.raises(InputError, match="--compile does not apply"):
        StylizeSettings(tile=64, compile=True)
    with pytest.raises(InputError, match="positive"):
        StylizeSettings(tile=0)
    # pool1 as the deepest tap has a halo of one stride: a thin last piece joins its neighbour,
    # so that no crop is smaller than the network's smallest input.
    settings = StylizeSettings(resize="35x33", weights=W, device="cpu", content_layers="relu1_1",
                               style_layers="relu1_1,pool1", tile=2)
    p = prepare(_img(33, 35, 1), [(_img(33, 35, 2), 1.0)], settings)
    assert all(t.cy1 - t.cy0 >= 4 and t.cx1 - t.cx0 >= 4 for t in p.objective.tiles((33, 35)))
    p.stepper.step()
    # One tile covering the image: the plain objective runs (a tiled step would only add a forward).
    one = prepare(_img(40, 48, 3), [(_img(40, 48, 4), 1.0)], StylizeSettings(resize="48x40", weights=W, device="cpu",
                                                                            tile=4096))
    assert type(one.objective).__name__ == "WholeImage" and one.memory.tile is None
