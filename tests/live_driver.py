"""``nst`` as a program, with the live page wired into ``nst stylize`` the way issue #28's
integration does it in nst/stylize_command.py (``open_live`` before any work, its
callback and plan hook chained into the render, closed at the end). tests/test_live.py
runs it as ``python tests/live_driver.py stylize ... --serve 127.0.0.1:0``.

Once nst/stylize_command.py has those lines itself, the tests run ``python -m nst``
instead and this file goes (see DRIVER in tests/test_live.py).
"""

from __future__ import annotations

import sys

from nst import cli
from nst import stylize_command as sc
from nst.engine.live import open_live
from nst.engine.loop import chain

_opened = []
_stylize, _render = sc._stylize, sc.render


def _stylize_live(job, quiet, t_start, recipe, ranks=None):
    live = open_live(job.serve, job.progress, job.settings, t_start)  # a port in use: refused before any work
    _opened.append(live)
    try:
        return _stylize(job, quiet, t_start, recipe, ranks)
    finally:
        live.close(f"ended; the image is in {job.output}")


def _render_live(*args, callback=None, on_plan=None, **kwargs):
    live = _opened[-1]
    return _render(*args, callback=chain(callback, live.callback), on_plan=chain(on_plan, live.on_plan), **kwargs)


if __name__ == "__main__":
    sc._stylize, sc.render = _stylize_live, _render_live
    sys.exit(cli.main())
