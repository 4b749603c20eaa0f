import pytest
import torchvision
from torch import nn

from nst.engine import build_extractor
from nst.engine.errors import NSTError
from nst.engine.layers import DEFAULT_TAPS, min_side, parse_taps, vgg_layers


@pytest.mark.parametrize("network", ["vgg19", "vgg16"])
def test_layer_table_matches_torchvision(network):
    tv = getattr(torchvision.models, network)().features
    ours = vgg_layers(network)
    assert len(ours) == len(tv)
    kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "pool"}
    for i, (layer, module) in enumerate(zip(ours, tv)):
        assert layer.index == i
        assert layer.kind == kinds[type(module)], layer
        if isinstance(module, nn.Conv2d):
            assert (module.in_channels, module.out_channels) == (layer.in_channels, layer.out_channels)
    # Spot-check the names the literature uses against torchvision's indices.
    names = {l.name: l.index for l in ours}
    if network == "vgg19":
        assert names["conv1_1"] == 0 and names["relu1_1"] == 1 and names["pool1"] == 4
        assert names["conv4_2"] == 21 and names["relu4_2"] == 22 and names["conv5_1"] == 28
        assert names["relu5_1"] == 29 and names["pool5"] == 36
    else:
        assert names["relu4_3"] == 22 and names["relu5_1"] == 25 and names["pool5"] == 30


def test_cut_at_deepest_tap(features_state):
    from nst.engine.weights import Weights

    w = Weights("vgg19", "x", "random", "random:0", None, features_state)
    for taps, last in ((DEFAULT_TAPS, "relu5_1"), (("relu1_1", "conv3_1"), "conv3_1"), (("pool2",), "pool2")):
        m = build_extractor(w, taps=taps)
        names = [n for n, _ in m.body.named_children()]
        assert names[-1] == last
        assert len(names) == {l.name: l.index for l in vgg_layers()}[last] + 1
        assert m.cut_after == last


def test_parse_taps_orders_by_depth_and_dedupes():
    assert parse_taps("relu5_1, relu1_1,relu1_1") == ("relu1_1", "relu5_1")
    assert parse_taps(["conv4_2", "relu2_1,pool1"]) == ("pool1", "relu2_1", "conv4_2")


def test_parse_taps_rejects_unknown():
    with pytest.raises(NSTError, match="unknown tap 'relu6_1'"):
        parse_taps("relu6_1")
    with pytest.raises(NSTError, match="relu4_4"):
        parse_taps("relu4_4", "vgg16")  # vgg16 has three convs in block 4
    with pytest.raises(NSTError, match="no taps"):
        parse_taps("")


def test_min_side():
    assert min_side(DEFAULT_TAPS) == 32  # relu5_1 has stride 16; keep 2x2 there
    assert min_side(("relu1_1",)) == 2
    assert min_side(("pool5",)) == 64
