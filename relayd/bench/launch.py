"""Starting a server the way systemd starts relayd, for the bench and the tests.

The parent binds the listening socket itself (``127.0.0.1``, port 0) and
hands it over as ``--listen fd://N``, so there is no race for a free port;
the child says it is ready by sending ``READY=1`` to the datagram socket
named by ``NOTIFY_SOCKET``, exactly as it tells systemd, so nothing polls
for readiness. :class:`Handover` is that pair of sockets and the environment
that goes with them; the bench (:func:`relayd.bench.procs.start_server`,
under Trio) and the tests (``tests/support.py``, blocking) start their
children with it and wait for :func:`says` ``READY=1`` in their own way.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BACKLOG", "Handover", "read_log_tail", "says", "service_environment"]

# The listening socket's backlog (Hypercorn sets its own, config.backlog, on it again).
BACKLOG = 1024
# Variables meant for this process or its service manager, which a child must not see.
SERVICE_VARIABLES = ("RELAYD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "JOURNAL_")


def service_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that configures relayd or speaks
    for a service manager (``RELAYD_*``, ``NOTIFY_SOCKET``, ``LISTEN_*``, ...), then
    ``extra``."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(SERVICE_VARIABLES)
    }
    environment.update(extra or {})
    return environment


def says(message: str, prefix: str) -> bool:
    """Whether an sd_notify datagram has a line that starts with ``prefix``."""
    return any(line.startswith(prefix) for line in message.splitlines())


def read_log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's log file ("" if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Handover:
    """What a child server is handed, as systemd hands it: a listening loopback
    socket (pass :attr:`pass_fds`, say :attr:`listen_url`) and a bound
    ``NOTIFY_SOCKET`` (:meth:`environment`) for it to say ``READY=1`` on."""

    listener: socket.socket
    notify: socket.socket  # AF_UNIX datagrams, blocking; bound to notify_path
    notify_path: Path
    owns_listener: bool  # else the caller keeps it (for the next server, as systemd does)
    port: int

    @classmethod
    def open(cls, workdir: Path, name: str, *, listener: socket.socket | None = None) -> Handover:
        """A fresh loopback listener (or ``listener``) and a notify socket in ``workdir``."""
        owns = listener is None
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if listener is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", 0))
                listener.listen(BACKLOG)
            notify_path = workdir / f"{name}-notify-{time.monotonic_ns()}.sock"
            notify.bind(str(notify_path))
        except BaseException:
            notify.close()
            if owns and listener is not None:
                listener.close()
            raise
        return cls(listener, notify, notify_path, owns, int(listener.getsockname()[1]))

    @property
    def listen_url(self) -> str:
        return f"fd://{self.listener.fileno()}"

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.listener.fileno(),)

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment (:func:`service_environment`) with ``extra`` and
        ``NOTIFY_SOCKET``."""
        return service_environment({**(extra or {}), "NOTIFY_SOCKET": str(self.notify_path)})

    def started(self) -> None:
        """The child holds its copy of the listener now: ours goes, unless the
        caller keeps it."""
        if self.owns_listener:
            self.listener.close()

    def close(self) -> None:
        self.started()
        self.notify.close()
