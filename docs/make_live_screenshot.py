"""Make the README's picture of the live page: docs/live-page.png, a screenshot of the page
(``--serve``) while a budgeted multi-scale render of the demo's drawn images runs, taken by
Debian's headless Chromium through tests/browser/live_page.js; then the render is stopped
as the page's stop button would (SIGINT to the main thread).

The render uses SEEDED RANDOM WEIGHTS (random:0), not a trained network, as the page
itself says in its header: the picture shows the page, not a good stylisation.

    .venv/bin/python docs/make_live_screenshot.py [--budget S] [--size PX] [--out FILE]

Needs node, `npm ci` in tests/browser, and /usr/bin/chromium (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "live-page.png"))
    ap.add_argument("--size", type=int, default=256, help="long edge of the render")
    ap.add_argument("--budget", type=float, default=240.0, help="the render's --time-budget (s)")
    ap.add_argument("--updates", type=int, default=4, help="images shown in the final scale before the shot")
    a = ap.parse_args()

    from nst.engine import demo
    from nst.engine.imageio import pil_to_tensor
    from nst.engine.live import interrupt_main, open_live
    from nst.engine.multiscale import render
    from nst.engine.settings import StylizeSettings

    scales = f"{a.size // 2},{a.size * 3 // 4}"
    settings = StylizeSettings(size=a.size, scales=scales, time_budget=a.budget, weights="random:0", device="cpu",
                               style_weight=demo.RANDOM_STYLE_WEIGHT, tv_weight=0.0, progress_every=4)
    content, style = pil_to_tensor(demo.make_content()), pil_to_tensor(demo.make_style(seed=0))
    live = open_live("127.0.0.1:0", None, settings)
    outcome, rendering = {}, threading.Event()

    def shoot() -> None:
        r = subprocess.run(["node", "live_page.js", "shot", live.url, a.out, str(a.updates), "2"],
                           cwd=ROOT / "tests" / "browser", capture_output=True, text=True)
        outcome["code"], outcome["err"] = r.returncode, r.stderr
        if rendering.is_set():
            interrupt_main()  # the picture is taken: stop the render, as the page's button does

    threading.Thread(target=shoot, daemon=True).start()
    rendering.set()
    try:
        render(content, [(style, 1.0)], settings, callback=live.callback, on_schedule=live.on_schedule)
    except KeyboardInterrupt:
        pass
    finally:
        rendering.clear()
        live.close()
    if outcome.get("code") != 0:
        print(f"no screenshot: {outcome.get('err', 'the render ended before the screenshot')}", file=sys.stderr)
        return 1
    from PIL import Image

    # 256 colours: the page is flat colours and one small image; a third of the bytes in the repository.
    Image.open(a.out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(a.out, optimize=True)
    print(f"wrote {a.out} (seeded random weights, a {a.budget:g} s budget over scales {scales},{a.size})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the stop came just as the render ended on its own
        sys.exit(1)
