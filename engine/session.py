"""A render prepared at one size: the network placed, the targets computed once, the
start image and the stepper built. ``prepare`` is the entry point; the loop
(engine/loop.py) only calls the stepper.

The API borrows: a module or tensor the caller passes in is never moved, cast or
flagged. The engine works on its own copy of the network where it needs another device,
layout or activation checkpointing (or on the caller's module, unchanged, where it
does not).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch

from .device import float32_math, same_device
from .errors import InputError
from .imageio import resize_to
from .loader import extractor_for
from .memory import MemoryEstimate
from .objective import Objective, Problem, WholeImage
from .plan import StepPlan, resolve_plan
from .ranks import Prepare, for_settings
from .settings import INIT_KEYWORDS, StylizeSettings
from .signals import deferred
from .sizes import fit_long_edge, wxh
from .steppers import Stepper, make_stepper
from .targets import Targets, compute_targets
from .tiles import SharedTiles, Tiles

log = logging.getLogger("nst")

_WARNED: set = set()


@dataclass
class Prepared:
    """Everything a loop needs, built once per size."""

    settings: StylizeSettings
    plan: StepPlan  # how the steps run, decided once (engine/plan.py)
    stepper: Stepper  # .step() -> (4,) losses of the image it evaluated
    objective: Objective  # the protocol of engine/objective.py: whole image, tiles, or tiles across ranks
    x: torch.Tensor  # (1, 3, H, W) float32, the optimised image
    targets: Targets
    content_img: torch.Tensor  # (1, 3, H, W) on the device
    out_hw: tuple[int, int]
    weights_info: dict
    choice: object = None  # engine/variants.py Choice: how the step variant was chosen, where it was

    @property
    def memory(self) -> MemoryEstimate:
        return self.plan.memory


def place_network(net, device: torch.device, channels_last: bool, checkpoint: bool = False, owned: bool = False,
                  weights_dtype: torch.dtype | None = None):
    """The network the engine runs: on ``device``, in the layout asked for.

    Modules that know how (the eager extractor, a loaded TorchScript extractor) return
    themselves when nothing changes and a copy otherwise (converted in place only when
    ``owned``: already the engine's own copy). Any other module is used as it is on its
    own device (a channels-last input still gives channels-last convolutions) and copied
    to reach another one.
    """
    if hasattr(net, "placed"):
        return net.placed(device, channels_last, checkpoint, owned=owned, weights_dtype=weights_dtype)
    param = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
    if param is None or same_device(param.device, device):
        return net
    return (net if owned else copy.deepcopy(net)).to(device)


def init_image(init: str | torch.Tensor, content: torch.Tensor, styles, seed: int) -> torch.Tensor:
    """The start image (1, 3, H, W) float32, on content's device."""
    hw = tuple(content.shape[-2:])
    if isinstance(init, torch.Tensor):
        img = init if init.dim() == 4 else init.unsqueeze(0)
        return resize_to(img.float().to(content.device), hw).clone()
    if init == "content":
        return content.clone()
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
        return torch.rand(1, 3, *hw, generator=gen).to(content.device)
    if init == "style":
        return resize_to(styles[0][0], hw).clone()
    raise InputError(f"unknown --init {init!r}: use {', '.join(INIT_KEYWORDS)}, or an image file")


def _warn_random(weights_info: dict) -> None:
    if weights_info.get("random") and weights_info.get("source") not in _WARNED:
        _WARNED.add(weights_info.get("source"))  # once per process, not once per scale
        # Information, not a warning: -q silences it, and the command line's last line says it again.
        log.info("using %s: %s", weights_info.get("source"), weights_info.get("note"))


def _sizes(content, styles, settings: StylizeSettings, min_side: int) -> tuple:
    """(H, W) of the output and of each style image, checked against the network's minimum
    side; nothing is resized yet (the memory plan comes first)."""
    out_hw = settings.output_hw(tuple(content.shape[-2:]))
    if min(out_hw) < min_side:
        raise InputError(
            f"output size {wxh(out_hw)} is too small for the network: each side needs at least "
            f"{min_side} px (raise --size or --resize)"
        )
    style_long = max(1, round(settings.style_scale * max(out_hw)))
    style_hws = [fit_long_edge(tuple(img.shape[-2:]), style_long) for img, _ in styles]
    for hw in style_hws:
        if min(hw) < min_side:
            raise InputError(
                f"a style image scaled to {wxh(hw)} is too small for the network (at least {min_side} px per "
                "side): raise --style-scale or --size"
            )
    return out_hw, style_hws


def build_objective(extractor, content, styles, settings: StylizeSettings, plan: StepPlan, out_hw, style_hws,
                    ours: bool = False, ranks=None):
    """The inputs at this size, the targets (once, float32, NCHW, whatever the loop runs in)
    and the objective on the loop's own network: (objective, targets, content (1, 3, H, W),
    [(style (1, 3, h, w), weight)]). Every rank makes this call (engine/worker.py)."""
    device = torch.device(plan.device)
    content_img = resize_to(content.float(), out_hw).unsqueeze(0).to(device)  # (1, 3, H, W)
    style_imgs = [(resize_to(img.float(), hw).unsqueeze(0).to(device), float(w))
                  for (img, w), hw in zip(styles, style_hws)]
    ref_net = place_network(extractor, device, channels_last=False, owned=ours)
    content_layers, style_layers = settings.layer_weights()
    with float32_math(plan.float32_math):
        targets = compute_targets(ref_net, content_img, style_imgs, content_layers, style_layers, settings.gram_norm,
                                  settings.content_norm, tile=plan.tile, network=settings.network, ranks=ranks)
    # The loop's network: its own layout, and under autocast its convolutions' weights cast once.
    net = place_network(ref_net, device, plan.channels_last, plan.checkpoint, owned=ours or ref_net is not extractor,
                        weights_dtype=plan.autocast_dtype)
    problem = Problem.build(net, targets, settings, plan)
    return make_objective(problem, plan, settings, ranks), targets, content_img, style_imgs


def make_objective(problem: Problem, plan: StepPlan, settings: StylizeSettings, ranks=None) -> Objective:
    """The objective the plan asks for, on ``problem``: the whole image (compiled or not), the
    fused one of the kernels variant, tiles, or tiles shared across ranks."""
    loss_scale = settings.loss_scale if plan.precision == "fp16" else None
    if plan.tile is not None:
        if ranks is None:
            return Tiles(problem, plan.tile, settings.network, loss_scale)
        return SharedTiles(problem, plan.tile, settings.network, loss_scale, ranks)
    if plan.variant == "kernels":
        from .fused import FusedObjective

        return FusedObjective(problem, plan.compile, loss_scale)
    return WholeImage(problem, plan.compile, loss_scale)


def prepare(content: torch.Tensor, styles: list[tuple[torch.Tensor, float]], settings: StylizeSettings,
            extractor=None, init: str | torch.Tensor | None = None, trial: bool = True) -> Prepared:
    """Decide the plan, place the network, compute the targets once, build the stepper.

    content: (3, H, W) and styles [((3, h, w), weight)], values in [0, 1], on any device.
    ``trial``: where the step variant is chosen by measurement and no choice is cached, time
    the candidates (engine/variants.py); False where a clock bounds the render (a time budget,
    whose calibration times what runs, or a time limit: engine/multiscale.py ``_may_trial``):
    the compiled step, unless a choice is cached.
    """
    resolve_plan(settings)  # the machine's part, refused (a missing GPU...) before any weights are read
    ours = extractor is None  # loaded here: ours to convert in place
    if ours:
        extractor = extractor_for(settings)
    if settings.runtime == "onnxruntime":
        return _prepare_onnx(content, styles, settings, extractor, init)
    weights_info = getattr(extractor, "weights_info", {}) or {}
    _warn_random(weights_info)
    out_hw, style_hws = _sizes(content, styles, settings, extractor.min_side)
    ranks = for_settings(settings)
    # Every decision about how the steps run, before anything large is allocated (or resized).
    plan = resolve_plan(settings, out_hw, style_hws, getattr(extractor, "can_checkpoint", False),
                        ranks.world if ranks is not None else 1)
    log.debug("%s", plan.memory.describe())
    if plan.checkpoint or plan.tile:
        log.info("%s", plan.memory.describe())
    # Across ranks the workers build the same objective (engine/worker.py); a stop signal
    # waits until every rank has left the targets' collectives.
    with (deferred() if ranks is not None else contextlib.nullcontext()):
        if ranks is not None:
            ranks.send(Prepare(settings, plan, out_hw, tuple(style_hws)))
        objective, targets, content_img, style_imgs = build_objective(
            extractor, content, styles, settings, plan, out_hw, style_hws, ours, ranks)
    x = init_image(init if init is not None else settings.init, content_img, style_imgs, settings.seed)
    if plan.channels_last and settings.optimizer == "adam":
        # (L-BFGS flattens its parameters with .view(-1), so its image stays NCHW; the
        # network converts its input to channels-last inside.)
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_(True)  # (1, 3, H, W) float32, the only thing optimised
    if plan.variant == "auto":  # a GPU, Adam, a CUDA graph: the step that runs is chosen by measurement
        plan, objective, x, stepper, choice = choose_step(objective, x, settings, plan, trial)
    else:
        stepper, choice = make_stepper(objective, x, settings, plan), None
    return Prepared(settings, plan, stepper, objective, x, targets, content_img, out_hw, weights_info, choice)


def choose_step(objective, x0: torch.Tensor, settings: StylizeSettings, plan: StepPlan, trial: bool = True):
    """The step variant for a plan that leaves it to measurement (engine/variants.py): the
    cached choice for this GPU, torch, size bucket, precision and step; else, with ``trial``,
    each candidate built on its own copy of the start image, timed, and the fastest that
    passes the parity check kept (restarted from the start image: what it compiled and
    captured is the render's); else the compiled step. Returns (plan, objective, x, stepper,
    choice)."""
    from . import variants
    from .fused import eligible
    from .kernels import enabled as kernels_enabled
    from .plan import with_variant

    problem = objective.problem
    names = ["graph", "compiled"]
    why_not = eligible(problem) or (None if kernels_enabled() else "Triton is not importable, or NST_TRITON=0")
    if why_not is None:
        names.append("kernels")
    step = {"network": settings.network, "pool": settings.pool, "taps": ",".join(problem.net.taps),
            "layout": plan.memory_format, "extractor": type(problem.net).__name__, "kernels": why_not is None}
    key = variants.choice_key(variants.device_name(x0.device), torch.__version__, tuple(x0.shape[-2:]),
                              plan.precision, step)
    path = variants.cache_path(settings.variant_cache)
    built = {}

    def build(name: str):
        p = with_variant(plan, name)
        obj = make_objective(problem, p, settings)
        x = x0.detach().clone().requires_grad_(True)  # its own image (x0's memory format)
        built[name] = (p, obj, x)
        return make_stepper(obj, x, settings, p)

    choice = variants.cached_choice(key, path)
    if choice is not None and choice.variant in names:
        stepper = build(choice.variant)
    elif not trial:
        choice = variants.Choice("compiled", "no cached choice, and a --time-budget or --time-limit leaves no "
                                 "time for a trial: the compiled step", key=key)
        stepper = build("compiled")
    else:
        rtol = 2e-2 if plan.autocast_dtype is not None else 1e-3
        candidates = [variants.Candidate(n, lambda n=n: build(n)) for n in names]
        spec = problem.spec
        choice, stepper = variants.trial(candidates, variants.default_timer(plan.device), rtol,
                                         weights=(1.0, spec.content_weight, spec.style_weight, spec.tv_weight))
        choice.key = key
        if why_not is not None:
            choice.errors["kernels"] = why_not
        variants.record(choice, path)
        stepper.restart(x0.detach())
    p, obj, x = built[choice.variant]
    log.info("step variant: %s (%s)", choice.variant, "cached" if choice.cached else choice.reason)
    return p, obj, x, stepper, choice


def _prepare_onnx(content, styles, settings: StylizeSettings, graphs, init) -> Prepared:
    """``prepare`` for ``--runtime onnxruntime``: ``graphs`` are the export's step graphs
    (engine/onnx_runtime.py, from loader.extractor_for); the targets by targets.onnx, the
    steps by step.onnx (Adam) or objective.onnx (L-BFGS), on the CPU in float32."""
    from .onnx_runtime import make_onnx_stepper, onnx_targets

    _warn_random(graphs.weights_info)
    out_hw, style_hws = _sizes(content, styles, settings, graphs.min_side)
    plan = resolve_plan(settings, out_hw, style_hws)
    if plan.tile or plan.checkpoint:
        raise InputError(f"{plan.memory.describe()}; --runtime onnxruntime runs whole steps only: use --runtime "
                         "torch for a render this large")
    content_img = resize_to(content.float().cpu(), out_hw).unsqueeze(0)  # (1, 3, H, W)
    style_imgs = [(resize_to(img.float().cpu(), hw).unsqueeze(0), float(w)) for (img, w), hw in zip(styles, style_hws)]
    content_layers, style_layers = settings.layer_weights()
    graphs.check_settings(content_layers, style_layers, settings.content_norm, settings.gram_norm)
    targets = onnx_targets(graphs, content_img, style_imgs, content_layers, style_layers)
    x = init_image(init if init is not None else settings.init, content_img, style_imgs, settings.seed)
    x = x.contiguous().detach().requires_grad_(True)  # (1, 3, H, W) float32, NCHW, the only thing optimised
    stepper = make_onnx_stepper(graphs, targets, settings, x)
    return Prepared(settings, plan, stepper, stepper.objective, x, targets, content_img, out_hw, graphs.weights_info)
