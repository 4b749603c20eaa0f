"""The original loops behind the recipes (engine/recipes.py), re-implemented faithfully.

Each class follows its source's structure, including what it recomputes and what it
wastes, because that is what a user of the original pays for:

- GatysNotebook: leongatys/PytorchNeuralStyleTransfer. Its VGG computes every layer up to
  pool5 whatever it is asked for; L-BFGS runs 20 iterations per ``optimizer.step``. No
  clamping. Used for both Gatys recipes (the paper's loss formulas are swapped in for
  ``gatys``: the paper has no code).
- Udacity: the course notebook. ``get_features`` walks all 37 modules of vgg19.features
  (in-place ReLUs), Adam on the ImageNet-normalised tensor, no clamping.
- PlainAdam: the blog loop. Runs the network on the generated, content and style images
  at every step, with the network's weights left trainable (the backward pass computes
  their gradients too).
- VGG16Blog: a Keras-era VGG16 loop in PyTorch: average pooling, stops at the deepest
  tap, StepLR, clamps.
- PyTorchTutorial: the PyTorch tutorial's model of loss modules (non-in-place ReLUs,
  trimmed after the last loss), L-BFGS 20 iterations per step, clamping in the closure.

Input conventions differ from the originals in one respect: every loop here gets the
engine's [0, 1] images and torchvision's normalisation (Gatys' notebook used Caffe BGR
0-255 inputs and Caffe weights), so that, given ``inplace=False`` for the conv-tap loops,
their first loss can be checked against the engine's (bench/recipes.py). Timing uses
``inplace=True``, as the originals run.

Every ``call()`` is what the original does once per iteration of its outer loop;
``evals_per_call`` says how many loss + gradient evaluations that is at most, and
``evals`` counts the ones that ran (torch's L-BFGS ends a call early when its absolute
tolerances are met, which losses in small units, e.g. with random weights, reach).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .reference import LAYER_NAMES, index_of, normalise, torchvision_features


class GatysNotebook:
    """Gatys' notebook loop; ``paper=True`` swaps in eq. 1 and 4 of the paper."""

    evals_per_call = 20  # torch.optim.LBFGS's default max_iter
    evals = 0

    def __init__(self, state, content, style, start, s, inplace: bool = False, paper: bool = False):
        self.net = torchvision_features(state, "vgg19", "avg", inplace=False, device=content.device)
        self.content_layers = [n for n, _ in s.layer_weights()[0]]
        self.style_layers = [n for n, _ in s.layer_weights()[1]]
        self.paper = paper
        self.loss_layers = self.style_layers + self.content_layers
        self.weights = ([w * s.style_weight for _, w in s.layer_weights()[1]]
                        + [w * s.content_weight for _, w in s.layer_weights()[0]])
        with torch.no_grad():
            self.style_targets = [self.gram(a).detach() for a in self.vgg(style, self.style_layers)]
            self.content_targets = [a.detach() for a in self.vgg(content, self.content_layers)]
        self.targets = self.style_targets + self.content_targets
        self.opt_img = start.clone().requires_grad_(True)
        self.optimizer = torch.optim.LBFGS([self.opt_img])

    def vgg(self, x, out_keys):
        # The notebook's forward computes r11 ... p5, every layer, then picks out_keys.
        out = {}
        h = normalise(x)
        names = LAYER_NAMES["vgg19"]
        for name, layer in zip(names, self.net):
            h = layer(h)
            out[name] = h
        return [out[k] for k in out_keys]

    def gram(self, f):
        b, c, h, w = f.size()
        fm = f.view(b, c, h * w)
        g = torch.bmm(fm, fm.transpose(1, 2))
        return g if self.paper else g.div_(h * w)

    def style_loss(self, f, target):
        if self.paper:  # E_l = 1 / (4 N^2 M^2) sum (G - A)^2
            _, c, h, w = f.size()
            return (self.gram(f) - target).pow(2).sum() / (4 * c**2 * (h * w) ** 2)
        return nn.MSELoss()(self.gram(f), target)  # GramMSELoss

    def content_loss(self, f, target):
        return 0.5 * (f - target).pow(2).sum() if self.paper else nn.MSELoss()(f, target)

    def losses(self, x):
        out = self.vgg(x, self.loss_layers)
        n = len(self.style_layers)
        return [self.weights[a] * (self.style_loss(A, self.targets[a]) if a < n else
                                   self.content_loss(A, self.targets[a])) for a, A in enumerate(out)]

    def first_loss(self) -> float:
        with torch.no_grad():
            return float(sum(self.losses(self.opt_img)))

    def call(self):
        def closure():
            self.evals += 1
            self.optimizer.zero_grad()
            loss = sum(self.losses(self.opt_img))
            loss.backward()
            return loss

        self.optimizer.step(closure)


class _AdamLoop:
    """What the Adam originals share: one evaluation and one update per call, in the order
    they write it (loss, zero_grad, backward, step)."""

    evals_per_call = 1
    evals = 0
    optimizer: torch.optim.Optimizer

    def total_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def first_loss(self) -> float:
        with torch.no_grad():
            return float(self.total_loss())

    def call(self):
        self.evals += 1
        total_loss = self.total_loss()
        self.optimizer.zero_grad()
        total_loss.backward()
        self.optimizer.step()


class Udacity(_AdamLoop):

    def __init__(self, state, content, style, start, s, inplace: bool = True):
        self.vgg = torchvision_features(state, "vgg19", "max", inplace=inplace, device=content.device)
        taps = [n for n, _ in s.layer_weights()[0] + s.layer_weights()[1]]
        self.layers = {str(i): n for i, n in index_of(taps).items()}  # {'21': 'conv4_2', ...}
        self.content_layer = s.layer_weights()[0][0][0]
        self.style_weights = dict(s.layer_weights()[1])
        self.cw, self.sw = s.content_weight, s.style_weight
        content, style = normalise(content), normalise(style)
        with torch.no_grad():
            self.content_features = {k: v.clone() for k, v in self.get_features(content).items()}
            style_features = self.get_features(style)
            self.style_grams = {layer: self.gram_matrix(style_features[layer]) for layer in self.style_weights}
        self.target = normalise(start).clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.target], lr=s.lr)  # 0.003 on the normalised tensor

    def get_features(self, image):
        features = {}
        x = image
        for name, layer in self.vgg._modules.items():  # all 37 modules: no early exit
            x = layer(x)
            if name in self.layers:
                features[self.layers[name]] = x
        return features

    @staticmethod
    def gram_matrix(tensor):
        _, d, h, w = tensor.size()
        tensor = tensor.view(d, h * w)
        return torch.mm(tensor, tensor.t())

    def total_loss(self):
        target_features = self.get_features(self.target)
        c = self.content_layer
        content_loss = torch.mean((target_features[c] - self.content_features[c]) ** 2)
        style_loss = 0
        for layer in self.style_weights:
            target_feature = target_features[layer]
            target_gram = self.gram_matrix(target_feature)
            _, d, h, w = target_feature.shape
            style_gram = self.style_grams[layer]
            layer_style_loss = self.style_weights[layer] * torch.mean((target_gram - style_gram) ** 2)
            style_loss += layer_style_loss / (d * h * w)
        return self.cw * content_loss + self.sw * style_loss



class PlainAdam(_AdamLoop):

    def __init__(self, state, content, style, start, s, inplace: bool = True):
        chosen = [n for n, _ in s.layer_weights()[1]]
        deepest = max(index_of(chosen))
        # vgg19(...).features[:29], weights NOT frozen (the original never freezes them).
        self.model = torchvision_features(state, "vgg19", "max", inplace, content.device, trainable=True)[:deepest + 1]
        self.chosen = {str(i) for i in index_of(chosen)}
        self.original_img, self.style_img = content, style
        self.generated = start.clone().requires_grad_(True)
        self.alpha, self.beta = s.content_weight, s.style_weight
        self.optimizer = torch.optim.Adam([self.generated], lr=s.lr)

    def features(self, x):
        out = []
        x = normalise(x)
        for layer_num, layer in enumerate(self.model):
            x = layer(x)
            if str(layer_num) in self.chosen:
                out.append(x)
        return out

    def total_loss(self):
        generated_features = self.features(self.generated)
        original_img_features = self.features(self.original_img)  # every step, with autograd
        style_features = self.features(self.style_img)  # every step, with autograd
        style_loss = original_loss = 0
        for gen_feature, orig_feature, style_feature in zip(generated_features, original_img_features, style_features):
            _, channel, height, width = gen_feature.shape
            original_loss += torch.mean((gen_feature - orig_feature) ** 2)
            G = gen_feature.view(channel, height * width).mm(gen_feature.view(channel, height * width).t())
            A = style_feature.view(channel, height * width).mm(style_feature.view(channel, height * width).t())
            style_loss += torch.mean((G - A) ** 2)
        return self.alpha * original_loss + self.beta * style_loss



class VGG16Blog(_AdamLoop):

    def __init__(self, state, content, style, start, s, inplace: bool = True):
        self.vgg = torchvision_features(state, "vgg16", "avg", inplace, content.device)
        content_layers, style_layers = s.layer_weights()
        self.idx = index_of([n for n, _ in content_layers + style_layers], "vgg16")
        self.last = max(self.idx)
        self.content_layer = content_layers[0][0]
        self.style_w = dict(style_layers)
        self.alpha, self.beta = s.content_weight, s.style_weight
        with torch.no_grad():
            fc, fs = self.get_features(content), self.get_features(style)
            self.content_target = fc[self.content_layer].clone()
            self.style_targets = {n: self.gram(fs[n]) for n in self.style_w}
        self.x = start.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.x], lr=s.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=s.lr_decay_every, gamma=s.lr_gamma)

    def get_features(self, x):
        feats, h = {}, normalise(x)
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in self.idx:
                feats[self.idx[i]] = h
            if i == self.last:
                break
        return feats

    @staticmethod
    def gram(f):
        _, c, h, w = f.shape
        m = f.view(c, h * w)
        return m @ m.t()

    def total_loss(self):
        f = self.get_features(self.x)
        content = 0.5 * ((f[self.content_layer] - self.content_target) ** 2).sum()
        style = 0
        for n, w in self.style_w.items():
            _, c, h, wd = f[n].shape
            style = style + w * ((self.gram(f[n]) - self.style_targets[n]) ** 2).sum() / (4 * c**2 * (h * wd) ** 2)
        return self.alpha * content + self.beta * style

    def call(self):
        self.evals += 1
        self.optimizer.zero_grad()
        loss = self.total_loss()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.x.clamp_(0, 1)


class _Normalization(nn.Module):
    def forward(self, img):
        return normalise(img)


class _ContentLoss(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target.detach()
        self.loss = torch.zeros(())

    def forward(self, input):
        self.loss = F.mse_loss(input, self.target)
        return input


def _tutorial_gram(input):
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class _StyleLoss(nn.Module):
    def __init__(self, target_feature):
        super().__init__()
        self.target = _tutorial_gram(target_feature).detach()
        self.loss = torch.zeros(())

    def forward(self, input):
        self.loss = F.mse_loss(_tutorial_gram(input), self.target)
        return input


class PyTorchTutorial:
    evals_per_call = 20  # LBFGS's default max_iter; the tutorial counts closure calls as steps
    evals = 0

    def __init__(self, state, content, style, start, s, inplace: bool = False):
        cnn = torchvision_features(state, "vgg19", "max", inplace=False, device=content.device)
        content_layers = [n for n, _ in s.layer_weights()[0]]
        style_layers = [n for n, _ in s.layer_weights()[1]]
        names = LAYER_NAMES["vgg19"]
        model = nn.Sequential(_Normalization())
        self.content_losses, self.style_losses = [], []
        for name, layer in zip(names, cnn):
            model.add_module(name, layer)
            if name in content_layers:
                cl = _ContentLoss(model(content).detach())
                model.add_module(f"content_loss_{name}", cl)
                self.content_losses.append(cl)
            if name in style_layers:
                sl = _StyleLoss(model(style).detach())
                model.add_module(f"style_loss_{name}", sl)
                self.style_losses.append(sl)
        for i in range(len(model) - 1, -1, -1):  # trim off the layers after the last loss
            if isinstance(model[i], (_ContentLoss, _StyleLoss)):
                break
        self.model = model[: i + 1].eval().requires_grad_(False)
        self.input_img = start.clone().requires_grad_(True)
        self.optimizer = torch.optim.LBFGS([self.input_img])
        self.sw, self.cw = s.style_weight, s.content_weight

    def first_loss(self) -> float:
        with torch.no_grad():
            self.model(self.input_img)
            return float(self.sw * sum(sl.loss for sl in self.style_losses)
                         + self.cw * sum(cl.loss for cl in self.content_losses))

    def call(self):
        def closure():
            self.evals += 1
            with torch.no_grad():
                self.input_img.clamp_(0, 1)
            self.optimizer.zero_grad()
            self.model(self.input_img)
            style_score = sum(sl.loss for sl in self.style_losses) * self.sw
            content_score = sum(cl.loss for cl in self.content_losses) * self.cw
            loss = style_score + content_score
            loss.backward()
            return style_score + content_score

        self.optimizer.step(closure)


ORIGINALS = {
    "gatys": lambda *a, **k: GatysNotebook(*a, paper=True, **k),
    "gatys-code": GatysNotebook,
    "udacity": Udacity,
    "plain-adam": PlainAdam,
    "vgg16": VGG16Blog,
    "lbfgs-normalised": PyTorchTutorial,
}
