"""VGG16 through the same weights, extractor, export and manifest path as VGG19, with the
same parity checks (the vgg16 recipe's taps, average pooling, sizes other than traced)."""

import json
import warnings

import pytest
import torch

from nst.engine import build_extractor, load_export, recipes
from nst.engine.errors import ManifestError
from nst.engine.fsutil import sha256_file
from nst.engine.manifest import MANIFEST_NAME, ONNX_NAME, PROGRAM_NAME, TORCHSCRIPT_NAME
from nst.engine.loop import run
from nst.engine.weights import IMAGENET_URLS, random_state, resolve_weights
from nst.export import ExportSettings, export_extractor

TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def _x(h, w, seed, n=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(2000 + seed))


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w16") / "vgg16_features.pth"
    torch.save(random_state("vgg16", 77), path)
    return path


@pytest.fixture(scope="module")
def eager16(vgg16_file):
    return build_extractor(str(vgg16_file), taps=TAPS, pool="avg", network="vgg16")


@pytest.fixture(scope="module")
def export16(tmp_path_factory, vgg16_file):
    out = tmp_path_factory.mktemp("export16")
    export_extractor(ExportSettings(out=out, weights=str(vgg16_file), network="vgg16", pool="avg", taps=TAPS,
                                    trace_size="64x64", check_size="80x48"))
    return out


def test_vgg16_imagenet_checkpoint_from_the_hub_cache(tmp_path, monkeypatch):
    state = random_state("vgg16", 5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / IMAGENET_URLS["vgg16"].rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in state.items()}, ckpt)  # torchvision's whole-model layout
    w = resolve_weights("imagenet", network="vgg16")
    assert w.kind == "imagenet" and w.network == "vgg16" and w.source == str(ckpt)
    assert torch.equal(w.state["28.weight"], state["28.weight"])  # conv5_3, VGG16's last conv


def test_vgg16_manifest(export16, vgg16_file, eager16):
    m = json.loads((export16 / MANIFEST_NAME).read_text())
    assert m["network"] == "vgg16" and m["pool"] == "avg"
    assert m["taps"] == list(TAPS) and m["cut_after"] == "relu4_3"
    assert m["tap_channels"] == [64, 128, 256, 512]
    assert m["input"]["min_side"] == 16  # relu4_3 is at stride 8, and must be at least 2x2
    assert m["weights"]["file_sha256"] == sha256_file(vgg16_file)
    assert m["weights"]["tensors_sha256"] == eager16.weights_sha256()
    for fmt in ("torchscript", "onnx", "pt2"):
        a = m["artefacts"][fmt]
        assert a["written"] and a["check"]["passed"] and a["check"]["forward"]["max_rel_err"] <= 1e-4
    assert m["artefacts"]["torchscript"]["check"]["input_grad"]["max_rel_err"] <= 1e-4


@pytest.mark.parametrize("h,w", [(72, 120), (136, 56)])
def test_vgg16_torchscript_forward_and_grad_match_eager(export16, eager16, h, w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(export16 / TORCHSCRIPT_NAME))
    x = _x(h, w, h)
    with torch.no_grad():
        for a, b in zip(ts(x), eager16(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(eager16(x))]

    def grad(fn):
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad(sum((o * p).sum() for o, p in zip(fn(xi), probes)), xi)[0]

    g_ts, g_eager = grad(ts), grad(eager16)
    torch.testing.assert_close(g_ts, g_eager, rtol=1e-5, atol=1e-5 * g_eager.abs().max().item())


def test_vgg16_onnx_and_exported_program_match_eager(export16, eager16):
    import onnxruntime as ort

    s = ort.InferenceSession(str(export16 / ONNX_NAME), providers=["CPUExecutionProvider"])
    x = _x(88, 40, 3, n=2)
    with torch.no_grad():
        ref = eager16(x)
    got = s.run(None, {"image": x.numpy()})
    assert len(got) == len(TAPS)
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    prog = torch.export.load(str(export16 / PROGRAM_NAME)).module()
    with torch.no_grad():
        for a, b in zip(prog(x), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vgg16_loader_checks_the_network(export16):
    m = load_export(export16, network="vgg16", pool="avg")
    assert m.network == "vgg16" and m.taps == TAPS
    with pytest.raises(ManifestError, match="holds vgg16, but vgg19"):
        load_export(export16, network="vgg19")


def test_vgg16_recipe_runs_the_same_on_the_export_as_eager(export16, vgg16_file):
    """The vgg16 recipe (step-decay Adam, 4n2m2 Grams) on the TorchScript export follows
    the eager trajectory."""
    content, style = _x(40, 56, 1)[0], _x(48, 48, 2)[0]
    common = dict(size=56, steps=4, progress_every=1, lr_decay_every=2, reference=True)
    a = run(content, [(style, 1.0)], recipes.settings("vgg16", weights=str(vgg16_file), **common))
    b = run(content, [(style, 1.0)], recipes.settings("vgg16", extractor=str(export16), **common))
    assert a.stats.steps_run == b.stats.steps_run == 4
    torch.testing.assert_close(torch.tensor(b.stats.loss), torch.tensor(a.stats.loss), rtol=1e-4, atol=0)
    torch.testing.assert_close(b.image, a.image, rtol=0, atol=1e-4)
