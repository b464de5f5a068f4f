"""One agent connection, from handshake to close.

An :class:`AgentSession` is its own supervisor. ``run()`` is awaited by the
WebSocket handler for the whole life of the connection; its task is the only
one the session has, and when it returns the transport is closed and nothing
of the session is left.

* **Reading.** ``run()`` reads frames and feeds them to the sans-I/O
  :class:`~relayd.protocol.RelayConnection`; every frame records when the
  agent was last heard from (``heard_at``). :meth:`request_close` ends the
  session by cancelling its one cancel scope.
* **Liveness** is the relay-wide :class:`~relayd.agents.heartbeat.Heartbeat`'s:
  it calls :meth:`ping` every ``heartbeat_interval`` and closes a session
  silent for ``heartbeat_timeout``. (Hypercorn answers WebSocket-level pings
  itself and never shows the app a pong, and browsers send none, so liveness
  is the protocol's own ``ping``/``pong``.)
* **Writing.** Requests and pings are written by other tasks; the transport
  keeps frames whole and in order, so the session needs no lock. A request's
  frame is sent shielded from its caller's cancellation but not past the
  caller's deadline: a frame half-given to the transport would otherwise
  leave the agent's slot taken by a request it never received.

Why one task per session, and not a reader, a writer and a heartbeat task:
an idle agent costs memory for as long as it is connected, and relayd holds
thousands of them. Extra tasks, a nursery, a channel, a lock and a second
scope would add about a fifth to an idle connection's footprint (relayd bench
idle-10000; figures in docs/performance.md). And the task wakes only
when the agent sends: a timer per session meant cancelling every idle
agent's read once per interval, which was most of the relay's idle CPU.

Requests are sent by other tasks with :meth:`ask`, on a slot the caller took
from the pool and hands over with the call. From then on the session alone
releases it: when the reply comes, when the session ends, or at once if the
request's frame never left. Never the caller: the seed protocol has no
cancel, so an abandoned request still occupies the agent.

The session knows nothing of HTTP, users or TOML; what it needs from its owner
is the :class:`SessionHost` interface, implemented by the dispatcher.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from relayd.config import AgentsConfig, RequestsConfig
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
    UnsendableText,
)
from relayd.protocol.v2 import (
    AgentHello,
    Cancel,
    ChatRequest,
    Delta,
    Drain,
    Goodbye,
    RelayConnectionV2,
    Update,
    V2State,
    Welcome,
)

__all__ = [
    "AdmissionRefused",
    "AgentSession",
    "Call",
    "RequestTooLarge",
    "SessionHost",
    "SessionLost",
    "Transport",
]

log = logging.getLogger("relayd.agents")

# Give up closing a socket politely after this long: a peer that stops reading
# can block a shielded send forever.
CLOSE_TIMEOUT = 5.0
# When a v2 agent told goodbye should reconnect (a restart takes about this long).
GOODBYE_RECONNECT = 1.0
# A session that sees this many protocol errors in a row is closed: a
# well-meaning agent never gets there, a broken one is not worth the log noise.
MAX_CONSECUTIVE_PROTOCOL_ERRORS = 20


class Transport(Protocol):
    """What a session needs from a WebSocket. Tests use an in-memory pair.

    Writes are whole frames, one at a time, in the order they were started;
    the transport serialises its writers.
    """

    async def accept(self) -> bool:
        """Complete the upgrade; False if the peer went away first."""

    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer has gone."""

    async def send(self, text: str) -> None:
        """Send one text message; may return silently if the peer has gone."""

    def send_nowait(self, text: str) -> Awaitable[None] | None:
        """Start sending one text message without waiting.

        None if it is sent (or the peer has gone); else what remains to do,
        which the caller must await. Frames started later go after it.
        """

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (no-op if already closed)."""

    @property
    def close_code(self) -> int | None:
        """The code of the agent's close frame once it has sent one (1005 if it
        had none); None if the agent went without one (or has not gone)."""

    @property
    def failure(self) -> tuple[int, str] | None:
        """The close code and reason with which the transport itself ended the
        connection (a malformed or oversized frame), or None."""

    def ping_nowait(self) -> Awaitable[None] | None:
        """Send a WebSocket ping (v2's heartbeat), as :meth:`send_nowait` sends text."""

    code_unknown: bool
    """The connection ended and the transport cannot tell how (Hypercorn's path)."""

    on_pong: Callable[[], None] | None
    """Called when the agent's WebSocket pong arrives (set by a v2 session)."""


async def _finish(rest: Awaitable[None]) -> None:
    await rest


class SessionLost(Exception):
    """The session ended before the agent answered the request."""


class RequestTooLarge(Exception):
    """A request whose frame would be larger than ``agents.max_message``: JSON
    escapes (a NUL becomes ``\\u0000``, twice over in the seed's double-encoded
    frames) can make a question within ``requests.max_content`` several times
    larger on the wire, past what agents accept."""


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

    def requests_config(self) -> RequestsConfig:
        """The current ``[requests]`` settings."""

    def capacity_changed(self, session: AgentSession, capacity: int) -> None:
        """A v2 agent announced a new capacity (or its hello did)."""

    def models_changed(self, session: AgentSession) -> None:
        """A v2 agent announced new models: waiters for them may now be served."""

    def draining(self, session: AgentSession) -> None:
        """A v2 agent takes no new work from now on."""


class SlowReader(Exception):
    """A streamed answer's pieces piled up past ``requests.max_response``
    because its client read them more slowly than the agent sent them."""


class Call:
    """The result of one request sent to an agent: for a streamed one, also its
    pieces as they come (v2 deltas; a v1 answer comes whole).

    The session's reader task adds pieces and the outcome; the asker's task
    takes them. Pieces wait here only while the asker writes the ones before:
    their size is bounded (``requests.max_response``) by the session.
    """

    __slots__ = (
        "_more",
        "_outcome",
        "abandoned",
        "delivered",
        "frame",
        "pending",
        "pending_size",
        "received_size",
        "request",
        "session",
        "streaming",
    )

    def __init__(
        self, session: AgentSession, request: Request | ChatRequest, frame: str, streaming: bool
    ) -> None:
        self.session = session
        self.request = request
        self.frame = frame
        self.streaming = streaming  # keep pieces for the asker
        self.pending: list[str] = []
        self.pending_size = 0
        self.received_size = 0  # characters of deltas so far (bounded by agents.max_message)
        self.delivered = 0  # pieces the asker has taken
        self._more = trio.Event()
        self._outcome: Reply | AgentError | SessionLost | SlowReader | None = None
        self.abandoned = False  # the caller stopped waiting (deadline, client gone)

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    def _push(self, text: str) -> None:
        if self.streaming and self._outcome is None:
            self.pending.append(text)
            self.pending_size += len(text)
            self._more.set()

    def _resolve(self, outcome: Reply | AgentError | SessionLost | SlowReader) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self._more.set()

    async def next_pieces(self) -> list[str] | None:
        """The pieces that came since the last call, waiting for some; None once
        the call is settled and every piece was taken."""
        while not self.pending:
            if self._outcome is not None:
                return None
            await self._more.wait()
            self._more = trio.Event()
        pieces, self.pending, self.pending_size = self.pending, [], 0
        self.delivered += len(pieces)
        return pieces

    async def result(self) -> Reply | AgentError:
        """Wait for the answer. Raises :class:`SessionLost` if the agent went away,
        :class:`SlowReader` if the asker fell too far behind."""
        while self._outcome is None:
            await self._more.wait()
            self._more = trio.Event()
        outcome = self._outcome
        if isinstance(outcome, SessionLost | SlowReader):
            raise outcome
        return outcome


class AgentSession:
    """One connected agent. Identified in logs as ``agent-<first 8 of its id>``."""

    __slots__ = (
        "__weakref__",
        "_calls",
        "_close_code",
        "_close_reason",
        "_closing",
        "_host",
        "_ping_count",
        "_protocol_errors",
        "_scope",
        "_transport",
        "_unsent",
        "agent_id",
        "capacity",
        "connected_at",
        "credential",
        "draining",
        "heard_at",
        "inflight",
        "last_message_at",
        "last_pong_at",
        "models",
        "name",
        "next_ping_at",
        "protocol",
        "remote",
        "software",
        "version",
    )

    def __init__(
        self,
        transport: Transport,
        host: SessionHost,
        *,
        credential: str,
        remote: str,
        connection_id: str | None = None,
        version: int = 1,
    ) -> None:
        self._transport = transport
        self._host = host
        self.credential = credential  # who the agent proved to be: "loopback" or a key hash
        self.remote = remote
        self.version = version  # the agent protocol's, negotiated in the upgrade
        offered = connection_id or str(uuid.uuid4())
        self.protocol: RelayConnection | RelayConnectionV2 = (
            RelayConnectionV2(offered) if version == 2 else RelayConnection(offered)
        )
        self.agent_id = offered  # may change to a reclaimed id
        self.models: tuple[str, ...] = ()  # v2: what the agent serves (empty: anything)
        self.name = ""  # v2: what the agent calls itself, and its software's version
        self.software = ""
        self.draining = False  # v2: the agent takes no new work
        self._unsent: list[Awaitable[None]] = []  # frames _handle could not finish
        self.capacity = host.agents_config().max_inflight
        self.inflight = 0  # maintained by the pool
        now = time.time()
        self.connected_at = now
        self.last_message_at = now
        self.last_pong_at: float | None = None
        self.heard_at = trio.current_time()  # the last frame from the agent, on trio's clock
        self.next_ping_at = math.inf  # set by the Heartbeat
        self._calls: dict[str, Call] = {}
        self._scope: trio.CancelScope | None = None
        self._closing = False  # request_close() was called
        self._ping_count = 0
        self._close_code = CloseCode.NORMAL
        self._close_reason = ""
        self._protocol_errors = 0

    def __str__(self) -> str:
        return f"agent-{self.agent_id[:8]}"

    @property
    def is_open(self) -> bool:
        """Whether the session is past its handshake and not closed (a draining
        v2 agent's is open, but takes no new requests)."""
        if self._scope is None:
            return False
        if isinstance(self.protocol, RelayConnectionV2):
            return self.protocol.state in (V2State.OPEN, V2State.DRAINING, V2State.GOING)
        return self.protocol.state is State.OPEN

    def serves(self, model: str | None) -> bool:
        """Whether a request for ``model`` (None: any) may go to this agent."""
        return model is None or not self.models or model in self.models

    # -- used by the dispatcher ------------------------------------------------

    async def ask(
        self,
        request: Request | ChatRequest,
        on_piece: Callable[[str], Awaitable[None]] | None = None,
        *,
        cancel_reason: Callable[[], str] = lambda: "cancelled",
    ) -> Reply | AgentError:
        """Send ``request`` on a slot the caller has taken, and wait for the answer.

        The caller hands its slot over with the call, and from then on this
        session is the one owner of the slot's life: it releases the slot
        (through :meth:`SessionHost.slot_freed`) when the agent answers, when
        the session ends (its host forgets the whole session), or, here, when
        anything at all fails before the request's frame has left: the frame
        cannot be built, the session is closed, the write fails or is cut
        short, the caller is cancelled. Such a failure also forgets the
        request, so that nothing waits for a reply to a frame that was never
        sent, and it propagates (:class:`SessionLost` for a closed session).

        ``on_piece`` is awaited with each piece of a streamed answer as it
        comes (v2 deltas; a v1 agent's answer is the final reply alone). If it
        falls more than ``requests.max_response`` behind the agent, the
        request ends with :class:`SlowReader`.

        If the caller stops waiting after the frame has left (its deadline,
        its client gone), a v2 agent is sent ``cancel`` (``cancel_reason()``
        says why) and the slot is freed at once; a v1 agent has no cancel, so
        its slot stays taken until it answers or goes.
        """
        sent = writing = False
        call: Call | None = None
        try:
            call = self._register(request, streaming=on_piece is not None)
            writing = True
            # Shielded so that a frame is never half-given to the transport, but
            # not past the caller's own deadline: the transport's write honours
            # it (relayd.front.sockets.WriteLimits) and closes the connection
            # of an agent that stopped reading.
            with trio.CancelScope(shield=True, deadline=trio.current_effective_deadline()) as scope:
                await self._transport.send(call.frame)
            if scope.cancelled_caught:
                await trio.lowlevel.checkpoint_if_cancelled()  # the caller's deadline
                raise SessionLost(f"{self}: the request frame was cut short")
            sent = True
        finally:
            if not sent:
                self._withdraw(request.request_id, call)
                if writing:
                    # However the write failed, the agent may hold part of a frame.
                    self.request_close(CloseCode.INTERNAL_ERROR, "a request frame was not sent")
        assert call is not None
        try:
            if on_piece is not None:
                while (pieces := await call.next_pieces()) is not None:
                    for piece in pieces:
                        await on_piece(piece)
            return await call.result()
        finally:
            call.abandoned = True
            if not call.settled or isinstance(call._outcome, SlowReader):
                await self._cancel(call, cancel_reason())

    async def _cancel(self, call: Call, reason: str) -> None:
        """Tell a v2 agent to stop a request nobody waits for, and free its slot now."""
        request_id = call.request.request_id
        if not isinstance(self.protocol, RelayConnectionV2):
            return  # v1 has no cancel: the agent's answer frees the slot
        if request_id not in self.protocol.outstanding or self._calls.get(request_id) is not call:
            return
        frame = self.protocol.send(Cancel(request_id, reason))
        del self._calls[request_id]
        self._host.slot_freed(self)
        log.info("request cancelled: %s request=%s reason=%s", self, request_id[:8], reason)
        rest = self._transport.send_nowait(frame)
        if rest is not None:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await rest

    def _register(self, request: Request | ChatRequest, *, streaming: bool) -> Call:
        """The call for ``request``, registered as in flight; SessionLost if closed."""
        if not self.is_open:
            raise SessionLost(f"{self} is closed")
        if isinstance(request, ChatRequest) and not isinstance(self.protocol, RelayConnectionV2):
            raise SessionLost(f"{self} speaks protocol v1, which has no chat requests")
        try:
            frame = self.protocol.send(request)  # type: ignore[arg-type]
        except UnsendableText:
            raise  # the request's fault: the session is fine
        except LocalProtocolError as error:
            raise SessionLost(f"{self}: {error}") from error
        try:
            limit = self._host.agents_config().max_message
            if len(frame) * 4 > limit and len(frame.encode("utf-8")) > limit:
                raise RequestTooLarge(
                    f"the request's frame to the agent would be over agents.max_message "
                    f"({limit} bytes) once encoded"
                )
            call = Call(self, request, frame, streaming)
            self._calls[request.request_id] = call
        except BaseException:
            self.protocol.withdraw(request.request_id)
            raise
        return call

    def _withdraw(self, request_id: str, call: Call | None) -> None:
        """Undo a request whose frame did not leave: forget it, free its slot."""
        if call is not None and self._calls.get(request_id) is call:
            del self._calls[request_id]
            self.protocol.withdraw(request_id)
        self._host.slot_freed(self)

    def ping(self, slow_sends: trio.Nursery) -> None:
        """Send a ping now (the Heartbeat calls this): v1's JSON ``ping``, the
        one the seed's agents expect; for v2 a WebSocket ping, which the agent's
        library answers without waking its application.

        Written straight to the transport when it takes the frame at once;
        otherwise finished by a task in ``slow_sends``.
        """
        if isinstance(self.protocol, RelayConnectionV2):
            rest = self._transport.ping_nowait()
        else:
            self._ping_count += 1
            try:
                frame = self.protocol.send(Ping(f"ping-{self._ping_count}"))
            except LocalProtocolError:
                return  # closing
            rest = self._transport.send_nowait(frame)
        if rest is not None:
            slow_sends.start_soon(_finish, rest)

    def _ponged(self) -> None:
        self.heard_at = trio.current_time()
        self.last_pong_at = time.time()

    def request_close(self, code: int, reason: str) -> None:
        """End the session from outside (shutdown, reclaim, revoked key)."""
        if self._scope is not None and not self._closing:
            self._closing = True
            self._close_code = code
            self._close_reason = reason
            self._scope.cancel()

    # -- the session's life -------------------------------------------------------

    async def run(self) -> None:
        """Run the session to its end; the transport is closed on return.

        Never raises for anything the agent does; cancellation propagates.
        """
        if not await self._transport.accept():
            return
        admitted = False
        reason = "closed"
        logged_code: int | None = None  # the agent's, when it ended the connection
        try:
            hello = await self._greet()
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
            if isinstance(self.protocol, RelayConnectionV2):
                settings = self._host.agents_config()
                welcome = Welcome(self.agent_id, settings.heartbeat_interval)
                self._transport.on_pong = self._ponged
                await self._transport.send(self.protocol.send(welcome))
            log.info(
                "agent connected: %s remote=%s%s%s",
                self,
                self.remote,
                " (reclaimed its id)"
                if hello.is_reclaim and self.agent_id == hello.connection_id
                else "",
                f" protocol=2 capacity={self.capacity} models={','.join(self.models) or '(any)'}"
                if self.version == 2
                else "",
            )
            # Read frames until the agent goes. Liveness is the relay-wide
            # Heartbeat's job (it pings, and drops a silent agent with
            # request_close), so this task wakes only when the agent sends.
            ended: str | None = None
            with trio.CancelScope() as self._scope:
                if self._closing:
                    self._scope.cancel()
                while ended is None:
                    message = await self._transport.receive()
                    if message is None:
                        logged_code = self._transport.close_code
                        failure = self._transport.failure
                        if failure is not None:
                            logged_code, ended = failure[0], f"closed by relayd: {failure[1]}"
                            log.warning("agent sent a bad frame, closing: %s: %s", self, failure[1])
                        elif logged_code is None and getattr(
                            self._transport, "code_unknown", False
                        ):
                            logged_code = CloseCode.ABNORMAL_CLOSURE
                            ended = (
                                "the agent's connection ended (Hypercorn's path does not say how)"
                            )
                        elif logged_code is None:
                            logged_code = CloseCode.ABNORMAL_CLOSURE
                            ended = "agent went away without a close frame"
                        else:
                            ended = "agent closed the connection"
                        break
                    self.heard_at = trio.current_time()
                    self.last_message_at = time.time()
                    if not self._handle(message):
                        ended = self._close_reason
                    while self._unsent:
                        await self._unsent.pop(0)
            if ended is None:
                ended = self._close_reason or "closed by relayd"
            reason = ended
        except Exception:  # isolation boundary: one agent session, never the daemon
            log.exception("agent session failed: %s remote=%s", self, self.remote)
            self._close_code = CloseCode.INTERNAL_ERROR
            self._close_reason = "internal error"
            reason = "internal error"
        finally:
            if self._close_code == CloseCode.GOING_AWAY:
                # Before the protocol is told the connection is lost: after that it
                # would refuse the frame.
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self._say_goodbye()
            lost = self.protocol.connection_lost()
            for request_id in lost.outstanding:
                call = self._calls.pop(request_id, None)
                if call is not None:
                    call._resolve(SessionLost(f"{self} disconnected before replying"))
            if isinstance(self.protocol, RelayConnectionV2):
                self._transport.on_pong = None
            if admitted:
                self._host.remove(self)
                log.info(
                    "agent disconnected: %s reason=%s code=%d lost_requests=%d",
                    self,
                    reason,
                    self._close_code if logged_code is None else logged_code,
                    len(lost.outstanding),
                )
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._transport.close(self._close_code, self._close_reason[:120])

    async def _say_goodbye(self) -> None:
        """Tell a v2 agent that the relay is going and when to come back."""
        if isinstance(self.protocol, RelayConnectionV2):
            goodbye = Goodbye(self._close_reason or "relayd is going away", GOODBYE_RECONNECT)
            try:
                frame = self.protocol.send(goodbye)
            except LocalProtocolError:
                return  # closed already
            await self._transport.send(frame)

    async def _greet(self) -> Hello | None:
        """Greet and read the agent's answer within ``handshake_timeout``.

        v1: the relay offers an id, the agent answers with the one it wants.
        v2: the agent says hello first (its capacity, models, the id it had);
        the relay's welcome follows admission (see :meth:`run`).
        None (with the close code and reason set) if the handshake fails.
        """
        timeout = self._host.agents_config().handshake_timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as self._scope:
            if isinstance(self.protocol, RelayConnection):
                greeting = Greeting(self.protocol.connection_id)
                await self._transport.send(self.protocol.send(greeting))
            return await self._handshake()
        if not self._closing:
            log.warning("agent handshake timed out after %.1fs remote=%s", timeout, self.remote)
            self._close_code = CloseCode.POLICY_VIOLATION
            self._close_reason = "handshake timeout"
        return None

    async def _handshake(self) -> Hello | None:
        message = await self._transport.receive()
        if message is None:
            self._close_reason = "disconnected during the handshake"
            return None
        try:
            if isinstance(message, bytes):
                raise RemoteProtocolError(
                    f"binary frame of {len(message)} bytes; the protocol is text only",
                    close_code=CloseCode.PROTOCOL_ERROR,
                )
            hello = self.protocol.receive_text(message)
        except RemoteProtocolError as error:
            log.warning("agent handshake failed: %s remote=%s", error, self.remote)
            self._close_code = CloseCode.PROTOCOL_ERROR
            self._close_reason = f"handshake failed: {error}"
            return None
        self.heard_at = trio.current_time()
        self.last_message_at = time.time()
        if isinstance(hello, AgentHello):
            self.name, self.software, self.models = hello.name, hello.version, hello.models
            self.capacity = hello.capacity
            offered = self.protocol.connection_id
            return Hello(hello.resume or offered, offered)
        assert isinstance(hello, Hello)
        return hello

    def _handle(self, message: str | bytes) -> bool:
        """Process one frame; False when the session must end."""
        settings = self._host.agents_config()
        size = len(message)
        if isinstance(message, str) and size * 4 > settings.max_message:
            size = len(message.encode("utf-8", "surrogatepass"))  # the limit is in bytes
        if size > settings.max_message:
            self._close_code = CloseCode.MESSAGE_TOO_BIG
            self._close_reason = f"message over {settings.max_message} bytes"
            log.warning("agent sent an oversized message, closing: %s", self)
            return False
        try:
            if isinstance(message, bytes):
                raise RemoteProtocolError(
                    f"binary frame of {len(message)} bytes; the protocol is text only"
                )
            event = self.protocol.receive_text(message)
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
        elif isinstance(event, Delta):
            self._delta(event, settings)
        elif isinstance(event, Reply | AgentError):
            call = self._calls.pop(event.request_id, None)
            if call is not None:
                if call.abandoned:
                    log.debug("late reply dropped: %s request=%s", self, event.request_id)
                call._resolve(event)
            self._host.slot_freed(self)
        elif isinstance(event, Update):
            self._update(event)
        elif isinstance(event, Drain) and not self.draining:
            self.draining = True
            log.info("agent draining: %s inflight=%d", self, self.inflight)
            self._host.draining(self)
        return True

    def _delta(self, delta: Delta, settings: AgentsConfig) -> None:
        call = self._calls.get(delta.request_id)
        if call is None:
            return
        call.received_size += len(delta.text)
        if call.received_size <= settings.max_message:
            call._push(delta.text)
        if call.received_size > settings.max_message:
            call._resolve(
                AgentError(
                    delta.request_id,
                    f"the answer grew past agents.max_message ({settings.max_message} characters)",
                    retryable=False,
                )
            )
            self._cancel_now(call, "the answer grew past agents.max_message")
        elif call.pending_size > self._host.requests_config().max_response:
            log.warning(
                "client reads too slowly, request cancelled: %s request=%s "
                "(requests.max_response behind)",
                self,
                delta.request_id[:8],
            )
            reason = "the client read the answer more slowly than it came"
            call._resolve(SlowReader(reason))
            # At once, from here: the asker may be stuck writing to its client.
            self._cancel_now(call, reason)

    def _cancel_now(self, call: Call, reason: str) -> None:
        """:meth:`_cancel` from the session's own task, which cannot wait here: a
        frame the socket does not take at once is finished by :meth:`run`."""
        request_id = call.request.request_id
        if not isinstance(self.protocol, RelayConnectionV2):
            return
        if request_id not in self.protocol.outstanding or self._calls.get(request_id) is not call:
            return
        frame = self.protocol.send(Cancel(request_id, reason))
        del self._calls[request_id]
        self._host.slot_freed(self)
        log.info("request cancelled: %s request=%s reason=%s", self, request_id[:8], reason)
        rest = self._transport.send_nowait(frame)
        if rest is not None:
            self._unsent.append(rest)

    def _update(self, update: Update) -> None:
        if update.models is not None and update.models != self.models:
            self.models = update.models
            log.info("agent models: %s %s", self, ", ".join(self.models) or "(any)")
            self._host.models_changed(self)
        if update.capacity is not None and update.capacity != self.capacity:
            log.info("agent capacity: %s %d", self, update.capacity)
            self._host.capacity_changed(self, update.capacity)
