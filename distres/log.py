"""distres's notes and warnings: "[distres] ..." lines on stderr.

Installed when distres is imported, as DeepSpeed and torch install theirs, so a loader or a
checkpoint read from a script reports what it skips as the CLI does. `setup_logging` sets the
levels for a rank: rank 0 notes everything, other ranks only errors, and every rank reports
the bad samples it skips.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading


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


def exit_process(code: int) -> None:
    """Leave a command whose outputs are all written, without Python's module teardown.

    Tearing down torch's module graph at interpreter exit costs 1-2 s of CPU per process, on
    every rank of every run, and does nothing a finished run needs. What a normal exit does
    that matters is done here: a live non-daemon thread means a normal exit (which waits for
    it); otherwise the atexit handlers run (logging, W&B, multiprocessing's children) and
    stdio is flushed before the process ends.

    In a multiprocessing child (`torchrun --run-path`, whose workers run the script as a
    function and report its return to the agent) a success returns and a failure raises
    SystemExit: ending the process here would leave the agent waiting for that return.
    """
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        if code:
            sys.exit(code)
        return
    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
