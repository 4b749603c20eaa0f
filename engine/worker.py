"""A worker rank of a distributed render (engine/ranks.py): ``serve`` follows the lead's
commands until it says stop. It holds the network and the current scale's targets and
computes its share of the tiles; the loop, the clock and the output are the lead's."""

from __future__ import annotations

import torch

from .device import float32_math
from .loader import extractor_for
from .ranks import EVAL, PREPARE, STOP, current
from .session import build_objective
from .settings import StylizeSettings


def serve(content: torch.Tensor, styles: list[tuple[torch.Tensor, float]], settings: StylizeSettings,
          extractor=None) -> int:
    """Follow the lead (rank 0) until it sends STOP; the same inputs and settings as the
    lead's (torchrun gives every rank the same command line). Returns the number of
    evaluations this rank took part in."""
    ranks = current()
    if extractor is None:
        extractor = extractor_for(settings)
    objective, evaluations = None, 0
    while True:
        cmd, with_grad, h, w = ranks.command(STOP)
        if cmd == STOP:
            return evaluations
        if cmd == PREPARE:
            s_k, plan, out_hw, style_hws, mem = ranks.objects(n=5)
            objective = None  # the last scale's activations and targets go first
            objective = build_objective(extractor, content, styles, s_k, plan, out_hw, style_hws, mem,
                                        ranks=ranks)[0]
        elif cmd == EVAL:
            x = ranks.share_image(None, (h, w), torch.device(objective.base.device_type))  # (1, 3, H, W)
            with float32_math(objective.math):
                objective.share(x, bool(with_grad))
            evaluations += 1
        else:
            raise RuntimeError(f"unknown command {cmd} from the lead")
