"""Logging setup: one handler on the root logger, journald-aware. Called only from ``cli``.

Everything else in relayd just does ``logging.getLogger(__name__)`` and logs with lazy ``%``
arguments; this module decides where and how records are written. Invariants:

- The root logger has at most one handler installed here; calling `setup_logging` again
  replaces it (the CLI may call it before and after reading the config).
- Hypercorn's loggers have no handlers of their own and propagate to the root, so the access
  and error logs get the same format and level as ours.
- Under journald (``$JOURNAL_STREAM`` names our stream), every line carries a ``<N>`` syslog
  priority prefix and no timestamp: journald adds its own and reads the priority per line.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Python level -> syslog priority, highest first: the first threshold a record reaches wins,
# so custom levels in between (e.g. 25) get the priority of the standard level below them.
_PRIORITIES = (
    (logging.CRITICAL, 2),  # LOG_CRIT
    (logging.ERROR, 3),  # LOG_ERR
    (logging.WARNING, 4),  # LOG_WARNING
    (logging.INFO, 6),  # LOG_INFO
)
_DEBUG_PRIORITY = 7  # LOG_DEBUG

_COLOURS = {
    logging.DEBUG: "\x1b[2m",  # dim
    logging.INFO: "\x1b[32m",  # green
    logging.WARNING: "\x1b[33m",  # yellow
    logging.ERROR: "\x1b[31m",  # red
    logging.CRITICAL: "\x1b[1;31m",  # bold red
}
_RESET = "\x1b[0m"


def parse_level(level: str) -> int:
    """Map a config/CLI level name (case-insensitive) to a `logging` level.

    Raises `ValueError` naming the accepted values, for the CLI to report.
    """
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of: {', '.join(LEVELS)}"
        ) from None


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald should file a record of level ``levelno`` under."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


class JournaldFormatter(logging.Formatter):
    """``<N>logger: message``, with the ``<N>`` repeated on every line of the text.

    journald splits a stream on newlines and reads the prefix of each line separately, so a
    traceback without per-line prefixes would be filed at the default priority (info).
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # rstrip: a message ending in a newline (captured warnings do) would add a bare "<N>".
        text = super().format(record).rstrip("\n")
        return "\n".join(prefix + line for line in text.split("\n"))


class HumanFormatter(logging.Formatter):
    """``2026-11-28 18:00:00,123 WARNING relayd.agents: message``, level optionally coloured."""

    def __init__(self, *, colour: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        # As in JournaldFormatter: no blank line after a message that ends in a newline.
        return super().format(record).rstrip("\n")

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not self._colour or record.levelno not in _COLOURS:
            return super().formatMessage(record)
        # A copy: the record is shared with any other handler, which must not see escapes.
        coloured = copy.copy(record)
        coloured.levelname = f"{_COLOURS[record.levelno]}{record.levelname}{_RESET}"
        return super().formatMessage(coloured)


class _RelaydHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `setup_logging` owns, so a second call can find and replace it."""


def is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journald stream systemd connected us to (``$JOURNAL_STREAM``).

    Compares device and inode, as systemd.exec(5) says to: the variable is inherited by
    children whose stderr may be redirected elsewhere, so its mere presence proves nothing.
    """
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no real fd (StringIO, pytest capture) or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    # https://no-color.org: a non-empty NO_COLOR disables colour, whatever its value.
    if environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except ValueError:  # closed stream
        return False


def hypercorn_loggers() -> tuple[logging.Logger, logging.Logger]:
    """Hypercorn's (error, access) loggers, reset to propagate to our root handler.

    Assign them to ``hypercorn.config.Config.errorlog`` / ``.accesslog``: Hypercorn uses a
    `logging.Logger` given there as is (``hypercorn.logging._create_logger``), whereas its
    default ``errorlog = "-"`` would attach its own stderr handler and format.
    """
    pair = (logging.getLogger("hypercorn.error"), logging.getLogger("hypercorn.access"))
    for hc_logger in pair:
        for handler in list(hc_logger.handlers):
            hc_logger.removeHandler(handler)
        hc_logger.propagate = True
        hc_logger.setLevel(logging.NOTSET)  # follow the root level, and so `set_level`
    return pair


def setup_logging(
    level: str, *, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Send all records at ``level`` or above to ``stream`` (default stderr).

    Journald format when ``stream`` is the journal (see `is_journal_stream`), else the human
    format. Replaces the handler of an earlier call. Raises `ValueError` for a bad ``level``,
    before changing anything.
    """
    levelno = parse_level(level)
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    handler = _RelaydHandler(stream)
    if is_journal_stream(stream, environ):
        handler.setFormatter(JournaldFormatter())
    else:
        handler.setFormatter(HumanFormatter(colour=_wants_colour(stream, environ)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelaydHandler)]:
        root.removeHandler(old)
        old.close()  # flushes; a StreamHandler never closes its stream
    root.addHandler(handler)
    root.setLevel(levelno)
    hypercorn_loggers()
    # Route warnings.warn() (e.g. DeprecationWarning from a dependency) into the same output.
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """Change the level at runtime (on config reload). Raises `ValueError` for a bad name."""
    logging.getLogger().setLevel(parse_level(level))
