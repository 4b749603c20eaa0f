"""The benchmark script works end to end (--quick); speed itself is not tested."""

import json
import math

import pytest

from nst.engine.errors import NSTError

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
    assert keys == ["naive", "eager", "user_compile", "user_compile_ro", "user_whole", "user_whole_ro", "targets",
                    "channels_last", "tf32", "bf16", "fp16", "graph", "compile", "kernels", "torchscript", "engine",
                    "onnxruntime"]
    for r in rows:
        if r["key"] in ("user_compile_ro", "user_whole", "user_whole_ro", "tf32", "bf16", "fp16", "graph", "kernels"):
            assert r["applicable"] is False and r["reason"] == "needs CUDA"  # listed, not dropped
            continue
        for field in ("steps_per_s", "ms_per_step", "tflops", "peak_fraction", "peak_mem_bytes", "flops_per_step",
                      "speedup_vs_naive", "speedup_vs_eager", "speedup_vs_best_baseline", "first_step_s"):
            assert isinstance(r[field], (int, float)) and math.isfinite(r[field]) and r[field] > 0, (r["key"], field)
        assert len(r["repeats_ms_per_step"]) == 2
    assert {r["best_baseline"] for r in rows if r.get("steps_per_s")} <= {"naive", "eager", "user_compile"}
    assert rows[keys.index("engine")]["step_variant"] == "eager"  # the CPU's default, what measured fastest there
    assert rows[keys.index("compile")]["step_variant"] == "compiled" and rows[keys.index("compile")]["compile_s"] > 0
    ort = rows[keys.index("onnxruntime")]  # the exported step in ONNX Runtime, with its ratio to the engine's
    assert ort["speedup_vs_engine"] > 0 and "The step in ONNX Runtime" in (tmp_path / "quick.md").read_text()
    tti = data["time_to_image"]["renders"]["64 px / 2 steps"]
    assert set(tti) == {"engine defaults", "engine --compile", "user loop + torch.compile (default)"}
    for name, v in tti.items():
        assert "error" not in v and v["cold_s"] > 0 and v["warm_s"] > 0, name
    onnx = data["sizes"]["64"]["onnx_targets"]
    assert onnx["eager_ms"] > 0 and onnx["onnxruntime_ms"] > 0
    # Every number in the file is finite, and every timing/rate positive.
    for path, v in _numbers(data):
        assert math.isfinite(v), path
    out, err = capfd.readouterr()  # file descriptors: what the C++ libraries print too
    assert "| naive eager" in out
    assert "gpuGetDeviceCount" not in err and "USDT" not in err, err


def test_bench_rows_and_renders_are_checked(tmp_path, capsys):
    """--rows picks rows by key and --renders sets the time-to-image renders; a key that is
    no row, or a render that is not PX:STEPS, is one line and no results."""
    from nst.bench.settings import BenchSettings

    assert BenchSettings(renders=("512:500", "64:2")).render_list() == ((512, 500), (64, 2))
    for bad in ("512", "x:3", "512:0"):
        with pytest.raises(NSTError, match="PX:STEPS"):
            BenchSettings(renders=(bad,))
    code = main(["-q", "bench", "--device", "cpu", "--rows", "eager", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no row 'nope'" in err[0] and not list(tmp_path.iterdir())


def test_flop_formula():
    # conv1_1 alone on 32x32: 2 * 3 * 64 * 9 * 32 * 32
    assert conv_forward_flops(32, 32, "relu1_1") == 2 * 3 * 64 * 9 * 32 * 32
    # The published figure for VGG19 at 224x224 is 19.5 GMACs, nearly all in its 16 convs.
    assert 38.9e9 < conv_forward_flops(224, 224, "relu5_4") < 39.1e9
    # Through conv5_1 (13 convs): the last three 14x14 convs (3 x 0.925 GFLOPs) fewer.
    assert 36.2e9 < conv_forward_flops(224, 224) < 36.3e9
    assert step_flops(64, 64, extra_forwards=2) - step_flops(64, 64) == 2 * conv_forward_flops(64, 64)


@pytest.mark.slow
def test_quick_quality_benchmark(tmp_path, capsys, replay_clock):
    """The benchmark's plumbing on an injected clock (tests/conftest.py ReplayClock): its
    7 s budget is the clock's, so a loaded machine does not refuse it."""
    code = main(["-q", "bench-quality", "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "q"])
    assert code == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert "equal_same_scales" not in data  # the default start is the equal split's: no third render
    for key in ("adaptive", "equal"):
        assert [s["size"] for s in data[key]["scales"]] == [64, 128]
        assert all(s["why"] for s in data[key]["scales"])
    for key in ("adaptive", "equal", "single"):
        v = data[key]
        assert math.isfinite(v["final_loss"]) and v["final_loss"] > 0
        assert v["seconds"] <= data["budget_s"]  # within the budget: the clock is the test's
        assert 0 < v["held_out_style_distance"] < math.inf and 0 <= v["content_distance"] < math.inf
    assert set(data["goals"]) == {"adaptive_over_equal_loss", "single_budgets_to_match_adaptive"}
    md = (tmp_path / "q.md").read_text()
    assert "held-out style distance" in md and "multi-scale, adaptive plan" in md


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
    from nst.bench import baselines, reference, user_loop
    from nst.engine.layers import IMAGENET_MEAN, IMAGENET_STD, deepest, layer_by_name, vgg_layers

    for network in ("vgg19", "vgg16"):
        assert reference.LAYER_NAMES[network] == [layer.name for layer in vgg_layers(network)], network
    assert tuple(reference.MEAN) == IMAGENET_MEAN and tuple(reference.STD) == IMAGENET_STD
    # The standalone user loop writes its own (it imports nothing of nst).
    assert tuple(user_loop.MEAN) == IMAGENET_MEAN and tuple(user_loop.STD) == IMAGENET_STD
    table = layer_by_name("vgg19")
    assert baselines.TAP_INDEX == {name: table[name].index for name in baselines.TAP_INDEX}
    assert baselines.CUT == deepest(tuple(baselines.TAP_INDEX)).index + 1
    # And torchvision's own builder has the modules the names say, in the same places.
    from torchvision.models.vgg import cfgs, make_layers

    for network, cfg in (("vgg19", "E"), ("vgg16", "D")):
        kinds = [type(m).__name__ for m in make_layers(cfgs[cfg])]
        want = [{"conv": "Conv2d", "relu": "ReLU", "pool": "MaxPool2d"}[n[:4]] for n in reference.LAYER_NAMES[network]]
        assert kinds == want, network


def test_profile_attributes_kernels_to_the_operators_that_launched_them():
    """Launch chains (innermost first) as an H100 trace links them: a cuDNN implicit-GEMM
    kernel launched by a convolution is a convolution, a GEMM launched inside the Gram
    operator is the Gram's, whatever the kernels are called."""
    from nst.bench.profile import attribute

    conv = ["aten::cudnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d", "nst::network"]
    assert attribute(conv) == "convolution forward"
    assert attribute(["aten::convolution_backward", "ConvolutionBackward0",
                      "autograd::engine::evaluate_function: ConvolutionBackward0"]) == "convolution input-gradient"
    assert attribute(["aten::mm", "nst::gram_mc", "GeneratedBackwardFor_nst_gram_mc_default", "nst::losses"]) \
        == "Gram and its backward"
    assert attribute(["aten::mm", "GeneratedBackwardFor_nst_gram_mc_defaultBackward",
                      "autograd::engine::evaluate_function: GeneratedBackwardFor_nst_gram_mc_defaultBackward"]) \
        == "Gram and its backward"
    assert attribute(["aten::copy_", "aten::_to_copy", "aten::to", "nst::gram_mc"]) == "copies"
    assert attribute(["aten::_fused_adam_", "Optimizer.step#Adam.step"]) == "optimizer"
    assert attribute(["aten::clamp_"]) == "optimizer"
    assert attribute(["aten::clamp_min_", "aten::relu_", "nst::network"]) == "pooling/activation"
    assert attribute(["aten::max_pool2d_with_indices_backward", "MaxPool2DWithIndicesBackward0",
                      "autograd::engine::evaluate_function: MaxPool2DWithIndicesBackward0"]) == "pooling/activation"
    assert attribute(["aten::threshold_backward", "ReluBackward0"]) == "pooling/activation"
    assert attribute(["aten::mul", "MulBackward0", "autograd::engine::evaluate_function: MulBackward0"]) == "losses"
    assert attribute(["aten::pow", "aten::square", "nst::losses"]) == "losses"
    assert attribute(["aten::sub", "nst::network"]) == "other"


def _recorded_profile(device):
    import torch

    from nst.bench.profile import attribute_events, record
    from nst.engine.session import prepare
    from nst.engine.settings import StylizeSettings

    gen = torch.Generator().manual_seed(3)
    content, style = torch.rand(3, 56, 72, generator=gen), torch.rand(3, 64, 64, generator=gen)
    settings = StylizeSettings(size=72, device=device.type, weights="random:1", cuda_graph=False)
    step = prepare(content, [(style, 1.0)], settings).stepper.step
    step()
    prof = record(step, device, 2)
    return prof, attribute_events(prof.events(), device.type == "cuda")


def test_profile_attribution_on_a_recorded_cpu_trace():
    import torch

    from nst.bench.profile import GROUPS

    prof, (groups, items) = _recorded_profile(torch.device("cpu"))
    for g in GROUPS[:6]:
        assert groups[g] > 0, g
    by_op: dict[str, set] = {}
    for _, name, g in items:
        by_op.setdefault(name, set()).add(g)
    assert by_op["aten::mkldnn_convolution"] == {"convolution forward"}
    assert by_op["aten::convolution_backward"] == {"convolution input-gradient"}
    assert by_op["aten::mm"] == {"Gram and its backward"}  # only the Grams multiply matrices
    assert by_op["aten::max_pool2d_with_indices"] == {"pooling/activation"}
    # Nothing is dropped: the groups add up to all operators' own CPU time.
    total = sum(ev.self_cpu_time_total for ev in prof.events() if ev.device_type.name == "CPU")
    assert abs(sum(groups.values()) - total) <= 1e-6 * total


@pytest.mark.cuda
def test_profile_attribution_on_a_recorded_cuda_trace():
    import torch

    prof, (groups, items) = _recorded_profile(torch.device("cuda"))
    for g in ("convolution forward", "convolution input-gradient", "Gram and its backward", "pooling/activation"):
        assert groups[g] > 0, g
    for _, name, g in items:  # "kernel <- launching op"
        kernel = name.split(" <- ")[0].lower()
        if "fprop" in kernel or "dgrad" in kernel:
            assert g.startswith("convolution"), name
    kernel_total = sum(ev.time_range.elapsed_us() for ev in prof.events() if ev.device_type.name == "CUDA")
    assert sum(groups.values()) >= 0.97 * kernel_total  # (nearly) every kernel attributed


def test_goals_against_the_fastest_baseline():
    import torch

    from nst.bench.goals import check_goals
    from nst.bench.rows import derive

    rows = [{"key": "eager", "kind": "baseline", "steps_per_s": 10.0, "tflops": 1.0},
            {"key": "user_compile", "kind": "baseline", "steps_per_s": 20.0, "tflops": 2.0},
            {"key": "engine", "kind": "engine", "steps_per_s": 25.0, "tflops": 2.5, "ms_per_step": 40.0,
             "peak_key": "fp32"}]
    derive(rows, {"fp32": 2.5e12})
    assert rows[2]["speedup_vs_best_baseline"] == 1.25 and rows[2]["best_baseline"] == "user_compile"
    got = check_goals({"sizes": {"256": {"rows": rows}}}, torch.device("cpu"))
    assert got["cpu_256_vs_fastest_baseline"]["met"] and got["cpu_256_peak_fraction"]["met"]
    rows[2]["ms_per_step"] = 150.0
    gpu = check_goals({"sizes": {"4096": {"rows": rows}}}, torch.device("cuda"))
    assert gpu["gpu_4096_ms_per_step"]["met"] is False and gpu["gpu_4096_ms_per_step"]["direction"] == "max"



def test_baseline_loops_optimise_the_engines_objective():
    """The baselines are only a comparison if they minimise the same function: their loss
    at a fresh random image equals the engine's float32 reference objective."""
    import torch

    from nst.bench.baselines import TutorialLoop, vgg19_features
    from nst.bench.user_loop import UserLoop, vgg19_cut
    from nst.engine.session import prepare
    from nst.engine.settings import StylizeSettings
    from nst.engine.weights import resolve_weights

    gen = torch.Generator().manual_seed(11)
    content, style, x = (torch.rand(1, 3, 72, 56, generator=gen) for _ in range(3))
    settings = StylizeSettings(resize="56x72", weights="random:2", device="cpu", reference=True)
    prep = prepare(content[0], [(style[0], 1.0)], settings)
    want = prep.objective.losses(x)[0]
    state = resolve_weights("random:2", "vgg19").state
    user = UserLoop(vgg19_cut(state, "cpu"), content, style)  # compiles only when stepped
    torch.testing.assert_close(user.loss(x), want, rtol=1e-4, atol=0)
    tut = TutorialLoop(vgg19_features(state, "cpu"), content, style, 0.02, 1.0, 1e6, 1.0, naive=False)
    tut.x.data.copy_(x)
    torch.testing.assert_close(tut.step(), want, rtol=1e-4, atol=0)


def test_the_report_says_which_step_ran_and_why_the_others_did_not():
    from nst.bench.report import _size_section

    choice = {"cached": False, "ms": {"graph": 2.0, "compiled": 1.5, "kernels": 1.2},
              "errors": {"kernels": "its losses after 14 steps differ from graph's by more than 0.02"}}
    rows = [{"key": "engine", "label": "engine defaults", "kind": "engine", "applicable": True,
             "step_variant": "compiled", "variant_choice": choice, "steps_per_s": 500.0, "ms_per_step": 2.0,
             "tflops": 1.0}]
    text = "\n".join(_size_section("512", {"rows": rows}))
    assert ("The engine defaults ran the step variant compiled (chosen by measurement: graph 2 ms, compiled 1.5 ms, "
            "kernels 1.2 ms). Not chosen: kernels: its losses after 14 steps differ from graph's") in text


def test_a_benchmark_stopped_midway_keeps_the_sizes_it_finished(tmp_path, monkeypatch):
    """A GPU machine's call ends at its limit (timeout sends SIGTERM): the tables are written
    after every size, marked partial, so what was measured comes back."""
    from nst.bench import run as bench_run

    real = bench_run._size_entry

    def entry(size, *args):
        if size == 40:
            raise KeyboardInterrupt  # what a stop signal raises in the engine
        return real(size, *args)

    monkeypatch.setattr(bench_run, "_size_entry", entry)
    code = main(["-q", "bench", "--quick", "--device", "cpu", "--sizes", "32", "40", "--rows", "eager", "engine",
                 "--no-time-to-image", "--no-profile", "--no-onnx", "--out", str(tmp_path), "--name", "cut"])
    assert code != 0
    data = json.loads((tmp_path / "cut.json").read_text())
    assert list(data["sizes"]) == ["32"] and "not measured yet: 40 px" in data["partial"]
    assert [r["key"] for r in data["sizes"]["32"]["rows"]] == ["eager", "engine"]
    assert data["sizes"]["32"]["rows"][1]["speedup_vs_eager"] > 0  # derived from what was there
    assert "**Partial results**: the run stopped before it finished (not measured yet: 40 px" in (
        tmp_path / "cut.md").read_text()
    # Rows timed one by one (as on a GPU): written after each row, so a row that hangs or is
    # stopped keeps the rows before it.
    from nst.bench import rows as bench_rows

    monkeypatch.setattr(bench_run, "_size_entry", real)
    real_row = bench_rows.build_row

    def build(row, *args):
        if row.key == "engine":
            raise KeyboardInterrupt
        return real_row(row, *args)

    monkeypatch.setattr(bench_rows, "build_row", build)
    assert main(["-q", "bench", "--quick", "--device", "cpu", "--sizes", "32", "--rows", "eager", "engine",
                 "--no-interleave", "--no-time-to-image", "--no-profile", "--no-onnx", "--out", str(tmp_path),
                 "--name", "cut"]) != 0
    data = json.loads((tmp_path / "cut.json").read_text())
    assert [r["key"] for r in data["sizes"]["32"]["rows"]] == ["eager"] and data["sizes"]["32"]["rows"][0]["ms_per_step"]
    assert data["partial"].startswith("not measured yet: the rest of 32 px")
    # A run that finishes has no such mark.
    monkeypatch.setattr(bench_rows, "build_row", real_row)
    assert main(["-q", "bench", "--quick", "--device", "cpu", "--sizes", "32", "--rows", "eager", "--no-time-to-image",
                 "--no-profile", "--no-onnx", "--out", str(tmp_path), "--name", "cut"]) == 0
    data = json.loads((tmp_path / "cut.json").read_text())
    assert "partial" not in data and "Partial" not in (tmp_path / "cut.md").read_text()


@pytest.mark.slow
def test_the_user_loop_s_whole_compiled_step_follows_its_eager_step():
    """The strongest baseline (``whole=True``: loss, backward, Adam and clamp under one
    torch.compile call, the ``user_whole`` rows) really steps, on the CPU too, and takes the
    same steps as the same loop run eagerly."""
    import torch

    from nst.bench.user_loop import UserLoop, vgg19_cut
    from nst.engine.weights import resolve_weights

    gen = torch.Generator().manual_seed(12)
    content, style = (torch.rand(1, 3, 40, 32, generator=gen) for _ in range(2))
    net = vgg19_cut(resolve_weights("random:2", "vgg19").state, "cpu")
    eager = UserLoop(net, content, style)
    eager.loss_fn = eager.loss  # the same loop, nothing compiled
    whole = UserLoop(net, content, style, whole=True)
    assert whole.step is not whole._step  # the compiled step
    for i in range(3):
        eager.step()
        whole.step()
        torch.testing.assert_close(whole.x, eager.x, rtol=0, atol=1e-5, msg=f"step {i}")
    assert not torch.equal(whole.x, content)  # it moved


def test_quick_tiles_benchmark(tmp_path, capsys):
    """`nst bench-tiles --quick`: an untiled and a tiled row at one size, their ratio, the
    memory plan's reach and the two-rank sharing section; bad cases are one line."""
    code = main(["-q", "bench-tiles", "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "t"])
    assert code == 0
    data = json.loads((tmp_path / "t.json").read_text())
    untiled, tiled = data["rows"]
    assert untiled["tile"] == 0 and tiled["tile"] == 48 and tiled["tiles"] == 4
    assert tiled["ratio"] == pytest.approx(tiled["ms_per_step"] / untiled["ms_per_step"])
    assert data["reach"]["tiled_64px"] > data["reach"]["plain"] > 0
    assert set(data["ranks_comm"]["128"]) == {"lead_steps_ms", "every_rank_steps_ms"}
    md = (tmp_path / "t.md").read_text()
    assert "| 96 | 48 | 4 |" in md and "no 2048 px tile row" in md
    for bad in ("96", "96:96", "a:b"):
        assert main(["-q", "bench-tiles", "--quick", "--cases", bad, "--out", str(tmp_path)]) == 1
        assert "bad case" in capsys.readouterr().err


def test_tiles_benchmark_does_not_time_a_tiled_step_as_the_untiled_one(monkeypatch):
    """Where the memory plan would tile the "untiled" step, that row does not fit (and no
    ratio is computed against it)."""
    from nst.bench import tiles
    from nst.bench.settings import TileBenchSettings
    from nst.engine import memory

    # 180 MiB: at 256 px the plain step (about 185 MiB) does not fit, 64 px tiles (157 MiB) do.
    monkeypatch.setattr(memory, "available_bytes", lambda device: 180 * 2**20)
    row = tiles._case(256, None, TileBenchSettings(quick=True).resolved(False), "cpu")
    assert row["fits"] is False and "tiles it" in row["why"]


def test_results_name_files_not_a_machines_paths():
    """A result records an input by its path in the repository, or by its file name: an
    absolute path of the machine that made it means nothing in a clone (issue #27)."""
    from pathlib import Path

    from nst.bench.inputs import source_name
    from nst.bench.report import RESULTS

    assert source_name("/somewhere/else/images/astronaut.png") == "astronaut.png"
    assert source_name(__file__) == "tests/test_bench.py"
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        for key in ("content", "style"):
            if isinstance(data, dict) and isinstance(data.get(key), str):
                assert not Path(data[key]).is_absolute(), (f.name, data[key])
    for f in sorted(RESULTS.glob("*.md")):
        assert "/work/" not in f.read_text() and "/home/" not in f.read_text(), f.name
