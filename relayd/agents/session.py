"""One agent connection, from handshake to close.

An :class:`AgentSession` is its own supervisor. ``run()`` is awaited by the
WebSocket handler for the whole life of the connection and owns a nursery with
exactly one child, the writer; the handler's own task is the reader. When
``run()`` returns, the transport is closed and nothing of the session is left
running.

* **Reader** (the caller's task): reads frames, feeds them to the sans-I/O
  :class:`~relayd.protocol.RelayConnection`, resolves the one-shot result of a
  request when its reply comes. It runs inside a cancel scope whose deadline
  moves forward with every frame the agent sends: when the agent is silent for
  ``heartbeat_timeout`` the deadline passes and the session ends.
* **Writer**: the only task that sends on the transport. It takes frames from a
  bounded channel and sends a protocol ``ping`` whenever ``heartbeat_interval``
  passes (Hypercorn answers WebSocket-level pings itself and never shows the
  app a pong, so liveness is the protocol's own ``ping``/``pong``).

Requests are started by other tasks with :meth:`start_call` (synchronous: it
cannot be interrupted between taking the agent's slot and queueing the frame)
and awaited with :meth:`Call.result`. The slot is released by the session, when
the reply comes or the session ends, never by the caller: the seed protocol has
no cancel, so an abandoned request still occupies the agent.

The session knows nothing of HTTP, users or TOML; what it needs from its owner
is the :class:`SessionHost` interface, implemented by the dispatcher.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Protocol

import trio

from relayd.config import AgentsConfig
from relayd.protocol import (
    AgentError,
    CloseCode,
    Greeting,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    RelayConnection,
    RemoteProtocolError,
    Reply,
    Request,
    State,
)

__all__ = [
    "AdmissionRefused",
    "AgentSession",
    "Call",
    "SessionHost",
    "SessionLost",
    "Transport",
]

log = logging.getLogger("relayd.agents")

# Give up closing a socket politely after this long: a peer that stops reading
# can block a shielded send forever.
CLOSE_TIMEOUT = 5.0
# A session that sees this many protocol errors in a row is closed: a
# well-meaning agent never gets there, a broken one is not worth the log noise.
MAX_CONSECUTIVE_PROTOCOL_ERRORS = 20


class Transport(Protocol):
    """What a session needs from a WebSocket. Tests use an in-memory pair."""

    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer has gone."""

    async def send(self, text: str) -> None:
        """Send one text message; may return silently if the peer has gone."""

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (no-op if already closed)."""


class SessionLost(Exception):
    """The session ended before the agent answered the request."""


class AdmissionRefused(Exception):
    """The host would not register the session (for instance, too many agents)."""

    def __init__(self, reason: str, close_code: int = CloseCode.TRY_AGAIN_LATER) -> None:
        super().__init__(reason)
        self.close_code = close_code


class SessionHost(Protocol):
    """What a session tells its owner about. Implemented by the dispatcher."""

    def admit(self, session: AgentSession, hello: Hello) -> None:
        """Register a session after its handshake; sets ``session.agent_id``.

        Raises :class:`AdmissionRefused`.
        """

    def slot_freed(self, session: AgentSession) -> None:
        """One of the session's requests is over (answered or lost)."""

    def remove(self, session: AgentSession) -> None:
        """The session is over; forget it. Called once, after ``admit``."""

    def agents_config(self) -> AgentsConfig:
        """The current ``[agents]`` settings (they change on reload)."""


class Call:
    """The one-shot result of one request sent to an agent."""

    __slots__ = ("_done", "_outcome", "abandoned", "request", "session")

    def __init__(self, session: AgentSession, request: Request) -> None:
        self.session = session
        self.request = request
        self._done = trio.Event()
        self._outcome: Reply | AgentError | SessionLost | None = None
        self.abandoned = False  # the caller stopped waiting (deadline, client gone)

    def _resolve(self, outcome: Reply | AgentError | SessionLost) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self._done.set()

    async def result(self) -> Reply | AgentError:
        """Wait for the answer. Raises :class:`SessionLost` if the agent went away."""
        await self._done.wait()
        outcome = self._outcome
        if isinstance(outcome, SessionLost):
            raise outcome
        assert outcome is not None
        return outcome


class AgentSession:
    """One connected agent. Identified in logs as ``agent-<first 8 of its id>``."""

    __slots__ = (
        "__weakref__",
        "_calls",
        "_close_code",
        "_close_reason",
        "_host",
        "_outbox_receive",
        "_outbox_send",
        "_protocol_errors",
        "_scope",
        "_transport",
        "agent_id",
        "capacity",
        "connected_at",
        "credential",
        "inflight",
        "last_message_at",
        "last_pong_at",
        "protocol",
        "remote",
    )

    def __init__(
        self,
        transport: Transport,
        host: SessionHost,
        *,
        credential: str,
        remote: str,
        connection_id: str | None = None,
    ) -> None:
        self._transport = transport
        self._host = host
        self.credential = credential  # who the agent proved to be: "loopback" or a key hash
        self.remote = remote
        self.protocol = RelayConnection(connection_id or str(uuid.uuid4()))
        self.agent_id = self.protocol.connection_id  # may change to a reclaimed id
        self.capacity = host.agents_config().max_inflight
        self.inflight = 0  # maintained by the pool
        now = time.time()
        self.connected_at = now
        self.last_message_at = now
        self.last_pong_at: float | None = None
        self._calls: dict[str, Call] = {}
        # Bounded by the agent's capacity: at most one frame per slot is queued.
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[str](1000)
        self._scope: trio.CancelScope | None = None
        self._close_code = CloseCode.NORMAL
        self._close_reason = ""
        self._protocol_errors = 0

    def __str__(self) -> str:
        return f"agent-{self.agent_id[:8]}"

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN and self._scope is not None

    # -- used by the dispatcher ------------------------------------------------

    def start_call(self, request: Request) -> Call:
        """Queue ``request`` for the agent; never blocks, never checkpoints.

        The caller must hold one of the session's slots (taken from the pool).
        Raises :class:`SessionLost` if the session is no longer open.
        """
        if not self.is_open:
            raise SessionLost(f"{self} is closed")
        try:
            text = self.protocol.send(request)
        except LocalProtocolError as error:
            raise SessionLost(f"{self}: {error}") from error
        call = Call(self, request)
        self._calls[request.request_id] = call
        try:
            self._outbox_send.send_nowait(text)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            del self._calls[request.request_id]
            self.protocol.outstanding.discard(request.request_id)
            raise SessionLost(f"{self} cannot take more frames") from None
        return call

    def request_close(self, code: int, reason: str) -> None:
        """End the session from outside (shutdown, reclaim, revoked key)."""
        if self._scope is not None and not self._scope.cancel_called:
            self._close_code = code
            self._close_reason = reason
            self._scope.cancel()

    # -- the session's life -------------------------------------------------------

    async def run(self) -> None:
        """Run the session to its end; the transport is closed on return.

        Never raises for anything the agent does; cancellation propagates.
        """
        admitted = False
        reason = "closed"
        try:
            with trio.CancelScope() as self._scope:
                greeting = self.protocol.send(Greeting(self.protocol.connection_id))
                await self._transport.send(greeting)
                hello = await self._handshake()
                if hello is None:
                    return
                try:
                    self._host.admit(self, hello)
                except AdmissionRefused as refusal:
                    self._close_code = refusal.close_code
                    self._close_reason = str(refusal)
                    log.warning("agent refused: %s remote=%s", refusal, self.remote)
                    return
                admitted = True
                log.info(
                    "agent connected: %s remote=%s%s",
                    self,
                    self.remote,
                    " (reclaimed its id)"
                    if hello.is_reclaim and self.agent_id == hello.connection_id
                    else "",
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    reason = await self._read_loop()
                    nursery.cancel_scope.cancel()
            if self._scope.cancelled_caught:
                reason = self._close_reason or "closed by relayd"
        finally:
            lost = self.protocol.connection_lost()
            for request_id in lost.outstanding:
                call = self._calls.pop(request_id, None)
                if call is not None:
                    call._resolve(SessionLost(f"{self} disconnected before replying"))
            self._outbox_send.close()
            if admitted:
                self._host.remove(self)
                log.info(
                    "agent disconnected: %s reason=%s code=%d lost_requests=%d",
                    self,
                    reason,
                    self._close_code,
                    len(lost.outstanding),
                )
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._transport.close(self._close_code, self._close_reason[:120])

    async def _handshake(self) -> Hello | None:
        """The agent's answer to the greeting, or None (and a close code) if it fails."""
        timeout = self._host.agents_config().handshake_timeout
        with trio.move_on_after(timeout):
            message = await self._transport.receive()
            if message is None:
                self._close_reason = "disconnected during the handshake"
                return None
            try:
                if isinstance(message, bytes):
                    self.protocol.receive_bytes(message)
                hello = self.protocol.receive_text(message)  # type: ignore[arg-type]
            except RemoteProtocolError as error:
                log.warning("agent handshake failed: %s remote=%s", error, self.remote)
                self._close_code = CloseCode.PROTOCOL_ERROR
                self._close_reason = f"handshake failed: {error}"
                return None
            assert isinstance(hello, Hello)
            self.last_message_at = time.time()
            return hello
        log.warning("agent handshake timed out after %.1fs remote=%s", timeout, self.remote)
        self._close_code = CloseCode.POLICY_VIOLATION
        self._close_reason = "handshake timeout"
        return None

    async def _read_loop(self) -> str:
        """Read until the agent goes or goes silent; returns why it ended."""
        settings = self._host.agents_config()
        with trio.CancelScope(deadline=trio.current_time() + settings.heartbeat_timeout) as alive:
            while True:
                message = await self._transport.receive()
                if message is None:
                    return "agent closed the connection"
                self.last_message_at = time.time()
                alive.deadline = trio.current_time() + self._host.agents_config().heartbeat_timeout
                if not self._handle(message):
                    return self._close_reason
        self._close_code = CloseCode.GOING_AWAY
        self._close_reason = "heartbeat timeout"
        log.warning("agent silent for %.1fs, dropping it: %s", settings.heartbeat_timeout, self)
        return "heartbeat timeout"

    def _handle(self, message: str | bytes) -> bool:
        """Process one frame; False when the session must end."""
        settings = self._host.agents_config()
        if len(message) > settings.max_message:
            self._close_code = CloseCode.MESSAGE_TOO_BIG
            self._close_reason = f"message over {settings.max_message} bytes"
            log.warning("agent sent an oversized message, closing: %s", self)
            return False
        try:
            if isinstance(message, bytes):
                self.protocol.receive_bytes(message)
            event = self.protocol.receive_text(message)  # type: ignore[arg-type]
        except RemoteProtocolError as error:
            self._protocol_errors += 1
            if error.close_code is not None or (
                self._protocol_errors >= MAX_CONSECUTIVE_PROTOCOL_ERRORS
            ):
                self._close_code = error.close_code or CloseCode.POLICY_VIOLATION
                self._close_reason = f"protocol error: {error}"
                log.warning("agent protocol error, closing: %s: %s", self, error)
                return False
            log.info("agent protocol error, frame dropped: %s: %s", self, error)
            return True
        self._protocol_errors = 0
        if isinstance(event, Pong):
            self.last_pong_at = self.last_message_at
        elif isinstance(event, Reply | AgentError):
            call = self._calls.pop(event.request_id, None)
            if call is not None:
                if call.abandoned:
                    log.debug("late reply dropped: %s request=%s", self, event.request_id)
                call._resolve(event)
            self._host.slot_freed(self)
        return True

    async def _write_loop(self) -> None:
        """The only sender: queued frames, and a ping every heartbeat interval."""
        next_ping = trio.current_time() + self._host.agents_config().heartbeat_interval
        ping_ids = 0
        while True:
            text: str | None = None
            with trio.move_on_at(next_ping):
                text = await self._outbox_receive.receive()
            if text is None:
                ping_ids += 1
                text = self.protocol.send(Ping(f"ping-{ping_ids}"))
                next_ping = trio.current_time() + self._host.agents_config().heartbeat_interval
            await self._transport.send(text)
            # Hypercorn's send returns without a checkpoint once the peer has
            # gone; make sure this loop can never spin without yielding.
            await trio.lowlevel.checkpoint()
