"""The export step: extractor -> TorchScript, ONNX, ExportedProgram, the step graphs
(export/to_step.py), then manifest.json.

Everything is written into a hidden staging directory inside ``out`` first. Each artefact
is then loaded back from disk and compared with the eager module on a fresh random input
of a size other than the traced one. Only when all pass are the files moved into ``out``
and the manifest written, last; an interrupted or failed export leaves no manifest, and
so nothing that looks like a finished export.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nst.engine.errors import ExportError, NSTError
from nst.engine.features import VGGFeatures, build_extractor
from nst.engine.fsutil import atomic_write_text, output_dir, sha256_file
from nst.engine.manifest import MANIFEST_NAME, ONNX_NAME, PROGRAM_NAME, STEP_FILES, STEP_WEIGHTS_NAME, TORCHSCRIPT_NAME

from . import manifest as manifest_mod
from . import to_onnx, to_program, to_step, to_torchscript
from .compare import TOLERANCE, SizeRefused, check_sizes
from .settings import ExportSettings, parse_size
from nst.engine.sizes import wxh

log = logging.getLogger("nst")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILES = {"torchscript": TORCHSCRIPT_NAME, "onnx": ONNX_NAME, "pt2": PROGRAM_NAME}


class ExportResult(dict):
    """The manifest, plus the warnings the libraries printed, for the summary."""

    library_warnings: list[str]


def export_extractor(settings: ExportSettings, module: VGGFeatures | None = None) -> ExportResult:
    """Run the export described by ``settings``; return the manifest written.

    ``module`` may be given to export an already-built extractor (its weights are then
    taken from it, and ``settings.weights/taps/pool/network`` are ignored).
    """
    out = _prepare_out(settings.out)
    if module is None:
        module = build_extractor(settings.weights, settings.taps, settings.pool, settings.network)
    else:
        module = copy.deepcopy(module)  # the precision cast below must not change the caller's module
    log.info("weights: %s", _weights_line(module))
    weights_sha = module.weights_sha256()  # of the float32 weights, before the precision cast
    module.to_format(_DTYPES[settings.precision], settings.channels_last)
    trace_hw = parse_size(settings.trace_size)
    check_hw = parse_size(settings.check_size)
    for what, (h, w) in (("--trace-size", trace_hw), ("--check-size", check_hw)):
        if min(h, w) < module.min_side:
            raise ExportError(f"{what} {wxh((h, w))} is too small for tap {module.cut_after}: use at least {module.min_side} px")

    _check_space(out, module, settings.formats)
    # Named after this process, so that a later export can tell a dead one's leftovers.
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            artefacts, check = _write_and_check(settings, module, staging, trace_hw, check_hw)
        manifest = manifest_mod.build(module, weights_sha256=weights_sha, opset=settings.opset, trace_size=trace_hw, check=check, artefacts=artefacts)
        failed = [name for name, a in artefacts.items() if a.get("written") and not a["check"]["passed"]]
        if failed:
            raise ExportError(_failure_line(failed, artefacts, settings.precision))
        _publish(out, staging, artefacts, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(manifest)
    result.library_warnings = _unique_warnings(caught)
    return result


STAGING_PREFIX = ".nst-export-"


def _prepare_out(out: Path) -> Path:
    """The output directory, made and proven writable before any work; leftovers of
    exports that were killed are removed from it."""
    out = output_dir(out)
    _clean_leftovers(out)
    return out


def _clean_leftovers(out: Path) -> None:
    """Remove the staging directories that exports killed outright (SIGKILL, power loss)
    left in ``out``; those of exports still running are left alone."""
    for d in out.glob(f"{STAGING_PREFIX}*"):
        pid = d.name[len(STAGING_PREFIX):].split("-", 1)[0]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                pass
            except PermissionError:
                alive = True  # someone else's process
        if not alive and d.is_dir():
            log.info("removing %s, left by an export that did not finish", d)
            shutil.rmtree(d, ignore_errors=True)


def _check_space(out: Path, module: VGGFeatures, formats) -> None:
    """Refuse before writing when ``out``'s filesystem cannot hold the artefacts: a full
    disk in the middle of torch's writers can abort the process from C++, beyond any
    Python clean-up. Each artefact is about the size of the weights."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    need = int(len(formats) * weights * 1.2) + 16 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise ExportError(f"{out} has {free / 2**20:.0f} MB free; the export needs about {need / 2**20:.0f} MB "
                          f"({', '.join(formats)}); nothing was written")


def _weights_line(module: VGGFeatures) -> str:
    info = module.weights_info
    if info.get("random"):
        return f"{info['source']} ({info['note']})"
    return info["source"]


def _write_and_check(settings, module, staging, trace_hw, check_hw):
    seed = secrets.randbits(31)  # fresh every export; recorded for reproduction
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(2, 3, *trace_hw, generator=torch.Generator().manual_seed(0))
    sizes = check_sizes(check_hw, module.min_side)
    xs = [torch.rand(1, 3, *hw, generator=gen) for hw in sizes]
    check = {"size": list(check_hw), "sizes": [list(hw) for hw in sizes], "seed": seed,
             "metric": "max |artefact - eager| / max |eager|, worst tap and size (input gradient: first size)",
             "tolerance": TOLERANCE[settings.precision], "reference": f"the eager module in {settings.precision}"}
    artefacts: dict[str, dict] = {}
    for fmt in settings.formats:
        if fmt == "step":
            artefacts[fmt] = _step(settings, module, staging, trace_hw, sizes, seed, check["tolerance"])
            continue
        if fmt == "onnx" and settings.precision in to_onnx.UNSUPPORTED:
            artefacts[fmt] = {"file": FILES[fmt], "written": False, "reason": to_onnx.UNSUPPORTED[settings.precision]}
            log.warning("onnx: not written: %s", artefacts[fmt]["reason"])
            continue
        path = staging / FILES[fmt]
        write_s = _write(fmt, settings, module, example, path)
        log.info("%s: checking against eager at %s", fmt, ", ".join(wxh(hw) for hw in sizes))
        entry = {"file": FILES[fmt], **_check(fmt, settings, module, path, xs, seed)}
        errs = entry.pop("errors")
        passed = all(v["max_rel_err"] <= check["tolerance"] for v in errs.values())
        entry.update(written=True, sha256=sha256_file(path), bytes=path.stat().st_size,
                     export_seconds=round(write_s, 2), check={**errs, "passed": passed})
        artefacts[fmt] = entry
    return artefacts, check


def _step(settings, module, staging, trace_hw, sizes, seed, tolerance) -> dict:
    """The step graphs (export/to_step.py): written and checked, or why not."""
    log.info("step: writing %s and %s", ", ".join(STEP_FILES.values()), STEP_WEIGHTS_NAME)
    try:
        entry = to_step.export_and_check(settings, module, staging, trace_hw, sizes, seed, tolerance)
    except NSTError:
        raise
    except Exception as e:
        raise ExportError(f"step graphs failed: {type(e).__name__}: {_first_line(e)}") from e
    if not entry["written"]:
        log.warning("step: not written: %s", entry["reason"])
    return entry


def _write(fmt: str, settings, module, example, path: Path) -> float:
    """Write one artefact; the seconds it took. An exporter failure is one clear error."""
    t0 = time.perf_counter()
    log.info("%s: writing %s", fmt, FILES[fmt])
    try:
        if fmt == "torchscript":
            to_torchscript.write(module, example, path, module.describe())
        elif fmt == "onnx":
            to_onnx.write(module, example, path, module.taps, module.min_side, settings.opset, module.describe())
        else:
            to_program.write(module, example, path, module.min_side, module.describe())
    except NSTError:
        raise
    except Exception as e:
        raise ExportError(f"{fmt} export failed: {type(e).__name__}: {_first_line(e)}") from e
    return time.perf_counter() - t0


def _check(fmt: str, settings, module, path: Path, xs, seed: int) -> dict:
    """Load one artefact back and compare it with the eager module: its manifest entry,
    with its errors under "errors"."""
    try:
        if fmt == "torchscript":
            return {"errors": to_torchscript.check(path, module, xs, seed), "differentiable": True,
                    "load": "torch.jit.load(path) in Python, torch::jit::load(path) in C++"}
        if fmt == "onnx":
            errs = to_onnx.check(path, module, xs)
            return {"input_name": to_onnx.INPUT_NAME, "output_names": errs.pop("output_names"),
                    "opset": settings.opset, "load": "onnxruntime.InferenceSession(path)", "errors": errs}
        return {"errors": to_program.check(path, module, xs), "load": "torch.export.load(path).module()",
                "note": "inference through AOTInductor in C++ has no gradients; use TorchScript for that"}
    except NSTError:
        raise
    except SizeRefused as e:
        others = " ".join(f for f in settings.formats if f != fmt) or "torchscript"
        raise ExportError(f"{fmt} self-check failed: {e}; torch {torch.__version__} cannot export a {fmt} file that "
                          f"accepts every size of at least {module.min_side} px; leave it out (--formats {others}); "
                          "nothing was written and no manifest") from e
    except Exception as e:
        raise ExportError(f"{fmt} self-check could not run the artefact: {type(e).__name__}: {_first_line(e)}") from e


def _publish(out: Path, staging: Path, artefacts: dict, manifest: dict) -> None:
    """Move the checked files into ``out``; the manifest goes last."""
    old_manifest = out / MANIFEST_NAME
    if old_manifest.exists():
        old_manifest.unlink()  # from here until the end, ``out`` is not a finished export
    for fmt, name in FILES.items():
        entry = artefacts.get(fmt)
        if entry and entry.get("written"):
            os.replace(staging / name, out / name)
        elif (out / name).exists():
            (out / name).unlink()  # a stale file from an earlier export would mislead
    step = artefacts.get("step")
    for name in (*STEP_FILES.values(), STEP_WEIGHTS_NAME):
        if step and step.get("written"):
            os.replace(staging / name, out / name)
        elif (out / name).exists():
            (out / name).unlink()
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def _failure_line(failed, artefacts, precision) -> str:
    parts = []
    for name in failed:
        errs = artefacts[name]["check"]
        worst = max((v for k, v in errs.items() if isinstance(v, dict)), key=lambda v: v["max_rel_err"])
        kind = max((k for k, v in errs.items() if isinstance(v, dict)), key=lambda k: errs[k]["max_rel_err"])
        parts.append(f"{name} {kind} relative error {worst['max_rel_err']:.2e}")
    return (f"self-check failed ({'; '.join(parts)}; tolerance {TOLERANCE[precision]:.0e} for {precision}); "
            "nothing was written and no manifest")


def _first_line(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return lines[0][:300] if lines else ""


def _unique_warnings(caught) -> list[str]:
    seen: dict[str, None] = {}
    for w in caught or []:
        seen.setdefault(f"{w.category.__name__}: {_first_line(w.message)}", None)
    return list(seen)


def summary(result: ExportResult, out: Path) -> str:
    """The human summary printed after an export (warnings first, so they do not bury it)."""
    m = result
    lines = []
    if result.library_warnings:
        lines.append(f"library warnings during export ({len(result.library_warnings)} kinds; TorchScript's "
                     "deprecation notices are expected):")
        lines += [f"  {w}" for w in result.library_warnings]
        lines.append("")
    lines.append(f"exported {m['network']} cut after {m['cut_after']} to {out}")
    lines.append(f"  taps      {', '.join(m['taps'])} (output order)")
    lines.append(f"  network   {m['pool']} pooling, {m['dtype']}, {m['memory_format']}; input NCHW RGB in [0, 1], "
                 f"H, W >= {m['input']['min_side']}, normalised inside")
    w = m["weights"]
    lines.append(f"  weights   {w['source']}" + (f"  ** {w['note']} **" if w.get("random") else ""))
    lines.append(f"            tensors sha256 {w['tensors_sha256'][:16]}...")
    sc = m["self_check"]
    lines.append(f"  self-check at {', '.join(wxh(hw) for hw in sc['sizes'])} (WxH; traced at {wxh(m['trace']['size'])}), "
                 f"{sc['metric']}, tolerance {sc['tolerance']:.0e}:")
    for fmt, a in m["artefacts"].items():
        if not a.get("written"):
            lines.append(f"    {fmt:<12} not written: {a['reason']}")
            continue
        errs = "  ".join(f"{k} {v['max_rel_err']:.1e}" for k, v in a["check"].items() if isinstance(v, dict))
        if fmt == "step":  # four files: the graphs on one line, their errors on the next
            lines.append(f"    {fmt:<12} {a['file']} + {a['weights_file']['file']}  {a['bytes'] / 1e6:7.1f} MB  "
                         f"{'ok' if a['check']['passed'] else 'FAILED'}")
            lines.append(f"    {'':<12} {errs}")
            continue
        lines.append(f"    {fmt:<12} {a['file']:<16} {a['bytes'] / 1e6:7.1f} MB  {errs}  "
                     f"{'ok' if a['check']['passed'] else 'FAILED'}")
    lines.append(f"  manifest  {out / MANIFEST_NAME}")
    return "\n".join(lines)
