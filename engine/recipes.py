"""Named recipes: classic configurations from papers, courses and blog posts as settings.

A recipe is only a set of StylizeSettings values; every one of them is also an ordinary
flag (``nst recipes NAME`` prints the equivalent command line), and flags given next to
``--recipe`` override the recipe's values. docs/recipes.md explains each recipe, where
the engine departs from the original code, and how much faster it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import InputError
from .settings import StylizeSettings

# Gatys' PyTorch notebook weighs style layer l by 1e3 / n_l^2 (n_l: its channels).
_GATYS_CODE_STYLE = ",".join(f"relu{b}_1:{1e3 / n ** 2!r}" for b, n in zip(range(1, 6), (64, 128, 256, 512, 512)))


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    source: str  # where the configuration comes from
    values: dict = field(default_factory=dict)  # StylizeSettings field -> value
    notes: str = ""  # where the engine departs from the original, in one paragraph


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "gatys", "Gatys et al. 2015/2016, as in the papers",
        "Gatys, Ecker, Bethge: A Neural Algorithm of Artistic Style (2015); Image Style Transfer Using "
        "Convolutional Neural Networks (CVPR 2016), eq. 1-7",
        {"content_layers": "relu4_2",
         "style_layers": "relu1_1:0.2,relu2_1:0.2,relu3_1:0.2,relu4_1:0.2,relu5_1:0.2",
         "gram_norm": "4n2m2", "content_norm": "half-sum", "content_weight": 1.0, "style_weight": 1e3,
         "tv_weight": 0.0, "optimizer": "lbfgs", "lr": 1.0, "pool": "avg", "init": "noise", "size": 512,
         "steps": 500},
        "alpha/beta = 1e-3 and w_l = 1/5 (the paper's Fig. 2 settings); white-noise start (use --init content "
        "for the 2016 paper's content start). The paper ran Caffe with BGR, mean-subtracted 0-255 inputs; "
        "the engine normalises [0, 1] pixels the torchvision way and clamps them after each step.",
    ),
    Recipe(
        "gatys-code", "Gatys' own PyTorch notebook (1e3/n^2 layer weights)",
        "github.com/leongatys/PytorchNeuralStyleTransfer, NeuralStyleTransfer.ipynb",
        {"content_layers": "relu4_2", "style_layers": _GATYS_CODE_STYLE, "gram_norm": "hw",
         "content_norm": "mean", "content_weight": 1.0, "style_weight": 1.0, "tv_weight": 0.0,
         "optimizer": "lbfgs", "lr": 1.0, "pool": "avg", "init": "content", "size": 512, "steps": 500},
        "GramMatrix divides by H*W and GramMSELoss is a mean, hence --gram-norm hw; the notebook's 512 is "
        "the short edge (transforms.Scale), --size is the long edge; it runs L-BFGS 20 iterations per "
        "optimizer.step call, the engine one (the same updates).",
    ),
    Recipe(
        "udacity", "Course exercise (Udacity deep learning nanodegree style transfer notebook)",
        "udacity/deep-learning-v2-pytorch, style-transfer/Style_Transfer_Solution.ipynb",
        {"content_layers": "conv4_2",
         "style_layers": "conv1_1:1,conv2_1:0.75,conv3_1:0.2,conv4_1:0.2,conv5_1:0.2",
         "gram_norm": "raw-chw", "content_norm": "mean", "content_weight": 1.0, "style_weight": 1e6,
         "tv_weight": 0.0, "optimizer": "adam", "lr": 0.003, "lr_units": "imagenet", "pool": "max",
         "init": "content", "size": 400, "steps": 2000},
        "The notebook's Gram is F F^T and each layer's mean squared error is divided by d*h*w (--gram-norm "
        "raw-chw); it optimises the ImageNet-normalised tensor with lr 0.003 (--lr-units imagenet) and never "
        "clamps. Its 'conv' features come from torchvision's in-place ReLU, which overwrites them with the "
        "ReLU output after they are stored: to match its numbers use relu4_2 and relu1_1..relu5_1. Its "
        "max_size 400 is applied with transforms.Resize(int), which sets the short edge.",
    ),
    Recipe(
        "plain-adam", "A plain Adam loop from blog posts (same taps for content and style)",
        "the common 'neural style transfer in PyTorch' blog loop: one list of taps, alpha/beta, Adam",
        {"content_layers": "conv1_1,conv2_1,conv3_1,conv4_1,conv5_1",
         "style_layers": "conv1_1,conv2_1,conv3_1,conv4_1,conv5_1", "gram_norm": "raw", "content_norm": "mean",
         "content_weight": 1.0, "style_weight": 1e3, "tv_weight": 0.0, "optimizer": "adam", "lr": 0.03,
         "pool": "max", "init": "content", "resize": "911x512", "steps": 1000},
        "Gram F F^T without normalisation, mean squared errors, total = alpha * content + beta * style. The "
        "original loop runs the network on the content and style images again at every step and leaves the "
        "network's weights trainable, so every backward pass also computes weight gradients; the engine "
        "computes the targets once and freezes the network.",
    ),
    Recipe(
        "vgg16", "VGG16 variant (Keras-era blog implementations)",
        "VGG16 implementations of Gatys et al.: block4_conv3 content, block1_conv2..block4_conv3 style",
        {"network": "vgg16", "content_layers": "relu4_3",
         "style_layers": "relu1_2:0.25,relu2_2:0.25,relu3_3:0.25,relu4_3:0.25", "gram_norm": "4n2m2",
         "content_norm": "half-sum", "content_weight": 1.0, "style_weight": 1e3, "tv_weight": 0.0,
         "pool": "avg", "optimizer": "adam", "lr": 0.02, "lr_schedule": "step", "lr_decay_every": 100,
         "lr_gamma": 0.7, "init": "content", "size": 512, "steps": 500},
        "Keras' blockN_convM layers include their ReLU, hence relu names; layer weights 1/L with L = 4. "
        "--init noise, content or style all apply. The step schedule multiplies the rate by 0.7 every 100 "
        "steps (torch.optim.lr_scheduler.StepLR's rule).",
    ),
    Recipe(
        "lbfgs-normalised", "L-BFGS with normalised losses (the PyTorch tutorial's loop)",
        "pytorch.org/tutorials/advanced/neural_style_tutorial.html",
        {"content_layers": "conv2_2", "style_layers": "conv1_1,conv1_2,conv2_1,conv2_2,conv3_1",
         "gram_norm": "chw", "content_norm": "mean", "content_weight": 1.0, "style_weight": 1e6,
         "tv_weight": 0.0, "optimizer": "lbfgs", "lr": 1.0, "pool": "max", "init": "content",
         "resize": "512x512", "steps": 500},
        "The tutorial's conv_4 is conv2_2 and conv_1..conv_5 are conv1_1..conv3_1 (it counts convolutions); "
        "it replaces the in-place ReLUs, so these are true convolution outputs, as in the engine. Gram / "
        "(a*b*c*d) and MSE: --gram-norm chw, the engine's default. It clamps inside the closure, before each "
        "evaluation; the engine clamps after each update, which is the same sequence.",
    ),
)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (nst recipes lists them)")
    return RECIPES[name]


def values(name: str, given=()) -> dict:
    """The recipe's field values, given that the user set the fields ``given`` themselves:
    an explicit size (without a resize) replaces the recipe's exact --resize."""
    out = dict(get(name).values)
    if "size" in given and "resize" not in given:
        out.pop("resize", None)
    return out


def settings(name: str, base: StylizeSettings | None = None, **overrides) -> StylizeSettings:
    """The recipe's settings on top of ``base`` (default settings), then ``overrides``
    (in one step: settings are checked when made, and only the result must make sense)."""
    return dataclasses.replace(base or StylizeSettings(), **{**values(name, overrides), **overrides})


def flags(name: str) -> list[str]:
    """The recipe as ordinary ``nst stylize`` flags."""
    out = []
    for key, value in get(name).values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return out
