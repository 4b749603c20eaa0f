"""Eager PyTorch baselines, written the way tutorials write them, on torchvision's layers.

- naive: runs the network on the content and style images again at every step (under
  ``no_grad``, the kinder variant), then on the image being optimised;
- eager: the fair loop, with the targets computed once before the loop.

Both are float32, NCHW, with torchvision's in-place ReLUs and ``torch.optim.Adam``'s
default implementation for the device. The losses are the engine's formulas written out
plainly, so every loop optimises the same function.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .reference import MEAN, STD, torchvision_features
from .user_loop import CONTENT, STYLE, TAPS, UserLoop

# Written as tutorials write them: vgg19.features indices of the taps, cut after relu5_1.
TAP_INDEX = {name: i for i, name in TAPS.items()}
CUT = 30


def vgg19_features(state: dict, device) -> torch.nn.Sequential:
    """torchvision's VGG19 (config "E") cut after relu5_1, frozen, in-place ReLUs."""
    return torchvision_features(state, "vgg19", "max", inplace=True, device=device, upto=CUT)


class TutorialLoop:
    def __init__(self, net, content, style, lr, cw, sw, tvw, naive: bool):
        self.net, self.naive = net, naive
        dev = content.device
        self.mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
        self.content, self.style = content, style
        self.cw, self.sw, self.tvw = cw, sw, tvw
        self.x = content.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr)
        if not naive:
            with torch.no_grad():
                self.targets = self._targets()

    def taps(self, img):
        h = (img - self.mean) / self.std
        out = {}
        wanted = {v: k for k, v in TAP_INDEX.items()}
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in wanted:
                out[wanted[i]] = h
        return out

    gram = staticmethod(UserLoop.gram)  # the tutorial's F F^T / (C H W), written once

    def _targets(self):
        fc = self.taps(self.content)
        fs = self.taps(self.style)
        return fc[CONTENT].clone(), {n: self.gram(fs[n]) for n in STYLE}

    def step(self):
        self.opt.zero_grad()
        if self.naive:
            with torch.no_grad():
                target_c, grams = self._targets()
        else:
            target_c, grams = self.targets
        f = self.taps(self.x)
        loss = self.cw * F.mse_loss(f[CONTENT], target_c)
        loss = loss + self.sw * sum(F.mse_loss(self.gram(f[n]), grams[n]) for n in STYLE)
        x = self.x
        tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
        loss = loss + self.tvw * tv
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(0, 1)
        return loss.detach()
