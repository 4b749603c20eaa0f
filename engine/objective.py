"""The objective: a pure function of the image, x (1, 3, H, W) -> (4,) [total, content, style, tv].

The network runs under autocast when the plan asks for bf16/fp16; the Grams and losses
are float32 whatever the convolutions ran in (engine/losses.py).

With ``--compile`` the whole function goes through torch.compile (static shapes): the
elementwise work around the convolutions (activations' backward, the losses, the
normalisation, casts) is fused by inductor, the convolutions and the Gram operator stay
library calls. The steppers call it exactly like the eager one, so the CUDA graph stepper
captures the compiled kernels (``mode="reduce-overhead"`` would not nest inside that
capture, so the mode is the default).
"""

from __future__ import annotations

import contextlib

import torch

from .losses import content_loss, style_loss, tv_loss
from .plan import Plan
from .settings import StylizeSettings
from .targets import Targets


class Objective:
    def __init__(self, net, targets: Targets, settings: StylizeSettings, plan: Plan):
        taps = list(net.taps)
        self.net = net
        self.content_idx = [taps.index(n) for n, _ in targets.content_layers]
        self.content_w = list(targets.content_factors)  # layer weight x normalisation factor
        self.style_idx = [taps.index(n) for n, _ in targets.style_layers]
        self.style_w = list(targets.style_factors)
        self.targets = targets
        self.cw, self.sw, self.tvw = settings.content_weight, settings.style_weight, settings.tv_weight
        self.dtype = plan.autocast_dtype
        self.device_type = plan.device
        self.math = plan.float32_math  # the steppers run every step under it (engine/device.py)
        # Autocast's weight-cast cache; the graph stepper turns it off before capturing.
        # Compiled, the casts live in the compiled graph: off from the start, so that the
        # capture does not change a guarded attribute (which would recompile mid-capture).
        self.cache = not plan.compile
        self.compiled = plan.compile
        self._run = _compiled(self._evaluate) if plan.compile else self._evaluate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float32 -> (4,) float32 [total, content, style, tv]."""
        return self._run(x)

    def _range(self, name: str):
        """A named profiler range (bench/profile.py attributes kernels by them); host-side
        only, a few microseconds per step; not inside compiled code, which has its own."""
        return contextlib.nullcontext() if self.compiled else torch.autograd.profiler.record_function(name)

    def features(self, x: torch.Tensor):
        """The network's taps of ``x`` (or of a crop of it: engine/tiles.py), under autocast
        where the plan asks for half precision."""
        if self.dtype is not None:
            with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache):
                return self.net(x)
        return self.net(x)

    def _evaluate(self, x: torch.Tensor) -> torch.Tensor:
        with self._range("nst::network"):
            feats = self.features(x)
        with self._range("nst::losses"):
            return self._losses(x, feats)

    def _losses(self, x: torch.Tensor, feats) -> torch.Tensor:
        # Losses in float32 (autocast is off inside engine.losses).
        c = sum(w * content_loss(feats[i], t) for i, w, t in zip(self.content_idx, self.content_w, self.targets.content))
        s = sum(w * style_loss(feats[i], g) for i, w, g in zip(self.style_idx, self.style_w, self.targets.grams))
        tv = tv_loss(x)
        c = c if isinstance(c, torch.Tensor) else x.new_zeros(())
        s = s if isinstance(s, torch.Tensor) else x.new_zeros(())
        total = self.cw * c + self.sw * s + self.tvw * tv
        return torch.stack([total, c, s, tv])  # (4,)


def _compiled(fn):
    """``fn`` under torch.compile with static shapes. Each size compiles once (a multi-scale
    render compiles once per scale), so the recompile limit is raised above dynamo's
    default of 8. Compiled code is cached on disk by inductor (its FX graph and autograd
    caches, on by default), so a second run at a size skips most of the compile."""
    import torch._dynamo  # imported here: dynamo is slow to import and only --compile needs it

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(fn, dynamic=False)
