"""distres's notes and warnings: "[distres] ..." lines on stderr.

Installed when distres is imported, as DeepSpeed and torch install theirs, so a loader or a
checkpoint read from a script reports what it skips as the CLI does. `setup_logging` sets the
levels for a rank: rank 0 notes everything, other ranks only errors, and every rank reports
the bad samples it skips.
"""

from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """stderr as it is when a line is written (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install() -> None:
    logger = logging.getLogger("distres")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[distres] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)


def setup_logging(main: bool = True) -> None:
    install()
    logging.getLogger("distres").setLevel(logging.INFO if main else logging.ERROR)
    logging.getLogger("distres.data").setLevel(logging.INFO)
