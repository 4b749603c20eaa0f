"""A worker rank of a distributed render (engine/ranks.py): ``serve`` follows the lead's
messages until it says stop. It holds the network and the current scale's targets and
computes its share of the tiles; the loop, the clock and the output are the lead's."""

from __future__ import annotations

import torch

from .device import float32_math
from .loader import extractor_for
from .ranks import Evaluate, Prepare, Stop, current
from .session import build_objective
from .settings import StylizeSettings


def serve(content: torch.Tensor, styles: list[tuple[torch.Tensor, float]], settings: StylizeSettings,
          extractor=None) -> int:
    """Follow the lead (rank 0) until it sends Stop; the same inputs and settings as the
    lead's (torchrun gives every rank the same command line). Returns the number of
    evaluations this rank took part in."""
    ranks = current()
    if extractor is None:
        extractor = extractor_for(settings)
    objective, evaluations = None, 0
    while True:
        msg = ranks.receive()
        if isinstance(msg, Stop):
            return evaluations
        if isinstance(msg, Prepare):
            objective = None  # the last scale's activations and targets go first
            objective = build_objective(extractor, content, styles, msg.settings, msg.plan, msg.out_hw,
                                        msg.style_hws, ranks=ranks)[0]
        elif isinstance(msg, Evaluate):
            x = ranks.share_image(None, msg.hw, torch.device(objective.problem.device_type))  # (1, 3, H, W)
            with float32_math(objective.math):
                objective.evaluate(x, msg.with_grad)
            evaluations += 1
