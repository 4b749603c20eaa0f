"""The benchmark script works end to end (--quick); speed itself is not tested."""

import json
import math

import pytest

from nst.bench.flops import conv_forward_flops, step_flops
from nst.cli import main


def _numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path, capfd):
    code = main(["-q", "bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "quick"])
    assert code == 0
    data = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().startswith("# nst benchmark")
    assert (tmp_path / "quick.png").stat().st_size > 1000
    env = data["environment"]
    for key in ("device", "torch", "threads", "date", "onnxruntime"):
        assert env[key], key
    assert data["peaks_flops"]["fp32"] > 0
    rows = data["sizes"]["64"]["rows"]
    keys = [r["key"] for r in rows]
    assert keys == ["naive", "eager", "targets", "channels_last", "tf32", "bf16", "fp16", "graph", "torchscript",
                    "engine"]
    for r in rows:
        if r["key"] in ("tf32", "bf16", "fp16", "graph"):
            assert r["applicable"] is False and r["reason"] == "needs CUDA"  # listed, not dropped
            continue
        for field in ("steps_per_s", "ms_per_step", "tflops", "peak_fraction", "peak_mem_bytes", "flops_per_step",
                      "speedup_vs_naive", "speedup_vs_eager"):
            assert isinstance(r[field], (int, float)) and math.isfinite(r[field]) and r[field] > 0, (r["key"], field)
        assert len(r["repeats_ms_per_step"]) == 2
    onnx = data["sizes"]["64"]["onnx_targets"]
    assert onnx["eager_ms"] > 0 and onnx["onnxruntime_ms"] > 0
    # Every number in the file is finite, and every timing/rate positive.
    for path, v in _numbers(data):
        assert math.isfinite(v), path
    out, err = capfd.readouterr()  # file descriptors: what the C++ libraries print too
    assert "| naive eager" in out
    assert "gpuGetDeviceCount" not in err and "USDT" not in err, err


def test_flop_formula():
    # conv1_1 alone on 32x32: 2 * 3 * 64 * 9 * 32 * 32
    assert conv_forward_flops(32, 32, "relu1_1") == 2 * 3 * 64 * 9 * 32 * 32
    # The published figure for VGG19 at 224x224 is 19.5 GMACs, nearly all in its 16 convs.
    assert 38.9e9 < conv_forward_flops(224, 224, "relu5_4") < 39.1e9
    # Through conv5_1 (13 convs): the last three 14x14 convs (3 x 0.925 GFLOPs) fewer.
    assert 36.2e9 < conv_forward_flops(224, 224) < 36.3e9
    assert step_flops(64, 64, extra_forwards=2) - step_flops(64, 64) == 2 * conv_forward_flops(64, 64)


@pytest.mark.slow
def test_quick_quality_benchmark(tmp_path, capsys):
    code = main(["-q", "bench-quality", "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "q"])
    assert code == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert [s["size"] for s in data["multi_scale"]["scales"]] == [64, 128]
    for key in ("multi_scale", "single_scale"):
        assert math.isfinite(data[key]["final_loss"]) and data[key]["final_loss"] > 0
        assert data[key]["seconds"] < data["budget_s"] + 2.0  # within the budget (plus a generous margin)
    assert data["single_scale_to_match"]["target_loss"] == data["multi_scale"]["final_loss"]
    assert (tmp_path / "q.md").read_text().startswith("# Quality at equal time")


@pytest.mark.slow
def test_quick_recipe_benchmark_checks_every_original(tmp_path, capsys):
    """`nst bench-recipes --quick`: each faithful original loop agrees with the engine's
    recipe on the first loss (rel. 1e-4), and both are timed."""
    from nst.engine import recipes

    code = main(["-q", "bench-recipes", "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "rq"])
    assert code == 0
    data = json.loads((tmp_path / "rq.json").read_text())
    assert [r["recipe"] for r in data["rows"]] == list(recipes.RECIPES)
    for r in data["rows"]:
        assert r["parity"]["passed"] and r["parity"]["rel_err"] <= 1e-4, r["recipe"]
        assert r["parity"]["original_first_loss"] > 0
        assert r["original_steps_per_s"] > 0 and r["engine_steps_per_s"] > 0
        assert r["original_evals_run"][0] >= 1
    assert (tmp_path / "rq.md").read_text().startswith("# Recipes")
    assert (tmp_path / "rq.png").stat().st_size > 1000


def test_recipe_benchmark_parity_catches_a_wrong_formula(monkeypatch):
    """The parity check is not vacuous: a Udacity original whose Gram is twice too large fails it."""
    import torch

    from nst.bench import originals, recipes as rb

    monkeypatch.setattr(originals.Udacity, "gram_matrix", staticmethod(lambda t: 2 * torch.mm(
        t.view(t.shape[1], -1), t.view(t.shape[1], -1).t())))
    rec = rb.bench_recipe("udacity", rb.RecipeBenchSettings(quick=True), torch.device("cpu"))
    assert not rec["parity"]["passed"] and rec["parity"]["rel_err"] > 0.1


def test_independent_baselines_agree_with_the_layer_table():
    """The baselines and the original loops write torchvision's layout out themselves (so
    they do not share the engine's bugs); here they are held against engine/layers.py."""
    from nst.bench import baselines, reference
    from nst.engine.layers import IMAGENET_MEAN, IMAGENET_STD, deepest, layer_by_name, vgg_layers

    for network in ("vgg19", "vgg16"):
        assert reference.LAYER_NAMES[network] == [layer.name for layer in vgg_layers(network)], network
    assert tuple(reference.MEAN) == IMAGENET_MEAN and tuple(reference.STD) == IMAGENET_STD
    table = layer_by_name("vgg19")
    assert baselines.TAP_INDEX == {name: table[name].index for name in baselines.TAP_INDEX}
    assert baselines.CUT == deepest(tuple(baselines.TAP_INDEX)).index + 1
    # And torchvision's own builder has the modules the names say, in the same places.
    from torchvision.models.vgg import cfgs, make_layers

    for network, cfg in (("vgg19", "E"), ("vgg16", "D")):
        kinds = [type(m).__name__ for m in make_layers(cfgs[cfg])]
        want = [{"conv": "Conv2d", "relu": "ReLU", "pool": "MaxPool2d"}[n[:4]] for n in reference.LAYER_NAMES[network]]
        assert kinds == want, network


def test_profile_files_kernels_by_what_they_compute():
    """cuDNN's convolution kernels are implicit GEMMs: "gemm" in their names must not put
    them among the Gram matmuls (names as an H100 profile printed them)."""
    from nst.bench.profile import kernel_group

    assert kernel_group("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution forward"
    assert kernel_group("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution backward"
    assert kernel_group("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x128x8_ffma") == "Gram matmuls"
    assert kernel_group("cutlass_80_simt_sgemm_128x128_8x4_nn_align1") == "Gram matmuls"
    assert kernel_group("aten::convolution_backward") == "convolution backward"
    assert kernel_group("aten::mkldnn_convolution") == "convolution forward"
    assert kernel_group("aten::mm") == "Gram matmuls"
    for other in ("void at::native::elementwise_kernel<128, 2>", "max_pool_backward_nhwc", "aten::max_pool2d",
                  "void at::native::direct_copy_kernel_cuda", "aten::_foreach_add_"):
        assert kernel_group(other) == "other", other
