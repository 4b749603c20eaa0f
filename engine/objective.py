"""The objective: a pure function of the image, x (1, 3, H, W) -> (4,) [total, content, style, tv].

The network runs under autocast when the plan asks for bf16/fp16; the Grams and losses
are float32 whatever the convolutions ran in (engine/losses.py).
"""

from __future__ import annotations

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
