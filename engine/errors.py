"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, an image too small) raises an
``NSTError``. The CLI prints its message as one line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NSTError(Exception):
    """An error whose message is complete on one line and meant for the user."""

    exit_code = 1


class WeightsError(NSTError):
    """The weights spec or file cannot be used."""


class InputError(NSTError):
    """An input tensor or image does not fit the network."""


class ExportError(NSTError):
    """An export artefact could not be written or failed its self-check."""


class ManifestError(NSTError):
    """An export directory's manifest is missing, malformed or does not match."""


class RenderFailed(NSTError):
    """A render that could not go on. ``result`` holds its best image so far, if any: the
    command line writes it before it reports the error."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result  # engine.stats.Result | None


class NonFiniteLossError(RenderFailed):
    """The loss became NaN or Inf."""


class RankLostError(RenderFailed):
    """A rank of a distributed render stopped answering (died, or passed --rank-timeout)
    (engine/ranks.py)."""
