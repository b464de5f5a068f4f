"""Socket helpers of the HTTP front: reads and writes with deadlines, the head
limit, and the protocol by which a connection is handed to one of relayd's own
loops and back.

A leaf: it knows Trio and sockets, and nothing of Hypercorn, h11 or wsproto,
so the loops that serve connections themselves (:mod:`relayd.front.ask_wire`,
:mod:`relayd.front.websocket_wire`, the bench's clients) depend on it rather
than on the server loop (:mod:`relayd.front.server`) that hands them their
connections.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from relayd.front.http1 import MAX_HEAD

__all__ = [
    "MAX_HEAD",
    "RECEIVE_SIZE",
    "WRITE_TIMEOUT",
    "ConnectionTerms",
    "HandBack",
    "Lifecycle",
    "Takeover",
    "WriteLimits",
    "read_rest_of_head",
    "read_some",
    "write_now",
]

log = logging.getLogger("relayd.server")

# A peer must accept a write within this time or lose its connection.
WRITE_TIMEOUT = 30.0
# The most one socket read takes (Hypercorn's MAX_RECV is the same).
RECEIVE_SIZE = 2**16


def write_now(stream: trio.abc.Stream, data: bytes) -> int | None:
    """Write what a socket stream takes without waiting: the byte count (0 for
    other streams), or None if the socket is closed or the peer has gone.

    Hypercorn and trio write with a shielded, deadlined ``send_all`` that also
    passes through the scheduler; most frames and responses fit in the socket
    buffer at once, and this writes them for the cost of the system call. The
    caller holds the stream's write lock and sends any remainder with
    :meth:`WriteLimits.send_all`.
    """
    if not isinstance(stream, trio.SocketStream):
        return 0
    descriptor = stream.socket.fileno()
    if descriptor < 0:  # closed (a write was cut short)
        return None
    try:
        return os.write(descriptor, data)
    except BlockingIOError:
        return 0
    except OSError:  # reset, broken pipe
        return None


async def read_some(stream: trio.abc.Stream, max_bytes: int, *, drained: bool = False) -> bytes:
    """The next bytes from ``stream``; b"" at its end, or once it is closed or reset.

    On a socket stream: a non-blocking read on its descriptor, waiting for it
    to be readable when it is not. Trio's ``receive_some`` passes through the
    scheduler once more after a read that had to wait, on every request's path.

    ``drained``: the caller's last read took everything there was (it came
    back short of its limit), so this one waits for readability first rather
    than try a read that would almost surely fail: after an agent's frame the
    agent waits for the relay, and a failed read is a system call and an
    exception for nothing. If data is there after all, the wait ends at the
    event loop's next poll, one pass through the scheduler later.
    """
    if not isinstance(stream, trio.SocketStream):
        try:
            return bytes(await stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
    waited = False
    read_now = not drained
    while True:
        descriptor = stream.socket.fileno()
        if descriptor < 0:  # closed under us (a write cut short)
            return b""
        data = None
        if read_now:
            try:
                data = os.read(descriptor, max_bytes)
            except BlockingIOError:
                pass  # wait outside the handler: it would keep the exception alive
            except OSError:  # reset
                return b""
        if data is not None:
            if not waited:
                await trio.lowlevel.checkpoint()  # data was there: still let others run
            return data
        read_now = True
        try:
            await trio.lowlevel.wait_readable(stream.socket)
        except trio.ClosedResourceError:
            return b""
        waited = True


async def read_rest_of_head(stream: trio.abc.Stream, data: bytes) -> bytes:
    """``data`` and what follows it, until a request head is complete (its
    blank line has come), the peer stops sending, or :data:`MAX_HEAD` bytes
    have come without one. The caller's deadline bounds the wait."""
    while b"\r\n\r\n" not in data and len(data) < MAX_HEAD:
        more = await read_some(stream, RECEIVE_SIZE)
        if not more:
            break
        data += more
    return data


class WriteLimits:
    """Deadlines for the shielded socket writes of one server.

    A write is shielded from cancellation (a half-written frame would corrupt
    the stream), so nothing but its own deadline can stop it. That deadline is
    the earliest of: :data:`WRITE_TIMEOUT` from now, the writer's own deadline
    (a request's ``requests.timeout`` must hold even against an agent that
    stopped reading), and, once shutdown starts, the end of the graceful period.
    """

    def __init__(self) -> None:
        self.shutdown_deadline = math.inf
        self.active: set[trio.CancelScope] = set()

    def deadline(self) -> float:
        return min(
            trio.current_time() + WRITE_TIMEOUT,
            trio.current_effective_deadline(),
            self.shutdown_deadline,
        )

    def shut_down_by(self, deadline: float) -> None:
        self.shutdown_deadline = deadline
        for scope in self.active:
            scope.deadline = min(scope.deadline, deadline)

    async def write(self, stream: trio.abc.Stream, data: bytes) -> bool:
        """Write ``data`` whole: what the socket takes at once (:func:`write_now`),
        the rest with :meth:`send_all`. False as for :meth:`send_all`."""
        written = write_now(stream, data)
        if written == len(data):
            return True
        return written is not None and await self.send_all(stream, data[written:])

    async def send_all(self, stream: trio.abc.Stream, data: bytes) -> bool:
        """Write ``data`` whole, shielded, within :meth:`deadline`.

        False if the peer has gone, or did not take the data in time (its
        stream is then closed: a write cut short leaves it unusable). The
        caller serialises writes to one stream.
        """
        try:
            with trio.CancelScope(shield=True, deadline=self.deadline()) as scope:
                self.active.add(scope)
                try:
                    await stream.send_all(data)
                finally:
                    self.active.discard(scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if scope.cancelled_caught:
            log.info("peer is not reading, write cut short: closing its connection")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return False
        return True


class Lifecycle:
    """One server's shutdown as its connections see it.

    :meth:`stop_accepting` (at SIGTERM) makes ``stopping`` true: every
    connection answers its request under way with ``Connection: close``, and a
    connection that is idle now (between requests) is closed at once, so that
    its client's next request goes to the next relayd (the listening socket
    outlives the process under socket activation). Requests already under way
    carry on.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._idle: set[Callable[[], None]] = set()  # how to close each idle connection

    def stop_accepting(self) -> None:
        self.stopping = True
        for close in list(self._idle):
            close()

    def idle(self, close: Callable[[], None]) -> None:
        """A connection is idle; ``close`` ends its wait (now, if stopping)."""
        if self.stopping:
            close()
        else:
            self._idle.add(close)

    def busy(self, close: Callable[[], None]) -> None:
        self._idle.discard(close)


@dataclass(frozen=True, slots=True)
class ConnectionTerms:
    """What a connection a :class:`Takeover` serves must keep to, as Hypercorn's do."""

    writes: WriteLimits
    keep_alive_timeout: float  # how long a connection may sit idle between requests
    stopping: Callable[[], bool]  # the server is shutting down: no new keep-alive cycles
    # When the connection became idle (it opened): the head that the takeover was
    # handed must be complete by idle_since + keep_alive_timeout, not later.
    idle_since: float
    life: Lifecycle = field(default_factory=Lifecycle)  # idle connections close at SIGTERM


@dataclass(frozen=True, slots=True)
class HandBack:
    """A connection a :class:`Takeover` returns to Hypercorn: the bytes it read
    and did not serve, and since when the connection has been idle (so that a
    request head that started arriving before the hand-back keeps its deadline)."""

    data: bytes
    idle_since: float


class Takeover(Protocol):
    """Serves some connections instead of Hypercorn, chosen by their first request.

    relayd's agent WebSockets (:mod:`relayd.front.websocket_wire`) and its ``/api/ask``
    clients (:mod:`relayd.front.ask_wire`) are served this way: no ASGI layers, no
    h11 state machine. A connection not claimed goes to Hypercorn with the
    bytes already read, so declining is always safe.
    """

    def might_serve(self, first_bytes: bytes) -> bool:
        """Whether to read the rest of the request head before deciding."""

    def server_for(
        self,
        head: bytes,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        terms: ConnectionTerms,
    ) -> Awaitable[HandBack | None] | None:
        """The coroutine that serves the connection, or None to leave it to Hypercorn.

        It may use ``stream`` until it returns. It returns None when the
        connection is over (the server closes it), or a :class:`HandBack`:
        Hypercorn then serves the rest of the connection, starting with the
        bytes it holds.
        """
