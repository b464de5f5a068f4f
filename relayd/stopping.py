"""The forced end of a drain that overruns, shared by ``relayd serve`` and
``relayd agent``.

A graceful stop waits for work in flight; a peer that stops reading could make
it wait for ever, and systemd would then kill the process without a word in
the journal. So each daemon runs :func:`hard_stop_after` beside its drain: it
logs why and exits once the drain has had its grace plus
:data:`HARD_STOP_MARGIN`, or at once on a second SIGTERM/SIGINT (SIGHUP stays
a reload).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator

import trio

__all__ = ["HARD_STOP_MARGIN", "exit_now", "hard_stop_after"]

# Seconds past the drain's own grace before the process ends regardless.
HARD_STOP_MARGIN = 5.0


async def hard_stop_after(
    deadline: float, signals: AsyncIterator[int], log: logging.Logger
) -> None:
    """End the process if the drain lasts ``deadline`` seconds, or on a second
    signal; ``log`` is the daemon's own logger, so the journal line is its."""
    with trio.move_on_after(deadline):
        async for signum in signals:
            if signum != signal.SIGHUP:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                exit_now(1)
        return
    log.error("drain did not finish within %.0fs: exiting now", deadline)
    exit_now(1)


def exit_now(code: int) -> None:
    """Leave without unwinding: only for a forced stop (the state files are
    written atomically, so nothing is torn)."""
    logging.shutdown()
    os._exit(code)
