"""The sd_notify protocol, the watchdog interval and socket activation, without libsystemd.

This module owns the one datagram socket to ``$NOTIFY_SOCKET`` (inside a `Notifier`) and the
parsing of the ``WATCHDOG_*`` and ``LISTEN_*`` variables. It knows nothing of agents, HTTP or
config. Invariants:

- Talking to systemd never raises: a dead or absent service manager must not take the daemon
  down, so send errors are logged at debug level and dropped (this is what ``sd_notify`` does).
- Bad environment values never raise either: they are logged as warnings and treated as unset,
  because a daemon refusing to start over a stray variable is worse than one without the extra.
- The environment is only changed when a caller asks (``unset_environment=True``), so the
  variables meant for this process are not inherited by its children.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trio

logger = logging.getLogger(__name__)

LISTEN_FDS_START = 3
"""The first inherited fd: systemd passes sockets right after stdin, stdout and stderr."""


def _one_line(text: str) -> str:
    # A newline inside STATUS= would start a new (bogus) assignment in the datagram.
    return " ".join(text.splitlines())


class Notifier:
    """A connection to the service manager's notification socket; a no-op without one.

    Build it with `from_environ`. Owns its socket until `close`; also usable as a context
    manager.
    """

    def __init__(self, address: str | None) -> None:
        """``address`` is ``$NOTIFY_SOCKET`` as systemd sets it: an absolute path, or ``@name``
        for the abstract namespace. ``None`` (or anything else, with a warning) disables it."""
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address is None or address == "":
            return
        if address.startswith("@"):
            # Linux abstract namespace: the leading NUL replaces the '@'.
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            logger.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @name", address)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            logger.warning("cannot create a socket for NOTIFY_SOCKET: %s", exc)
            return
        # Never block the Trio loop on a full socket buffer: drop the message instead.
        sock.setblocking(False)
        self._address, self._sock = address, sock

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET`` from ``environ`` (default `os.environ`).

        With ``unset_environment=True`` the variable is removed from `os.environ` (not from a
        passed-in mapping), so child processes do not inherit it and notify on our behalf.
        """
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to."""
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one datagram; errors are logged at debug, never raised.

        Raises `ValueError` for a field without ``=`` or with a newline: that is a bug in the
        caller, not a runtime condition.
        """
        for field in fields:
            if "=" not in field or "\n" in field:
                raise ValueError(f"malformed sd_notify field: {field!r}")
        if self._sock is None or self._address is None or not fields:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # ECONNREFUSED, ENOENT, EAGAIN...: systemd is gone or busy.
            logger.debug("sd_notify %s failed: %s", fields, exc)

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up (or a reload) finished; ``Type=notify`` waits for this."""
        self.notify("READY=1", *([] if status is None else [f"STATUS={_one_line(status)}"]))

    def reloading(self) -> None:
        """Announce a reload; send `ready` when it is over. The timestamp lets systemd (>= 253,
        ``Type=notify-reload``) tell this reload from an earlier one; older versions ignore it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Announce a graceful shutdown, so ``systemctl status`` shows it while we drain."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status``."""
        self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Keep-alive ping; missing ``WatchdogSec=`` of them makes systemd kill and restart us."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls are no-ops. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None:
        return None
    # Stricter than int(): no sign, spaces or underscores ("1_0"), which systemd never writes.
    if not (value.isascii() and value.isdigit()):
        logger.warning("ignoring %s=%r: not a non-negative integer", name, value)
        return None
    return int(value)


def _for_us(environ: Mapping[str, str], name: str, pid: int) -> bool:
    """Whether ``$name`` (a pid meant to stop inheritance by children) is unset or ``pid``."""
    if name not in environ:
        return True
    target = _parse_int(environ, name)
    return target == pid


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when the watchdog is off or not ours.

    Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so one late ping is not fatal.
    """
    usec = _parse_int(environ, "WATCHDOG_USEC")
    if usec is None or not _for_us(environ, "WATCHDOG_PID", pid):
        return None
    if usec == 0:
        logger.warning("ignoring WATCHDOG_USEC=0")
        return None
    return usec / 2 / 1e6


@dataclass(frozen=True)
class ListenFd:
    """One socket passed by systemd socket activation (``fd`` stays open; Hypercorn adopts it)."""

    fd: int
    name: str

    @property
    def bind(self) -> str:
        """The Hypercorn ``Config.bind`` entry that serves this socket."""
        return f"fd://{self.fd}"


def listen_fds(environ: Mapping[str, str], pid: int, *, unset_environment: bool) -> list[ListenFd]:
    """The sockets systemd passed to process ``pid``, in order; empty when not socket-activated.

    ``LISTEN_PID`` must equal ``pid`` (else the variables were inherited from a parent). Names
    come from ``LISTEN_FDNAMES``, ``"unknown"`` by default, as in sd_listen_fds_with_names(3);
    a wrong number of names is logged and ignored, since the fds themselves are still real.
    With ``unset_environment=True`` the three variables are removed from `os.environ`.
    """
    try:
        if "LISTEN_PID" not in environ or not _for_us(environ, "LISTEN_PID", pid):
            return []
        count = _parse_int(environ, "LISTEN_FDS")
        if count is None:
            return []
        names = ["unknown"] * count
        raw_names = environ.get("LISTEN_FDNAMES")
        if raw_names is not None:
            if len(raw_names.split(":")) == count:
                names = raw_names.split(":")
            else:
                logger.warning("ignoring LISTEN_FDNAMES=%r: %d fds passed", raw_names, count)
        return [ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled (from `watchdog_interval`).

    Runs in the daemon's root nursery: if the Trio loop stalls, the pings stop and systemd
    restarts us, which is the point of the watchdog.
    """
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
