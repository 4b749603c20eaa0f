"""Regenerate tests/data/loss_curves.json: per-step losses of a real two-scale render on
the CPU (the demo's drawn images, seeded random weights): 240 steps at 128 px from the
content, then 120 steps at 256 px from that result, upsampled. The adaptive planner's tests
replay them against an injected clock.

    python tests/data/make_loss_curves.py
"""

import json
from pathlib import Path

from nst.engine.demo import make_content, make_style
from nst.engine.imageio import pil_to_tensor, resize_to
from nst.engine.loop import run
from nst.engine.settings import StylizeSettings

content, style = pil_to_tensor(make_content()), pil_to_tensor(make_style(seed=1))
base = dict(weights="random:0", device="cpu", style_weight=1e8, tv_weight=0.0, progress_every=1000)
coarse = run(content, [(style, 1.0)], StylizeSettings(size=128, steps=240, **base))
fine_hw = StylizeSettings(size=256, **base).output_hw(tuple(content.shape[-2:]))
fine = run(content, [(style, 1.0)], StylizeSettings(size=256, steps=120, **base),
           init=resize_to(coarse.image, fine_hw))
out = {"made_by": "tests/data/make_loss_curves.py", "weights": "random:0 (seeded random, not a trained network)",
       "scales": [{"size": 128, "loss": coarse.stats.loss}, {"size": 256, "loss": fine.stats.loss}]}
Path(__file__).with_name("loss_curves.json").write_text(json.dumps(out, indent=1) + "\n")
