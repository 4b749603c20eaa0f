"""torchvision's VGG as a user builds it, for the baselines and the re-implemented original
loops. They run on this, not on the engine's layer table: a baseline that shared our table
would share our bugs. tests/test_bench.py cross-checks these literals against the table.
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's ImageNet normalisation, as every tutorial writes it out.
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def _names(convs_per_block):
    names = []
    for block, n in enumerate(convs_per_block, 1):
        for i in range(1, n + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


# The names the style-transfer notebooks give vgg.features' modules, in order.
LAYER_NAMES = {"vgg19": _names((2, 2, 4, 4, 4)), "vgg16": _names((2, 2, 3, 3, 3))}


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def index_of(names, network: str = "vgg19") -> dict[int, str]:
    """{position in vgg.features: name} for the layer names given."""
    return {LAYER_NAMES[network].index(n): n for n in names}


def torchvision_features(state: dict, network: str = "vgg19", pool: str = "max", inplace: bool = True,
                         device="cpu", trainable: bool = False, upto: int | None = None) -> nn.Sequential:
    """torchvision's own layer builder (configs "E"/"D") loaded with ``state`` (``features``
    names), average pooling swapped in the way blog code does it, cut to ``[:upto]``."""
    from torchvision.models.vgg import cfgs, make_layers

    net = make_layers(cfgs["E" if network == "vgg19" else "D"], batch_norm=False)
    for i, m in enumerate(net):
        if isinstance(m, nn.ReLU):
            net[i] = nn.ReLU(inplace=inplace)
        elif isinstance(m, nn.MaxPool2d) and pool == "avg":
            net[i] = nn.AvgPool2d(kernel_size=2, stride=2)
    if upto is not None:
        net = net[:upto]
    keep = {f"{i}.weight" for i in range(len(net))} | {f"{i}.bias" for i in range(len(net))}
    net.load_state_dict({k: v for k, v in state.items() if k in keep})
    net.eval().requires_grad_(trainable)
    return net.to(device)
