"""Whether progress bars are drawn: not under -q (warnings only)."""

from __future__ import annotations

import logging


def quiet() -> bool:
    """The CLI's -q sets the pipeline logger above INFO; a level left unset (the Python API
    without logging configured) still draws the bars."""
    return logging.getLogger("pipeline").level > logging.INFO
