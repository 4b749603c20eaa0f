import json
import warnings

import numpy as np
import pytest
import torch

from nst.engine import load_export, load_extractor
from nst.engine.errors import ExportError, InputError, ManifestError
from nst.engine.fsutil import sha256_file
from nst.engine.manifest import MANIFEST_NAME, ONNX_NAME, PROGRAM_NAME, TORCHSCRIPT_NAME
from nst.export import ExportSettings, export_extractor


def _x(h, w, seed, n=1):
    # A fresh generator per call: inputs differ from the ones the export traced and checked.
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1000 + seed))


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def test_manifest_contents(export_dir, eager, weight_files):
    m = json.loads((export_dir / MANIFEST_NAME).read_text())
    assert m["format"] == "nst-extractor" and m["format_version"] == 1
    assert m["taps"] == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    assert [o["name"] for o in m["outputs"]] == m["taps"]
    assert m["tap_channels"] == [64, 128, 256, 512, 512, 512]
    assert m["cut_after"] == "relu5_1" and m["pool"] == "max"
    assert m["dtype"] == "float32" and m["memory_format"] == "contiguous"
    assert m["input"]["layout"] == "NCHW" and m["input"]["value_range"] == [0.0, 1.0] and m["input"]["min_side"] == 32
    assert m["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert m["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert m["weights"]["kind"] == "file" and m["weights"]["random"] is False
    assert m["weights"]["file_sha256"] == sha256_file(weight_files["features"])
    assert m["weights"]["tensors_sha256"] == eager.weights_sha256()
    for lib in ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript"):
        assert m["versions"][lib], lib
    assert m["onnx_opset"] >= 18
    assert m["self_check"]["size"] == [48, 80] and m["trace"]["size"] == [64, 64]
    for fmt, name in (("torchscript", TORCHSCRIPT_NAME), ("onnx", ONNX_NAME), ("pt2", PROGRAM_NAME)):
        a = m["artefacts"][fmt]
        assert a["file"] == name and a["written"] and a["check"]["passed"]
        assert a["sha256"] == sha256_file(export_dir / name)
        assert 0 <= a["check"]["forward"]["max_rel_err"] <= 1e-4
        assert np.isfinite(a["check"]["forward"]["max_abs_err"])
    assert m["artefacts"]["torchscript"]["check"]["input_grad"]["max_rel_err"] <= 1e-4
    assert m["artefacts"]["onnx"]["output_names"] == m["taps"]
    # Nothing but the artefacts and the manifest is left behind (no staging, no partials).
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(
        [MANIFEST_NAME, TORCHSCRIPT_NAME, ONNX_NAME, PROGRAM_NAME]
    )


@pytest.mark.parametrize("h,w", [(72, 120), (136, 56)])
def test_torchscript_forward_and_grad_match_eager(export_dir, eager, h, w):
    ts = _jit_load(export_dir / TORCHSCRIPT_NAME)
    x = _x(h, w, h)
    with torch.no_grad():
        for a, b in zip(ts(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(eager(x))]

    def grad(fn):
        xi = x.clone().requires_grad_(True)
        loss = sum((o * p).sum() for o, p in zip(fn(xi), probes))
        return torch.autograd.grad(loss, xi)[0]

    g_ts, g_eager = grad(ts), grad(eager)
    torch.testing.assert_close(g_ts, g_eager, rtol=1e-5, atol=1e-5 * g_eager.abs().max().item())


def test_torchscript_carries_its_description(export_dir):
    files = {"nst.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(export_dir / TORCHSCRIPT_NAME), _extra_files=files)
    assert json.loads(files["nst.json"])["taps"][-1] == "relu5_1"


def test_onnx_runtime_matches_eager(export_dir, eager):
    import onnxruntime as ort

    s = ort.InferenceSession(str(export_dir / ONNX_NAME), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["image"]
    for h, w, n in ((88, 40, 1), (64, 104, 3)):  # other sizes and batch than traced
        x = _x(h, w, w, n)
        got = s.run(None, {"image": x.numpy()})
        with torch.no_grad():
            for a, b in zip(got, eager(x)):
                torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# Odd and even sides, some whose halvings are odd (56 -> 28, 14, 7; 63 -> 31, 15, 7, 3), the
# smallest allowed, and batches other than the traced 2: the manifest promises every size.
ODD_EVEN = ((56, 96, 2), (63, 94, 1), (62, 63, 1), (32, 33, 1), (47, 32, 3), (90, 118, 1))


@pytest.mark.parametrize("h,w,n", ODD_EVEN)
def test_exported_program_matches_eager(export_dir, eager, h, w, n):
    prog = torch.export.load(str(export_dir / PROGRAM_NAME)).module()
    x = _x(h, w, 7 + h, n=n)
    with torch.no_grad():
        for a, b in zip(prog(x), eager(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,w,n", ODD_EVEN)
def test_onnx_accepts_every_size(export_dir, eager, h, w, n):
    import onnxruntime as ort

    s = ort.InferenceSession(str(export_dir / ONNX_NAME), providers=["CPUExecutionProvider"])
    x = _x(h, w, 11 + w, n)
    with torch.no_grad():
        for a, b in zip(s.run(None, {"image": x.numpy()}), eager(x)):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_self_check_covers_odd_halvings(export_dir):
    m = json.loads((export_dir / MANIFEST_NAME).read_text())
    assert m["self_check"]["sizes"] == [[48, 80], [63, 94], [62, 63]]
    for fmt in ("torchscript", "onnx", "pt2"):
        assert m["artefacts"][fmt]["check"]["forward"]["worst_at"] in m["self_check"]["sizes"]


def test_export_refuses_a_program_that_refuses_sizes(tmp_path, weight_files, monkeypatch):
    """A program that only runs at the traced size (here: exported without dynamic shapes)
    is refused with a clear message, and nothing is written."""
    import nst.export.to_program as program_mod

    def static_write(module, example, path, min_side, describe):
        torch.export.save(torch.export.export(module, (example,)), str(path))

    monkeypatch.setattr(program_mod, "write", static_write)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"pt2 self-check failed: it does not run on a 80x48 input \(WxH\) .*leave it out "
                                          r"\(--formats torchscript\)"):
        export_extractor(ExportSettings(out=out, weights=str(weight_files["features"]), trace_size="64x64",
                                        check_size="80x48", formats=("torchscript", "pt2")))
    assert not out.exists() or list(out.iterdir()) == []


def test_loader_gives_differentiable_extractor(export_dir, eager):
    m = load_export(export_dir)
    assert m.taps == eager.taps and m.min_side == 32
    x = _x(40, 64, 9).requires_grad_(True)
    sum(o.mean() for o in m(x)).backward()
    g1 = x.grad.clone()
    x.grad = None
    sum(o.mean() for o in eager(x)).backward()
    torch.testing.assert_close(g1, x.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="too small"):
        m(torch.rand(1, 3, 16, 64))


def test_loader_selects_and_checks_taps(export_dir, eager):
    m = load_extractor(export_dir, taps=("relu4_2", "relu1_1"))
    x = _x(48, 48, 10)
    with torch.no_grad():
        got = m(x)
        full = eager(x)
    assert m.taps == ("relu1_1", "relu4_2") and len(got) == 2
    torch.testing.assert_close(got[1], full[4])
    with pytest.raises(ManifestError, match="does not export tap conv4_2"):
        load_export(export_dir, taps=("conv4_2",))
    with pytest.raises(ManifestError, match="max pooling, but the settings ask for avg"):
        load_export(export_dir, pool="avg")
    with pytest.raises(ManifestError, match="holds vgg19, but vgg16"):
        load_export(export_dir, network="vgg16")


def test_loader_errors(tmp_path, export_dir):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_export(tmp_path)
    with pytest.raises(ManifestError, match="not found"):
        load_export(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_export(bad)
    # A TorchScript file changed after export is refused by its hash.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / MANIFEST_NAME).write_bytes((export_dir / MANIFEST_NAME).read_bytes())
    data = bytearray((export_dir / TORCHSCRIPT_NAME).read_bytes())
    data[-100] ^= 0xFF
    (copy / TORCHSCRIPT_NAME).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="SHA-256 does not match"):
        load_export(copy)


def test_self_check_fails_a_tampered_artefact(tmp_path, weight_files, monkeypatch):
    """A broken exporter (here: TorchScript traced from perturbed weights) is caught."""
    import nst.export.to_torchscript as ts_mod

    real_trace = ts_mod.trace

    def tampered_trace(module, example):
        import copy

        bad = copy.deepcopy(module)
        with torch.no_grad():
            bad.body.conv3_1.weight.mul_(1.01)
        return real_trace(bad, example)

    monkeypatch.setattr(ts_mod, "trace", tampered_trace)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"self-check failed \(torchscript (forward|input_grad) relative error \d.*no manifest"):
        export_extractor(ExportSettings(out=out, weights=str(weight_files["features"]), trace_size="64x64",
                                        check_size="80x48", formats=("torchscript",)))
    assert not (out / MANIFEST_NAME).exists()
    assert list(out.iterdir()) == [], "a failed export leaves nothing behind"


def test_interrupted_export_keeps_the_previous_one(tmp_path, weight_files, monkeypatch):
    import nst.export.to_onnx as onnx_mod

    out = tmp_path / "out"
    settings = dict(weights=str(weight_files["features"]), taps=("relu2_1",), trace_size="64x64", check_size="80x48")
    export_extractor(ExportSettings(out=out, **settings))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_mod, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_extractor(ExportSettings(out=out, weights="random:5", taps=("relu2_1",), trace_size="64x64",
                                        check_size="80x48"))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before, "the old export is untouched and no staging files remain"


@pytest.mark.slow
def test_half_precision_and_channels_last_exports(tmp_path):
    out = tmp_path / "fp16"
    m = export_extractor(ExportSettings(out=out, weights="random:2", taps=("relu3_1",), precision="fp16",
                                        channels_last=True, trace_size="48x48", check_size="56x40"))
    assert m["dtype"] == "float16" and m["memory_format"] == "channels_last"
    assert all(a["check"]["passed"] for a in m["artefacts"].values() if a["written"])
    assert m["artefacts"]["step"]["written"] is False and "float32 only" in m["artefacts"]["step"]["reason"]
    out_b = tmp_path / "bf16"
    m = export_extractor(ExportSettings(out=out_b, weights="random:2", taps=("relu3_1",), precision="bf16",
                                        trace_size="48x48", check_size="56x40"))
    assert m["artefacts"]["onnx"]["written"] is False and "bfloat16" in m["artefacts"]["onnx"]["reason"]
    assert not (out_b / ONNX_NAME).exists()
    ts = load_export(out_b)
    y = ts(torch.rand(1, 3, 40, 40))
    assert y[0].dtype == torch.bfloat16
    # The weights hash names the float32 weights, whatever the export precision.
    assert m["weights"]["tensors_sha256"] == json.loads((out / MANIFEST_NAME).read_text())["weights"]["tensors_sha256"]


def test_settings_errors(tmp_path):
    with pytest.raises(ExportError, match="must differ"):
        export_extractor(ExportSettings(out=tmp_path, weights="random", trace_size="64x64", check_size="64x64"))
    with pytest.raises(ExportError, match="too small for tap relu5_1"):
        export_extractor(ExportSettings(out=tmp_path, weights="random", trace_size="64x64", check_size="24x16"))
    with pytest.raises(ExportError, match="opset 17 is too old"):
        export_extractor(ExportSettings(out=tmp_path, weights="random", opset=17))
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export_extractor(ExportSettings(out=tmp_path, weights="random", formats=("tflite",)))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_extractor(ExportSettings(out=f, weights="random"))


def test_every_artefact_carries_its_description(export_dir):
    """The tap list and the settings that change results travel inside each file."""
    import onnx

    m = json.loads((export_dir / MANIFEST_NAME).read_text())
    files = {"nst.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(export_dir / TORCHSCRIPT_NAME), _extra_files=files)
    inside = [json.loads(files["nst.json"])]
    meta = {p.key: p.value for p in onnx.load(str(export_dir / ONNX_NAME)).metadata_props}
    inside.append(json.loads(meta["nst.json"]))
    extra = {"nst.json": ""}
    torch.export.load(str(export_dir / PROGRAM_NAME), extra_files=extra)
    inside.append(json.loads(extra["nst.json"]))
    for d in inside:
        assert d["taps"] == m["taps"] and d["pool"] == m["pool"] and d["network"] == m["network"]
        assert d["min_side"] == m["input"]["min_side"] and d["tap_channels"] == m["tap_channels"]


def test_an_edited_manifest_is_refused(export_dir, tmp_path):
    """Swapping two taps in manifest.json (the hash beside the file still matches) would make
    the content loss read the wrong layer: the loader refuses it."""
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(export_dir, d)
    m = json.loads((d / MANIFEST_NAME).read_text())
    i, j = m["taps"].index("relu4_1"), m["taps"].index("relu4_2")
    m["taps"][i], m["taps"][j] = m["taps"][j], m["taps"][i]
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"does not match extractor.ts: taps is .*\(the manifest was edited\)"):
        load_export(d)
