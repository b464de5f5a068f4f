"""Hypercorn's trio worker, with the fixes relayd needs to face the internet.

Everything here reaches into Hypercorn internals (``TCPServer``, ``Lifespan``,
``WorkerContext``), so Hypercorn is pinned exactly in pyproject.toml, every
private name relied on is checked by tests/test_hypercorn_contract.py, and
each fix has a regression test (tests/test_hostile.py).
:func:`serve_guarded` replaces ``hypercorn.trio.serve`` for plain-TCP and Unix
listeners, plain or TLS (:mod:`relayd.tls`). What it fixes:

1. **One bad request killed the process.** A WebSocket upgrade request with
   bytes after the headers gets a 400, then an h11 ``LocalProtocolError``
   escapes the connection task, the server nursery and ``serve()``
   (pgjones/hypercorn#225). :class:`GuardedTCPServer` confines any error of
   a connection to that connection: logged, the socket closed, the daemon
   serving on.
2. **Idle keep-alive connections were never closed.** Hypercorn restarts its
   idle timer (a task) from the app's task when a response ends; under
   Quart-Trio that task's nursery is already cancelled, so starting the timer
   raises Cancelled, the timer never runs and an idle connection stays open
   forever. Here there is no timer task: the connection's socket read carries
   the idle deadline, set when the connection becomes idle and lifted when a
   request starts. A connection idle (no request under way) for
   ``keep_alive_timeout`` is closed, as is one that never completes its first
   request's headers. It also saves starting and cancelling a task per
   request (about 7 % of the relay's CPU per request, measured).
3. **A peer that stops reading blocked a write forever.** Hypercorn shields
   each socket write from cancellation, so neither a request's deadline nor the
   graceful shutdown could stop it. A write now has a deadline of its own
   (:class:`WriteLimits`); when it passes, the write gives up and the
   connection is closed.

4. **A client that went away held its socket until the app finished.**
   Hypercorn closes a connection only after its app task returns; a client
   that gives up while an agent works would keep a file descriptor and a task
   until the agent answered. When the client's side closes, its HTTP request
   is now cancelled at once (what Quart-Trio does on ``http.disconnect``),
   without a watcher task per request.

5. **A refused WebSocket upgrade left its connection open.** After Hypercorn
   answers an upgrade with an error (a 400 for bytes sent before the 101),
   the app still waits for WebSocket messages; the connection is now ended
   and its app cancelled.

Beyond fixes: a :class:`~relayd.front.sockets.Takeover` may serve a
connection itself, chosen by its first request head (relayd's agent
WebSockets, :mod:`relayd.front.websocket_wire`, and its ``/api/ask`` clients,
:mod:`relayd.front.ask_wire`), and hand it back to Hypercorn later; socket
writes and reads use the helpers of :mod:`relayd.front.sockets`; each
connection has a lean mutex instead of Hypercorn's ``trio.Lock`` (memory per
idle agent is a measured target).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from http import HTTPStatus
from typing import Any, cast

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)

from relayd.front.http1 import says_close
from relayd.front.sockets import (
    RECEIVE_SIZE,
    ConnectionTerms,
    HandBack,
    Lifecycle,
    Takeover,
    WriteLimits,
    read_rest_of_head,
    read_some,
)
from relayd.proxies import ProxyProtocolError, TrustedProxies, parse_proxy_header
from relayd.sync import LeanLock
from relayd.tls import TlsListener, TlsTerms, handshake, replayed

__all__ = ["GuardedTCPServer", "serve_guarded"]

log = logging.getLogger("relayd.server")

# A lingering close reads and drops what the client still sends for at most this
# long, and this many bytes (see GuardedTCPServer._close).
LINGER_TIME = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class GuardedTCPServer(TCPServer):
    """One connection: errors confined, idle time bounded, writes bounded."""

    def __init__(
        self,
        *args: Any,
        writes: WriteLimits,
        takeovers: Sequence[Takeover] = (),
        proxy_protocol: Callable[[], TrustedProxies | None] = lambda: None,
        life: Lifecycle | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._life = life if life is not None else Lifecycle()
        self._writes = writes
        self._takeovers = takeovers
        self._proxy_protocol = proxy_protocol  # the proxies whose PROXY header counts
        # Hypercorn's trio.Lock does the same job for much more memory per agent.
        self.send_lock = LeanLock()  # type: ignore[assignment]
        self._idle_since: float | None = trio.current_time()  # idle until a request starts
        self._read_scope: trio.CancelScope | None = None
        self._first_bytes: bytes | None = None  # read before Hypercorn took the connection
        self._reading = False  # the read loop runs: a close lingers (see _close)
        self._client: tuple[str, int] | None = None  # named by a PROXY header
        self._linger_until: float | None = None

    async def run(self) -> None:
        try:
            if self._takeovers:
                head = await self._read_head()
                if head is None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(self.stream)
                    return
                served = self._takeover_for(head)
                first: bytes | None = head  # b"": the peer closed or said nothing in time
                if served is not None:
                    rest: HandBack | None = None
                    try:
                        rest = await served
                    finally:
                        if rest is None:  # also when served raised
                            with trio.CancelScope(shield=True):
                                await trio.aclose_forcefully(self.stream)
                    if rest is None:
                        return
                    self._idle_since = rest.idle_since
                    first = rest.data or None  # None: Hypercorn reads from the socket
                self._first_bytes = first
            await super().run()
        except OSError:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        except Exception as error:  # isolation boundary: one connection
            log.warning(
                "connection error, closing it: %s: %s",
                type(error).__name__,
                error,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _read_head(self) -> bytes | None:
        """The connection's first bytes: its whole request head if a takeover wants it.

        A PROXY header from a trusted proxy (``server.proxy_protocol``) is read
        first and taken off: it names the client for the whole connection. It
        comes in the clear, before a TLS client's hello, so on a TLS
        connection it is read from the socket and the TLS handshake follows.
        b"" if the peer closed or sent nothing within the idle allowance; None
        if the connection is over: a malformed PROXY header, or a failed TLS
        handshake (the client was told why).
        """
        data: bytes | None = b""
        with trio.CancelScope(deadline=self._read_deadline()) as scope:
            self._life.idle(scope.cancel)  # nothing asked yet: close it at SIGTERM
            try:
                stream: trio.abc.Stream = self.stream
                proxies = self._proxy_protocol()
                if proxies is not None and proxies.trusts(self._peer()[0]):
                    # In the clear: on TLS, from the socket, before the handshake.
                    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
                    data = await self._take_proxy_header(raw)
                    if data is None:
                        return None
                    if isinstance(stream, trio.SSLStream):
                        stream = self.stream = replayed(stream, data)
                        data = b""
                if isinstance(stream, trio.SSLStream) and not await handshake(stream):
                    return None
                if not data:
                    data = await read_some(stream, RECEIVE_SIZE)
            finally:
                self._life.busy(scope.cancel)
            if any(takeover.might_serve(data) for takeover in self._takeovers):
                data = await read_rest_of_head(stream, data)
        return data

    async def _take_proxy_header(self, raw: trio.abc.Stream) -> bytes | None:
        """Read the PROXY header the connection starts with from ``raw``; the bytes
        read after it (maybe none), or None if there is none or it is malformed."""
        data = b""
        while True:
            more = await read_some(raw, RECEIVE_SIZE)
            if not more:
                return None
            data += more
            try:
                header = parse_proxy_header(data)
            except ProxyProtocolError as error:
                log.info("connection closed: %s remote=%s", error, self._peer()[0])
                return None
            if header is not None:
                if header.client is not None:
                    self._client = header.client
                return data[header.length :]

    def _closing(self) -> bool:
        """The server is shutting down: a connection ends after its answer."""
        return self._life.stopping or self.context.terminated.is_set()

    def _peer(self) -> tuple[str, int]:
        """The address of the socket's peer (a proxy, perhaps)."""
        stream: trio.abc.Stream = self.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        socket = cast("trio.SocketStream", transport).socket
        peer = parse_socket_addr(socket.family, socket.getpeername())
        return peer if peer is not None else ("unix", 0)

    def _takeover_for(self, head: bytes) -> Awaitable[HandBack | None] | None:
        """What serves the connection instead of Hypercorn, if a takeover claims it."""
        wanting = [takeover for takeover in self._takeovers if takeover.might_serve(head)]
        if not wanting:
            return None
        stream: trio.abc.Stream = self.stream
        client = self._client or self._peer()
        assert self._idle_since is not None  # no request has started yet
        terms = ConnectionTerms(
            self._writes,
            self.config.keep_alive_timeout,
            self._closing,
            self._idle_since,
            self._life,
        )
        for takeover in wanting:
            served = takeover.server_for(head, stream, client, terms)
            if served is not None:
                return served
        return None

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            # Synchronous, so that it works from an app task already cancelled.
            self._idle_since = trio.current_time() if event.idle else None
            if self._read_scope is not None:
                self._read_scope.deadline = self._read_deadline()
            return
        if isinstance(event, Closed):
            # Sent from the app's task, which Quart-Trio may already have cancelled:
            # a cancelled Closed leaves the connection neither recycled nor closed
            # (after a 413, the next request on it hung).
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
            return
        if isinstance(event, RawData):
            data = event.data
            if not data:
                return  # h11's end of a Content-Length body: nothing to write
            async with self.send_lock:  # never waits when no one else writes
                if await self._writes.write(self.stream, data):
                    return
            with trio.CancelScope(shield=True):
                await self.protocol.handle(Closed())
            return
        await super().protocol_send(event)

    def _end_idle_read(self) -> None:
        """At SIGTERM: a connection with no request under way closes now."""
        if self._idle_since is not None and self._read_scope is not None:
            self._read_scope.cancel()

    def _read_deadline(self) -> float:
        if self._linger_until is not None:
            return self._linger_until
        if self._idle_since is None:
            return math.inf
        return self._idle_since + self.config.keep_alive_timeout

    async def _close(self) -> None:
        """Close the connection; while the read loop runs, by a lingering close.

        Hypercorn closes a connection at once when it answers before the
        request's body was read (a 413, say). A client that writes its whole
        body before reading (Python's urllib, many HTTP libraries) then gets a
        reset, and never sees the answer. So, as nginx does, the write side is
        shut first, and the read loop reads and drops what the client still
        sends, for at most :data:`LINGER_TIME` and :data:`LINGER_BYTES`, before
        the socket closes. On TLS the socket's write side is shut under the TLS
        layer (which has no half-close of its own): the answer is whole (it
        says ``Connection: close``), and the reads still decrypt what comes.
        """
        shut_writes = _write_shutter(self.stream)
        if not self._reading or self._linger_until is not None or shut_writes is None:
            await super()._close()
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await shut_writes()
        self._linger_until = trio.current_time() + LINGER_TIME
        if self._read_scope is not None:
            self._read_scope.deadline = self._linger_until

    async def _read_data(self) -> None:
        _give_reason_phrases(self.protocol, self._closing)
        if self._client is not None:  # named by a PROXY header: Hypercorn's scopes too
            self.protocol.protocol.client = self._client
        # Hypercorn's loop, with the idle deadline on the read instead of a timer task.
        # Every read here tries the socket first, even after a short read: the
        # body of a request often follows its head in a second segment, and
        # must be read before the app answers, or Hypercorn cannot recycle the
        # connection and closes it (read_some's drained hint would lose that race).
        first, self._first_bytes = self._first_bytes, None
        self._reading = True
        lingered = 0
        try:
            while True:
                if first is not None:
                    data, first = first, None
                else:
                    with trio.CancelScope(deadline=self._read_deadline()) as scope:
                        self._read_scope = scope
                        self._life.idle(self._end_idle_read)
                        try:
                            data = await read_some(self.stream, RECEIVE_SIZE)
                        finally:
                            self._read_scope = None
                            self._life.busy(self._end_idle_read)
                    if scope.cancelled_caught:
                        break  # idle for keep_alive_timeout, or lingered long enough
                if self._linger_until is not None:  # closing: drop what still comes
                    lingered += len(data)
                    if not data or lingered > LINGER_BYTES:
                        break
                    continue
                await self.protocol.handle(RawData(data))
                if data == b"" or self._websocket_refused():
                    break
        finally:
            self._reading = False
        stream = getattr(self.protocol.protocol, "stream", None)
        ended_by_peer = isinstance(stream, WSStream) and not self._websocket_refused()
        await self.protocol.handle(Closed())
        if not ended_by_peer:
            # The client is gone, or its WebSocket was refused: abandon what the
            # app still does for it, now, so that its socket and task are freed
            # (Hypercorn would wait for the app, e.g. for an agent's answer
            # nobody will read, or for messages of a WebSocket it refused). An
            # agent session ends by itself on the disconnect message.
            nursery = self._task_group._nursery
            if nursery is not None:
                nursery.cancel_scope.cancel()

    def _websocket_refused(self) -> bool:
        """Whether Hypercorn answered a WebSocket upgrade with an error (e.g. a 400
        for bytes sent before the 101): the connection is over, but its app
        would wait for messages that never come."""
        stream = getattr(self.protocol.protocol, "stream", None)
        return (
            isinstance(stream, WSStream)
            and stream.closed
            and stream.state is ASGIWebsocketState.HANDSHAKE
        )

    async def _idle_timeout(self) -> None:
        """Hypercorn starts this as its idle timer; the read deadline does the job."""


def _write_shutter(stream: trio.abc.Stream) -> Callable[[], Awaitable[None]] | None:
    """What shuts the write side of ``stream``'s connection (a TLS stream's: its
    socket's), or None if nothing can."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.send_eof if isinstance(stream, trio.abc.HalfCloseableStream) else None


class _ReasonedConnection(h11.Connection):
    """h11 as Hypercorn drives it, with two fixes to each response head.

    Every status line has its reason phrase (``HTTP/1.1 404 Not Found``):
    Hypercorn sends none, and relayd's own loops do; clients and people
    reading ``curl -i`` expect one.

    A response that starts once the server is shutting down says so too: the
    connection ends after it (Hypercorn does not recycle after its
    termination, and an idle connection closes at once after SIGTERM).

    A response that starts before the request's body has been read to its
    end (a refusal that did not wait for it, or waited and gave up) says
    ``Connection: close``: Hypercorn recycles a connection only if the
    request was read to its end when the response ends, and closes it
    otherwise, so a keep-alive client not told so sends its next request
    into a closed socket ("server disconnected without sending a
    response"). Whether the rest of the body is in the buffer already does
    not settle it: Hypercorn's reader may not have parsed it by the time the
    app is done (a look-ahead that said "keep" lost that race a fifth of
    the time). So refusals that can keep the connection read the body
    first (``relayd.api``'s ``drop_body``, ``JsonEndpoint._discard_body``).
    """

    # Whether the server is shutting down: a connection then ends after its answer.
    closing: Callable[[], bool] = staticmethod(lambda: False)

    def send_with_data_passthrough(self, event: h11.Event) -> list[bytes] | None:
        if isinstance(event, h11.Response | h11.InformationalResponse):
            close = (
                isinstance(event, h11.Response)
                and (self.their_state is h11.SEND_BODY or self.closing())
                and not any(
                    name.lower() == b"connection" and says_close(value)
                    for name, value in event.headers
                )
            )
            if close or not event.reason:
                event = type(event)(
                    status_code=event.status_code,
                    headers=_with_close(event.headers) if close else event.headers,
                    http_version=event.http_version,
                    reason=event.reason or _REASONS.get(event.status_code, b""),
                )
        return super().send_with_data_passthrough(event)


def _with_close(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``close`` added to their one Connection header."""
    if not any(name.lower() == b"connection" for name, _ in headers):
        return [*headers, (b"connection", b"close")]
    return [
        (name, value + b", close") if name.lower() == b"connection" else (name, value)
        for name, value in headers
    ]


_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def _give_reason_phrases(wrapper: Any, closing: Callable[[], bool]) -> None:
    """Swap the fresh h11 connection of a new HTTP/1.1 protocol for a
    :class:`_ReasonedConnection` (before any byte has been fed to it)."""
    protocol = getattr(wrapper, "protocol", None)
    if isinstance(protocol, H11Protocol) and type(protocol.connection) is h11.Connection:
        fresh = protocol.connection
        reasoned = _ReasonedConnection(
            h11.SERVER, max_incomplete_event_size=fresh._max_incomplete_event_size
        )
        reasoned.closing = closing
        protocol.connection = reasoned


def _bind_each(config: Config) -> list[socket.socket]:
    """The listening sockets of ``config.bind``, one bind at a time, so that a
    failure names the address that could not be bound (Hypercorn's error does
    not). Sockets already made are closed if a later one fails."""
    made: list[socket.socket] = []
    try:
        for bind in config.bind:
            one = copy.copy(config)
            one.bind = [bind]
            try:
                made.extend(one.create_sockets().insecure_sockets)
            except OSError as error:
                reason = error.strerror or str(error)
                raise OSError(error.errno, f"cannot listen on {bind}: {reason}") from None
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


async def serve_guarded(
    app: ASGIFramework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    stop_accepting: Callable[[], Awaitable[None]] | None = None,
    takeovers: Sequence[Takeover] = (),
    tls: TlsTerms | None = None,
    proxy_protocol: Callable[[], TrustedProxies | None] = lambda: None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` like ``hypercorn.trio.serve``, with :class:`GuardedTCPServer`.

    Connections that one of ``takeovers`` claims are served by it instead of Hypercorn.
    With ``tls``, every listener speaks TLS with its current context (relayd's
    own, not Hypercorn's: it can be reloaded, and the takeovers see the
    decrypted stream).

    ``task_status.started(binds)`` once every socket listens; returns after a
    graceful shutdown: when ``stop_accepting`` returns (``shutdown_trigger``
    when None), no new connection is accepted and idle ones close
    (:class:`Lifecycle`); when ``shutdown_trigger`` returns, open connections
    get up to ``config.graceful_timeout`` more.
    """
    if stop_accepting is None:
        stop_accepting = shutdown_trigger
    wrapped: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            if config.ssl_enabled:
                raise ValueError("TLS is relayd's own (relayd.tls), not Hypercorn's")
            listeners: list[trio.abc.Listener[Any]] = []
            binds = []
            for sock in _bind_each(config):
                sock.listen(config.backlog)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                where = repr_socket_addr(sock.family, sock.getsockname())
                if tls is None:
                    listeners.append(listener)
                    binds.append(f"http://{where}")
                else:
                    listeners.append(TlsListener(listener, tls))
                    binds.append(f"https://{where}")
            task_status.started(binds)
            writes = WriteLimits()
            life = Lifecycle()
            handler = partial(
                GuardedTCPServer,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                writes=writes,
                takeovers=takeovers,
                proxy_protocol=proxy_protocol,
                life=life,
            )
            accepting_stopped = trio.Event()

            async def stop_when_told() -> None:
                await stop_accepting()
                accepting_stopped.set()
                raise ShutdownError()

            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(stop_when_told)
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                # No new connections from here (they wait in the listening socket's
                # backlog for the next relayd); idle ones close, busy ones close
                # after the answer under way.
                life.stop_accepting()
                if accepting_stopped.is_set():  # the connections' grace starts later
                    with trio.CancelScope(shield=True):
                        await shutdown_trigger()
                await context.terminated.set()
                graceful_end = trio.current_time() + config.graceful_timeout
                server_nursery.cancel_scope.deadline = graceful_end
                writes.shut_down_by(graceful_end)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
