"""The strongest loop a user could write without us (issue #14): textbook Gatys in PyTorch,
made fast with the tools PyTorch ships.

- torchvision's VGG19 cut after relu5_1, frozen, channels-last;
- bf16 autocast on GPUs (float32 on the CPU, where autocast's bf16 is slower);
- the loss (features, Grams, MSEs, TV) under ``torch.compile``, default mode or
  ``mode="reduce-overhead"`` (CUDA graphs);
- fused Adam on GPUs (foreach on the CPU), then a clamp to [0, 1];
- ``torch.backends.cudnn.benchmark = True`` (cuDNN times its algorithms once per shape);
- or, ``whole=True``, the whole step (loss, backward, Adam, clamp) under one
  ``torch.compile`` call, as a skilled user would write it last. Dynamo breaks the graph
  at ``.backward()`` (without its experimental compiled autograd), so this compiles the
  loss with its AOTAutograd backward and, apart, the Adam step and the clamp: what that
  call gives a user.

Under autocast a user's Grams run in bf16 like everything they do not single out: faster
than the engine's float32-accumulated ones and less accurate. That is the baseline's
advantage, not a handicap.

Standalone on purpose: it imports torch, torchvision and PIL and nothing of ``nst``, so
that run as a script (``python user_loop.py --help``) its time to image counts nothing of
the engine. ``nst bench`` imports ``UserLoop`` for its per-step rows and runs this file as
a script for the time-to-image rows.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn import functional as F
from torchvision.models.vgg import cfgs, make_layers

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TAPS = {1: "relu1_1", 6: "relu2_1", 11: "relu3_1", 20: "relu4_1", 22: "relu4_2", 29: "relu5_1"}  # vgg19.features
STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT = "relu4_2"


def vgg19_cut(state: dict, device) -> torch.nn.Sequential:
    """torchvision's VGG19 layers [:30] with ``state`` ("N.weight" names), frozen, channels-last."""
    net = make_layers(cfgs["E"])[:30]
    net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()})
    return net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


class UserLoop:
    def __init__(self, net, content, style, lr=0.02, cw=1.0, sw=1e6, tvw=1.0, mode="default", whole=False):
        dev = content.device
        torch.backends.cudnn.benchmark = True  # the first line of any fast PyTorch script on a GPU
        self.net, self.cw, self.sw, self.tvw = net, cw, sw, tvw
        self.amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
        self.mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
        with torch.no_grad():
            fc, fs = self.taps(content), self.taps(style)
            self.target = fc[CONTENT].float()
            self.grams = {n: self.gram(fs[n]).float() for n in STYLE}
        self.x = content.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr, **({"fused": True} if dev.type == "cuda" else {"foreach": True}))
        mode = None if mode == "default" else mode
        self.loss_fn = self.loss if whole else torch.compile(self.loss, mode=mode)
        self.step = torch.compile(self._step, mode=mode) if whole else self._step

    def taps(self, img):
        out, h = {}, (img - self.mean) / self.std
        with torch.autocast(**self.amp):
            for i, layer in enumerate(self.net):
                h = layer(h)
                if i in TAPS:
                    out[TAPS[i]] = h
        return out

    @staticmethod
    def gram(f):
        _, c, h, w = f.shape
        m = f.reshape(c, h * w)
        return m @ m.t() / (c * h * w)

    def loss(self, x):
        f = self.taps(x)
        with torch.autocast(**self.amp):
            loss = self.cw * F.mse_loss(f[CONTENT], self.target)
            loss = loss + self.sw * sum(F.mse_loss(self.gram(f[n]), self.grams[n]) for n in STYLE)
        tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
        return loss + self.tvw * tv

    def _step(self):
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.x).backward()
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(0, 1)


def _load(path: str, size: int, device) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    img = Image.open(path).convert("RGB")
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    return (pil_to_tensor(img).float() / 255).unsqueeze(0).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a user's compiled Gatys loop (the baseline of nst bench)")
    p.add_argument("content")
    p.add_argument("style")
    p.add_argument("out")
    p.add_argument("--weights", required=True, help="a .pth state dict of vgg19.features")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", default="default", choices=("default", "reduce-overhead"))
    p.add_argument("--whole", action="store_true", help="compile the whole step, not only the loss")
    a = p.parse_args(argv)
    from torchvision.utils import save_image

    dev = torch.device(a.device)
    net = vgg19_cut(torch.load(a.weights, map_location="cpu"), dev)
    loop = UserLoop(net, _load(a.content, a.size, dev), _load(a.style, a.size, dev), mode=a.mode, whole=a.whole)
    for _ in range(a.steps):
        loop.step()
    save_image(loop.x.detach(), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
