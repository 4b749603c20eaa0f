"""The optimisation loop: one small step function, a fast path and a reference path.

    step(x):  features(x) -> content + style + TV losses -> d loss / d x -> update -> clamp

The *reference* path is plain float32, NCHW, eager PyTorch with a textbook Adam. The
*fast* path (the default) keeps the same mathematics and adds, where they apply:
- channels-last memory for the network and the image (on CUDA, and on the CPU where it
  measured 8-10% faster at 256-512 px on the development machine);
- bf16 (default on GPUs that support it) or fp16 autocast for the convolutions, with a
  static loss scale for fp16; Grams, losses and the image stay float32;
- on CUDA with Adam, the whole step (forward, backward, fused Adam, clamp) captured once
  in a CUDA graph and replayed: static shapes, buffers allocated once per size.

Host synchronisation happens only every ``progress_every`` steps (reading the loss for
the progress bar, the NaN check and the best-image bookkeeping); each such place is
marked ``# host sync``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .color import original_colors
from .errors import InputError, NSTError
from .imageio import fit_long_edge, resize_to
from .loader import ScriptedExtractor, load_extractor
from .losses import content_loss, style_loss, tv_loss
from .memory import MemoryPlan, plan_memory
from .settings import StylizeSettings
from .targets import Targets, compute_targets

log = logging.getLogger("nst")

_WARNED: set = set()
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN autotune, Adam state)


class NonFiniteLossError(NSTError):
    """The loss became NaN or Inf. ``result`` holds the last good image, if any."""

    def __init__(self, message: str, result: "Result | None"):
        super().__init__(message)
        self.result = result


@dataclass
class Plan:
    """What the loop will actually run, resolved from the settings and the machine."""

    device: str
    precision: str  # "fp32" | "bf16" | "fp16"
    channels_last: bool
    cuda_graph: bool
    path: str  # "fast" | "reference"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def resolve_plan(settings: StylizeSettings) -> Plan:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available to PyTorch")
    prec = settings.precision
    mf = settings.memory_format
    if settings.reference:
        if prec not in ("auto", "fp32"):
            raise InputError(f"--reference runs float32; it cannot be combined with --precision {prec}")
        if mf == "channels_last":
            raise InputError("--reference runs NCHW; it cannot be combined with --memory-format channels_last")
        return Plan(device, "fp32", False, False, "reference")
    # auto: channels-last everywhere. On the 2-core CPU it measured 8% faster at 256 px and
    # 10% at 512 px (bench/results), once the Gram used mm on a channels-last view.
    channels_last = True if mf == "auto" else (mf == "channels_last")
    if device == "cpu":
        if prec in ("bf16", "fp16"):
            raise InputError(f"--precision {prec} needs a CUDA GPU; on the CPU the engine runs float32")
        return Plan("cpu", "fp32", channels_last, False, "fast")
    bf16_ok = torch.cuda.is_bf16_supported()
    if prec == "auto":
        prec = "bf16" if bf16_ok else "fp32"
    if prec == "bf16" and not bf16_ok:
        raise InputError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    graph = settings.cuda_graph and settings.optimizer == "adam"
    return Plan("cuda", prec, channels_last, graph, "fast")


@dataclass
class RunStats:
    """Per-step statistics of one render (lists are per step, in order)."""

    steps_planned: int
    steps_run: int = 0
    loss: list[float] = field(default_factory=list)
    content: list[float] = field(default_factory=list)
    style: list[float] = field(default_factory=list)
    tv: list[float] = field(default_factory=list)
    final_loss: float = float("nan")  # loss of the returned image
    image_from_step: int = 0  # how many steps had been applied to the returned image
    stopped: str | None = None  # None (all steps ran), "time-limit", "interrupted", "non-finite"
    setup_s: float = 0.0  # targets (and everything else before the first step)
    loop_s: float = 0.0  # wall time of the steps, synchronised
    capture_s: float = 0.0  # CUDA graph capture, included in loop_s
    steps_per_s: float = 0.0
    size: tuple[int, int] = (0, 0)
    device: str = ""
    precision: str = ""
    path: str = ""
    memory_format: str = ""
    cuda_graph: bool = False
    checkpointing: bool = False
    memory_estimate_bytes: int = 0
    scales: list = field(default_factory=list)  # multi-scale: per-scale plan and outcome
    total_s: float = 0.0  # multi-scale or budgeted: everything from the budget's start
    optimizer: str = ""
    weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    image: torch.Tensor  # (3, H, W) float32 on the CPU, in [0, 1]
    stats: RunStats


class Objective:
    """Pure function of the image: x (1, 3, H, W) -> (4,) [total, content, style, tv]."""

    def __init__(self, net, targets: Targets, settings: StylizeSettings, plan: Plan):
        taps = list(net.taps)
        self.net = net
        self.content_idx = [taps.index(n) for n, _ in targets.content_layers]
        self.content_w = list(targets.content_scale)  # layer weight x normalisation factor
        self.style_idx = [taps.index(n) for n, _ in targets.style_layers]
        self.style_w = list(targets.style_scale)
        self.targets = targets
        self.cw, self.sw, self.tvw = settings.content_weight, settings.style_weight, settings.tv_weight
        self.dtype = plan.autocast_dtype
        self.device_type = plan.device
        # Autocast's weight-cast cache; GraphAdamStep turns it off before capturing a graph.
        self.cache = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache):
                feats = self.net(x)
        else:
            feats = self.net(x)
        # Losses in float32 (autocast is off inside engine.losses).
        c = sum(w * content_loss(feats[i], t) for i, w, t in zip(self.content_idx, self.content_w, self.targets.content))
        s = sum(w * style_loss(feats[i], g) for i, w, g in zip(self.style_idx, self.style_w, self.targets.grams))
        tv = tv_loss(x)
        c = c if isinstance(c, torch.Tensor) else x.new_zeros(())
        s = s if isinstance(s, torch.Tensor) else x.new_zeros(())
        total = self.cw * c + self.sw * s + self.tvw * tv
        return torch.stack([total, c, s, tv])  # (4,)


class AdamStep:
    """Eager Adam step; the reference uses the textbook single-tensor Adam."""

    def __init__(self, objective: Objective, x: torch.Tensor, lr: float, plan: Plan, loss_scale: float | None,
                 scheduled: bool = False):
        self.objective, self.x = objective, x
        if plan.path == "reference":
            kw = {"foreach": False}
        elif plan.device == "cuda":
            kw = {"fused": True, "capturable": plan.cuda_graph}
        else:
            kw = {"foreach": True}
        if plan.cuda_graph and scheduled:
            # A captured graph reads the learning rate from device memory: a tensor that
            # set_lr refills between replays (fused, capturable Adam accepts one).
            lr = torch.tensor(lr, dtype=torch.float32, device=x.device)
        self.opt = torch.optim.Adam([x], lr=lr, **kw)
        self.scale = loss_scale

    def set_lr(self, lr: float) -> None:
        group = self.opt.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a device-side fill: no host sync
        else:
            group["lr"] = lr

    def _body(self) -> torch.Tensor:
        parts = self.objective(self.x)
        loss = parts[0] * self.scale if self.scale else parts[0]
        loss.backward()
        if self.scale:
            self.x.grad.mul_(1.0 / self.scale)  # unscale before the update
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)
        return parts.detach()

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        return self._body()


class GraphAdamStep(AdamStep):
    """The Adam step captured in a CUDA graph after a few eager warm-up steps.

    Every call is one real optimisation step: the first GRAPH_WARMUP_STEPS run eagerly on
    a side stream, the next one captures and then replays, later ones only replay.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_parts: torch.Tensor | None = None
        self.side = torch.cuda.Stream()
        self.capture_s = 0.0

    def step(self) -> torch.Tensor:
        if self.calls < GRAPH_WARMUP_STEPS:
            self.calls += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.opt.zero_grad(set_to_none=True)
                parts = self._body()
            torch.cuda.current_stream().wait_stream(self.side)
            return parts
        if self.graph is None:
            t0 = time.perf_counter()
            self.objective.cache = False
            self.opt.zero_grad(set_to_none=True)  # grads get allocated from the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_parts = self._body()
            self.capture_s = time.perf_counter() - t0
        self.calls += 1
        self.graph.replay()
        return self.static_parts


class LBFGSStep:
    """One L-BFGS iteration per call; its history carries over between calls.

    Not part of the fast path's no-sync promise: L-BFGS reads the loss on the host.

    It minimises loss / loss_0, loss_0 being the first evaluation's loss (a constant): the
    minimiser and the updates are those of the loss itself, but torch's absolute thresholds
    (stop when max |grad| <= 1e-7; skip the curvature update when y.s <= 1e-10) no longer
    depend on the loss's units. Losses in small units (the sum-normalised recipes, random
    or non-Caffe-scaled networks) had stalled L-BFGS for good on its first step otherwise.
    """

    def __init__(self, objective: Objective, x: torch.Tensor, lr: float, history: int):
        self.objective, self.x = objective, x
        self.opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=history)
        self.inv_scale: float | None = None

    def set_lr(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr

    def step(self) -> torch.Tensor:
        first: list[torch.Tensor] = []

        def closure():
            self.opt.zero_grad(set_to_none=True)
            parts = self.objective(self.x)
            if self.inv_scale is None:
                l0 = abs(float(parts[0].detach()))  # host sync: once, at the first evaluation
                self.inv_scale = 1.0 / l0 if math.isfinite(l0) and l0 > 0 else 1.0
            loss = parts[0] * self.inv_scale
            loss.backward()
            if not first:
                first.append(parts.detach())
            return loss

        self.opt.step(closure)
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)
        return first[0]


def _fast_network(extractor, plan: Plan):
    """The network in the fast path's memory format, leaving the caller's module alone.

    The eager extractor is copied and converted; a loaded TorchScript extractor has its
    weights converted in place (ScriptModules do not deep-copy reliably). Any other module
    is used as it is: a channels-last input still gives channels-last convolutions.
    """
    if not plan.channels_last:
        return extractor
    if isinstance(extractor, ScriptedExtractor):
        for p in extractor.scripted.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return extractor
    if hasattr(extractor, "to_format"):
        return copy.deepcopy(extractor).to_format(channels_last=True)
    return extractor


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
    raise InputError(f"unknown --init {init!r}: use content, noise, style, or an image file")


@dataclass
class Prepared:
    """Everything a loop needs, built once per size: targets, start image, step runner."""

    settings: StylizeSettings
    plan: Plan
    runner: object  # AdamStep | GraphAdamStep | LBFGSStep: .step() -> (4,) losses
    objective: Objective
    x: torch.Tensor  # (1, 3, H, W) float32, the optimised image
    targets: Targets
    content_img: torch.Tensor  # (1, 3, H, W) on the device
    out_hw: tuple[int, int]
    weights_info: dict
    memory: "MemoryPlan"


def prepare(
    content: torch.Tensor,
    styles: list[tuple[torch.Tensor, float]],
    settings: StylizeSettings,
    extractor=None,
    init: str | torch.Tensor | None = None,
) -> Prepared:
    """Resolve the plan, load the network, compute the targets once, build the step."""
    settings.validate()
    plan = resolve_plan(settings)
    content_layers, style_layers = settings.layer_weights()
    taps = settings.taps()
    if extractor is None:
        extractor = load_extractor(settings.extractor, settings.weights, taps, settings.pool, settings.network)
    weights_info = getattr(extractor, "weights_info", {}) or {}
    if weights_info.get("random") and weights_info.get("source") not in _WARNED:
        _WARNED.add(weights_info.get("source"))  # once per process, not once per scale
        log.warning("using %s: %s", weights_info.get("source"), weights_info.get("note"))

    out_hw = settings.output_hw(tuple(content.shape[-2:]))
    min_side = extractor.min_side
    if min(out_hw) < min_side:
        raise InputError(
            f"output size {out_hw[0]}x{out_hw[1]} is too small for the network: each side needs at least "
            f"{min_side} px (raise --size or --resize)"
        )
    device = torch.device(plan.device)
    extractor = extractor.to(device)
    content_img = resize_to(content.float(), out_hw).unsqueeze(0).to(device)  # (1, 3, H, W)
    style_long = max(1, round(settings.style_scale * max(out_hw)))
    style_imgs = []
    for img, w in styles:
        hw = fit_long_edge(tuple(img.shape[-2:]), style_long)
        if min(hw) < min_side:
            raise InputError(
                f"a style image scaled to {hw[0]}x{hw[1]} is too small for the network (at least {min_side} px per "
                "side): raise --style-scale or --size"
            )
        style_imgs.append((resize_to(img.float(), hw).unsqueeze(0).to(device), float(w)))

    # The memory plan, before anything large is allocated: plain, checkpointed, or refused.
    can_ckpt = hasattr(extractor, "checkpoint") and not isinstance(extractor, ScriptedExtractor)
    if settings.checkpointing == "on" and not can_ckpt:
        raise InputError("--checkpointing on needs the eager extractor; a TorchScript extractor cannot recompute blocks")
    mem = plan_memory(*out_hw, taps, settings.network, 2 if plan.precision in ("bf16", "fp16") else 4, settings.pool,
                      plan.device, settings.checkpointing, settings.memory_limit, can_ckpt)
    log.debug("%s", mem.describe())

    # Targets: once, float32, NCHW, whatever the loop runs in.
    targets = compute_targets(extractor, content_img, style_imgs, content_layers, style_layers, settings.gram_norm,
                              settings.content_norm)

    x = init_image(init if init is not None else settings.init, content_img, style_imgs, settings.seed)
    net = _fast_network(extractor, plan)
    if mem.checkpoint:
        if net is extractor:
            net = copy.deepcopy(extractor)  # leave the caller's module as it was
        net.checkpoint = True
        log.info("%s", mem.describe())
    if plan.channels_last and settings.optimizer == "adam":
        # (L-BFGS flattens its parameters with .view(-1), so its image stays NCHW; the
        # network converts its input to channels-last inside.)
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_(True)  # (1, 3, H, W) float32, the only thing optimised

    lr = settings.learning_rate
    scale = settings.loss_scale if plan.precision == "fp16" else None
    objective = Objective(net, targets, settings, plan)
    if settings.optimizer == "lbfgs":
        runner = LBFGSStep(objective, x, lr, settings.lbfgs_history)
    else:
        scheduled = settings.lr_schedule != "constant"
        runner = (GraphAdamStep if plan.cuda_graph else AdamStep)(objective, x, lr, plan, scale, scheduled)
    return Prepared(settings, plan, runner, objective, x, targets, content_img, out_hw, weights_info, mem)


def run(
    content: torch.Tensor,
    styles: list[tuple[torch.Tensor, float]],
    settings: StylizeSettings | None = None,
    extractor=None,
    init: str | torch.Tensor | None = None,
    progress: bool = False,
    on_image: Callable[[int, torch.Tensor], None] | None = None,
    save_every: int = 0,
) -> Result:
    """Stylise ``content`` (3, H, W) with ``styles`` [((3, h, w), weight)], values in [0, 1].

    ``extractor`` defaults to the one ``settings`` describe (``--extractor`` export dir or
    ``--weights``). ``on_image(step, image)`` is called every ``save_every`` steps.
    """
    settings = settings or StylizeSettings()
    t_setup = time.perf_counter()
    p = prepare(content, styles, settings, extractor, init)
    plan, runner, objective, x, content_img, out_hw = p.plan, p.runner, p.objective, p.x, p.content_img, p.out_hw
    weights_info = p.weights_info
    device = x.device

    stats = RunStats(
        steps_planned=settings.steps, size=out_hw, device=plan.device, precision=plan.precision, path=plan.path,
        memory_format="channels_last" if plan.channels_last else "contiguous", cuda_graph=plan.cuda_graph,
        optimizer=settings.optimizer, weights=str(weights_info.get("source", "")),
        checkpointing=p.memory.checkpoint,
        memory_estimate_bytes=p.memory.checkpointed_bytes if p.memory.checkpoint else p.memory.estimate_bytes,
    )
    hist = torch.full((settings.steps, 4), float("nan"), device=device)  # per-step [total, c, s, tv]
    snap = torch.empty_like(x, memory_format=torch.preserve_format).detach()
    best = torch.empty_like(snap)
    best_loss, best_step = math.inf, -1
    every = settings.progress_every
    scheduled = settings.lr_schedule != "constant"
    sync(device)
    stats.setup_s = time.perf_counter() - t_setup

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, unit="step", dynamic_ncols=True, leave=True, disable=None)
        if bar.disable:  # not a terminal: log a line per progress interval instead
            bar = None
    t0 = time.perf_counter()
    done = 0
    nonfinite_at: int | None = None
    try:
        for i in range(settings.steps):
            if settings.time_limit is not None and i > 0 and time.perf_counter() - t_setup > settings.time_limit:
                stats.stopped = "time-limit"
                break
            checkpoint = i % every == 0 or i == settings.steps - 1
            save_now = on_image is not None and save_every > 0 and (i + 1) % save_every == 0
            if checkpoint:
                snap.copy_(x.detach())  # the image this step evaluates
            if scheduled:
                runner.set_lr(settings.lr_at(i))
            parts = runner.step()
            hist[i].copy_(parts)
            done = i + 1
            if bar is not None:
                bar.update(1)
            if checkpoint:
                now = hist[i].tolist()  # host sync: progress interval only
                if not all(math.isfinite(v) for v in now):
                    nonfinite_at = _first_nonfinite(hist[: i + 1])
                    stats.stopped = "non-finite"
                    break
                if now[0] < best_loss:
                    best_loss, best_step = now[0], i
                    best.copy_(snap)
                rate = done / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.set_postfix_str(f"loss {now[0]:.4g} (c {now[1]:.3g} s {now[2]:.3g} tv {now[3]:.3g}) "
                                        f"{rate:.2f} step/s", refresh=False)
                elif progress:
                    log.info("step %d/%d loss %.4g (content %.3g style %.3g tv %.3g) %.2f step/s", done,
                             settings.steps, now[0], now[1], now[2], now[3], rate)
            if save_now:
                on_image(done, x.detach().float().clamp(0, 1)[0].cpu())  # host sync: only when saving
    except KeyboardInterrupt:
        stats.stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    sync(device)
    stats.loop_s = time.perf_counter() - t0
    stats.capture_s = getattr(runner, "capture_s", 0.0)
    stats.steps_run = done
    stats.steps_per_s = done / stats.loop_s if stats.loop_s > 0 else 0.0
    h = hist[:done].cpu()
    stats.loss, stats.content, stats.style, stats.tv = (h[:, k].tolist() for k in range(4))

    # The returned image is the best evaluated one: the final image (evaluated once more
    # here, without a step) or the best checkpoint.
    if stats.stopped != "non-finite":
        with torch.no_grad():
            final = objective(x.detach()).tolist()
        if math.isfinite(final[0]) and final[0] <= best_loss:
            best_loss, best_step = final[0], done
            best.copy_(x.detach())
    stats.final_loss = best_loss
    stats.image_from_step = best_step
    image = None
    if best_step >= 0:
        image = best.detach().float().clamp(0, 1)
        if settings.original_colors:
            image = original_colors(image, content_img)
        image = image[0].contiguous().cpu()
    result = Result(image, stats) if image is not None else None
    if stats.stopped == "non-finite":
        raise NonFiniteLossError(_nonfinite_message(nonfinite_at, settings, plan, best_step), result)
    return result


def sync(device: torch.device | str) -> None:
    """Wait for the device (a no-op on the CPU): before reading a host clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _first_nonfinite(h: torch.Tensor) -> int:
    bad = (~torch.isfinite(h)).any(dim=1).nonzero()
    return int(bad[0, 0]) + 1 if len(bad) else h.shape[0]


def _nonfinite_message(step: int | None, settings: StylizeSettings, plan: Plan, good_step: int) -> str:
    advice = [f"a lower --lr (now {settings.learning_rate:g})"]
    if plan.precision == "fp16":
        advice.insert(0, "--precision bf16 or fp32, or a smaller --loss-scale")
    elif plan.precision == "bf16":
        advice.insert(0, "--precision fp32")
    kept = f"the last good image is from step {good_step}" if good_step >= 0 else "no good image was reached"
    return f"the loss became NaN or Inf at step {step} of {settings.steps}; {kept}; try {' or '.join(advice)}"
