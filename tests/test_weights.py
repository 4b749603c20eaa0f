import pickle

import pytest
import torch
from torch import nn

from nst.engine import build_extractor, resolve_weights
from nst.engine.errors import WeightsError
from nst.engine.weights import IMAGENET_URLS



def _x(h=48, w=80, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_three_file_formats_give_identical_outputs(weight_files):
    outs = {}
    for name, path in weight_files.items():
        m = build_extractor(str(path))
        with torch.no_grad():
            outs[name] = m(_x())
    for name in ("features", "safetensors"):
        for a, b in zip(outs["full"], outs[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_file_weights_record_source_and_hash(weight_files):
    w = resolve_weights(str(weight_files["full"]))
    assert w.kind == "file" and not w.is_random
    assert len(w.file_sha256) == 64
    assert "classifier.0.weight" not in w.state and "0.weight" in w.state


def test_random_is_deterministic_and_seed_dependent():
    a = resolve_weights("random:7").state["0.weight"]
    b = resolve_weights("random:7").state["0.weight"]
    c = resolve_weights("random:8").state["0.weight"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(resolve_weights("random").state["28.weight"], resolve_weights("random:0").state["28.weight"])
    w = resolve_weights("random:7")
    assert w.is_random and "NOT a trained network" in w.describe() and w.info()["random"] is True


def test_random_does_not_touch_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    resolve_weights("random:1")
    assert torch.equal(torch.rand(3), expected)


def test_bad_random_seed():
    with pytest.raises(WeightsError, match="seed after 'random:' must be an integer"):
        resolve_weights("random:abc")


def test_imagenet_found_in_torch_home_cache(tmp_path, monkeypatch, full_model_state, features_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / IMAGENET_URLS["vgg19"].rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save(full_model_state, ckpt)
    w = resolve_weights("imagenet")
    assert w.kind == "imagenet" and w.source == str(ckpt)
    assert torch.equal(w.state["28.weight"], features_state["28.weight"])


def test_imagenet_missing_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("NST_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        resolve_weights("imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "not in the torch hub cache" in msg and str(tmp_path / "empty") in msg
    assert IMAGENET_URLS["vgg19"] in msg and "--weights random" in msg and "--weights PATH" in msg


def test_imagenet_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("NST_OFFLINE", "0")
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    monkeypatch.setitem(IMAGENET_URLS, "vgg19", "http://127.0.0.1:9/vgg19-dcbb9e9d.pth")
    with pytest.raises(WeightsError, match="could not be downloaded .*URLError"):
        resolve_weights("imagenet")
    assert not list((tmp_path / "th").rglob("*.pth")), "a failed download must leave no file"


def test_wrong_shape_names_the_tensor(tmp_path, full_model_state):
    bad = dict(full_model_state)
    bad["features.10.weight"] = torch.zeros(256, 64, 3, 3)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    with pytest.raises(WeightsError, match=r"'features\.10\.weight' \(conv3_1 weight\) has shape \(256, 64, 3, 3\), expected \(256, 128, 3, 3\)"):
        resolve_weights(str(p))


def test_missing_tensor_names_it(tmp_path, features_state):
    bad = {k: v for k, v in features_state.items() if k != "28.bias"}
    p = tmp_path / "missing.pt"
    torch.save(bad, p)
    with pytest.raises(WeightsError, match=r"missing tensor '28\.bias' \(conv5_1 bias"):
        resolve_weights(str(p))
    # ...but a file cut before conv5_1 is fine for an extractor that stops earlier.
    m = build_extractor(str(p), taps=("relu4_2",))
    assert m.cut_after == "relu4_2"


def test_corrupt_file(tmp_path, weight_files):
    data = weight_files["features"].read_bytes()
    p = tmp_path / "truncated.pth"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint, or truncated/corrupt"):
        resolve_weights(str(p))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        resolve_weights(str(junk))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        resolve_weights(str(empty))


def test_pickle_that_is_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], p)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        resolve_weights(str(p))
    p2 = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), p2)  # a whole module: needs unsafe unpickling
    with pytest.raises(WeightsError, match="pickled Python objects"):
        resolve_weights(str(p2))
    p3 = tmp_path / "plain.pkl"
    p3.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError):
        resolve_weights(str(p3))


def test_batchnorm_and_other_network_hints(tmp_path, features_state):
    bn = dict(features_state)
    bn["1.running_mean"] = torch.zeros(64)
    p = tmp_path / "bn.pth"
    torch.save(bn, p)
    with pytest.raises(WeightsError, match="batch-norm"):
        resolve_weights(str(p))
    from nst.engine.weights import random_state

    p16 = tmp_path / "vgg16.pth"
    torch.save(random_state("vgg16", 0), p16)
    with pytest.raises(WeightsError, match="looks like a vgg16 checkpoint: pass --network vgg16"):
        resolve_weights(str(p16))
    assert resolve_weights(str(p16), network="vgg16").network == "vgg16"


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        resolve_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="is a directory"):
        resolve_weights(str(tmp_path))


def test_nan_weights_rejected(tmp_path, features_state):
    bad = dict(features_state)
    bad["0.weight"] = bad["0.weight"].clone()
    bad["0.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.pth"
    torch.save(bad, p)
    with pytest.raises(WeightsError, match="NaN or Inf"):
        resolve_weights(str(p))
