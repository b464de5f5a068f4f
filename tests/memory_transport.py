"""In-memory agent connections for session and dispatch tests.

:func:`transport_pair` returns the two ends of one fake WebSocket built from
trio memory channels:

* :class:`RelayEnd` implements the :class:`relayd.agents.session.Transport`
  protocol (``receive() -> str | bytes | None``, ``send(text)``,
  ``close(code, reason)``) and is what an :class:`AgentSession` runs on;
* :class:`AgentEnd` is the agent's side: push frames with :meth:`AgentEnd.send`,
  read the relay's frames with :meth:`AgentEnd.receive` (None once the relay
  closed), hang up with :meth:`AgentEnd.disconnect`, and see the close code
  and reason the relay chose.

:class:`MemoryAgent` is a scripted agent on an :class:`AgentEnd`, driven by the
sans-I/O :class:`relayd.protocol.AgentConnection`: it does the handshake
(optionally reclaiming an id), answers pings (unless told not to) and runs a
handler per request, concurrently, recording what it saw.

:func:`connect_agent` wires one up to a real host (the real ``Dispatcher``):
it starts ``AgentSession.run`` and the agent in a nursery and returns once the
session has been admitted (or refused).

:class:`Background` runs one call (an ask, a session call) in the background
and records how it ended and when; :func:`in_background` starts one and lets
everything settle. :func:`never` is a handler that never answers.

Both directions are unbounded, so a test agent that does not read never blocks
the relay's writer; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio
import trio.testing

from relayd.agents.auth import AgentKeys
from relayd.agents.heartbeat import Heartbeat
from relayd.agents.session import AgentSession, SessionHost
from relayd.config import Config
from relayd.dispatch import Dispatcher
from relayd.protocol import (
    AgentConnection,
    AgentError,
    Greeting,
    Ping,
    Reply,
    Request,
)

__all__ = [
    "HANG_UP",
    "AgentEnd",
    "Background",
    "Connected",
    "HangUp",
    "MemoryAgent",
    "RelayEnd",
    "connect_agent",
    "echo",
    "in_background",
    "never",
    "open_session",
    "transport_pair",
]

Message = str | bytes
T = TypeVar("T")


class RelayEnd:
    """The relay's end: the session's Transport."""

    def __init__(
        self,
        incoming: trio.MemoryReceiveChannel[Message],
        outgoing: trio.MemorySendChannel[str],
    ) -> None:
        self._incoming = incoming
        self._outgoing = outgoing
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.failure: tuple[int, str] | None = None  # never: frames arrive whole
        self.code_unknown = False
        self.close_calls = 0
        self.sent: list[str] = []  # every frame the relay sent, in order
        self.closed = trio.Event()
        # Protocol v2's heartbeat is a WebSocket ping: recorded here (trio times),
        # and answered at once through ``on_pong`` while ``answer_pings`` is true.
        self.pings: list[float] = []
        self.answer_pings = True
        self.on_pong: Callable[[], None] | None = None

    async def accept(self) -> bool:
        """The in-memory pair is connected from the start."""
        return True

    async def receive(self) -> Message | None:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    async def send(self, text: str) -> None:
        if self.close_code is not None:
            return
        self.sent.append(text)
        # If the agent hung up, return silently, like a WebSocket.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._outgoing.send(text)

    def send_nowait(self, text: str) -> Awaitable[None] | None:
        return self.send(text)

    def ping_nowait(self) -> Awaitable[None] | None:
        """A WebSocket ping (v2): recorded, and ponged at once unless told not to."""
        if self.close_code is None:
            self.pings.append(trio.current_time())
            if self.answer_pings and self.on_pong is not None:
                self.on_pong()
        return None

    async def close(self, code: int, reason: str) -> None:
        self.close_calls += 1
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self._outgoing.close()
        self._incoming.close()
        self.closed.set()


class AgentEnd:
    """The agent's end of the pair."""

    def __init__(
        self,
        relay: RelayEnd,
        outgoing: trio.MemorySendChannel[Message],
        incoming: trio.MemoryReceiveChannel[str],
    ) -> None:
        self._relay = relay
        self._outgoing = outgoing
        self._incoming = incoming

    async def send(self, message: Message) -> bool:
        """Push one frame to the relay; False if the relay has closed."""
        try:
            await self._outgoing.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def receive(self) -> str | None:
        """The relay's next frame; None once the relay closed (or we hung up)."""
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def disconnect(self) -> None:
        """Hang up: the relay's ``receive()`` returns None."""
        self._outgoing.close()

    @property
    def close_code(self) -> int | None:
        return self._relay.close_code

    @property
    def close_reason(self) -> str | None:
        return self._relay.close_reason

    async def wait_closed(self) -> None:
        await self._relay.closed.wait()


def transport_pair() -> tuple[RelayEnd, AgentEnd]:
    to_relay_send, to_relay_receive = trio.open_memory_channel[Message](math.inf)
    to_agent_send, to_agent_receive = trio.open_memory_channel[str](math.inf)
    relay = RelayEnd(to_relay_receive, to_agent_send)
    return relay, AgentEnd(relay, to_relay_send, to_agent_receive)


class HangUp:
    """Returned by a handler: the agent drops the connection instead of replying."""


HANG_UP = HangUp()

# A handler gets the request and returns the reply event, None to never answer,
# or HANG_UP to disconnect.
Handler = Callable[[Request], Awaitable[Reply | AgentError | HangUp | None]]


def echo(delay: float = 0.0, *, conversation: str | None = None) -> Handler:
    """Answer ``echo:<content>`` after ``delay`` (virtual) seconds."""

    async def handle(request: Request) -> Reply:
        if delay:
            await trio.sleep(delay)
        conversation_id = request.conversation_id or conversation or f"conv-{request.request_id}"
        return request.reply(
            f"resp-{request.request_id}", conversation_id, "echo:" + request.content
        )

    return handle


async def never(request: Request) -> None:
    """A handler that never answers."""
    await trio.sleep_forever()


@dataclass
class MemoryAgent:
    """A scripted agent: handshake, pongs, one handler task per request."""

    end: AgentEnd
    handler: Handler = field(default_factory=echo)
    reclaim_id: str | None = None
    answer_pings: bool = True
    connection: AgentConnection = field(default_factory=AgentConnection)
    connection_id: str | None = None
    offered_id: str | None = None
    requests: list[Request] = field(default_factory=list)
    pings: list[tuple[float, str]] = field(default_factory=list)  # (trio time, id)
    inflight: int = 0
    max_inflight: int = 0
    finished: trio.Event = field(default_factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the relay closes; ``started(id)`` once the Hello is sent."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    text = await self.end.receive()
                    if text is None:
                        break
                    event = self.connection.receive_text(text)
                    if isinstance(event, Greeting):
                        self.offered_id = event.connection_id
                        hello = (
                            event.reclaim(self.reclaim_id) if self.reclaim_id else event.accept()
                        )
                        await self.end.send(self.connection.send(hello))
                        self.connection_id = hello.connection_id
                        task_status.started(hello.connection_id)
                    elif isinstance(event, Ping):
                        self.pings.append((trio.current_time(), event.ping_id))
                        if self.answer_pings:
                            await self.end.send(self.connection.send(event.reply()))
                    elif isinstance(event, Request):
                        self.requests.append(event)
                        nursery.start_soon(self._work, event)
                nursery.cancel_scope.cancel()
        finally:
            self.connection.connection_lost()
            self.finished.set()

    async def _work(self, request: Request) -> None:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            outcome = await self.handler(request)
            if isinstance(outcome, HangUp):
                self.end.disconnect()
            elif outcome is not None and request.request_id in self.connection.pending:
                await self.end.send(self.connection.send(outcome))
        finally:
            self.inflight -= 1


@dataclass
class Connected:
    session: AgentSession
    agent: MemoryAgent
    end: AgentEnd
    relay: RelayEnd

    @property
    def agent_id(self) -> str:
        return self.session.agent_id

    def hang_up(self) -> None:
        self.end.disconnect()

    async def hang_up_and_wait(self) -> None:
        """Hang up, and wait until the relay has closed its end."""
        self.hang_up()
        await self.end.wait_closed()


def open_session(
    host: SessionHost, *, credential: str = "loopback", connection_id: str | None = None
) -> tuple[AgentSession, RelayEnd, AgentEnd]:
    """An AgentSession on ``host`` over a fresh transport pair, not yet running."""
    relay, end = transport_pair()
    session = AgentSession(
        relay, host, credential=credential, remote="memory", connection_id=connection_id
    )
    return session, relay, end


class EveryCredential(AgentKeys):
    """Agent keys that keep every credential: for tests of what follows admission
    by key (the key checks themselves are tested with real AgentKeys)."""

    def still_valid(self, credential: str) -> bool:
        return True


EVERY_CREDENTIAL = EveryCredential(frozenset(), allow_loopback_without_key=True)

D = TypeVar("D", bound=Dispatcher)


def dispatcher_for(
    config: Config, *, cls: type[D] = Dispatcher, agent_keys: AgentKeys = EVERY_CREDENTIAL
) -> D:
    """A dispatcher built as relayd.daemon.assemble builds it, with a heartbeat of its
    own that :func:`connect_agent` starts in the test's nursery (the daemon's job)."""
    return cls(config, agent_keys=agent_keys, heartbeat=Heartbeat(config.agents))


# The heartbeats whose run() a test nursery runs now.
_beating: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


async def _run_heartbeat(heartbeat: Heartbeat) -> None:
    _beating.add(heartbeat)
    try:
        await heartbeat.run()
    finally:
        _beating.discard(heartbeat)


def start_heartbeat(nursery: trio.Nursery, host: SessionHost) -> None:
    """Run a dispatcher's heartbeat in ``nursery`` unless it runs already, as the
    daemon runs it beside the server."""
    if isinstance(host, Dispatcher) and host.heartbeat not in _beating:
        _beating.add(host.heartbeat)  # at once, before the task starts
        nursery.start_soon(_run_heartbeat, host.heartbeat)


async def connect_agent(
    nursery: trio.Nursery,
    host: SessionHost,
    handler: Handler | None = None,
    *,
    credential: str = "loopback",
    reclaim_id: str | None = None,
    answer_pings: bool = True,
    connection_id: str | None = None,
) -> Connected:
    """Start a session for a new MemoryAgent on ``host``; return once it is admitted.

    "Admitted" means the handshake is done and every task has settled
    (``wait_all_tasks_blocked``), so the host has registered it or refused it.
    """
    start_heartbeat(nursery, host)
    session, relay, end = open_session(host, credential=credential, connection_id=connection_id)
    agent = MemoryAgent(end, handler or echo(), reclaim_id=reclaim_id, answer_pings=answer_pings)
    nursery.start_soon(session.run)
    await nursery.start(agent.run)
    await trio.testing.wait_all_tasks_blocked()
    return Connected(session, agent, end, relay)


class Background(Generic[T]):
    """A call running in the background: ``done`` once it returned (``value``), raised
    ``catch`` (``error``) or was cancelled through ``scope``; ``at`` is when it ended."""

    def __init__(self, call: Callable[[], Awaitable[T]], catch: type[Exception]) -> None:
        self.call = call
        self.catch = catch
        self.done = trio.Event()
        self.value: T | None = None
        self.error: Exception | None = None
        self.at: float | None = None
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        try:
            with self.scope:
                self.value = await self.call()
        except self.catch as error:
            self.error = error
        finally:
            self.at = trio.current_time()
            self.done.set()

    async def result(self) -> T:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.value is not None, "cancelled"
        return self.value


async def in_background(nursery: trio.Nursery, call: Background[T]) -> Background[T]:
    """Start ``call`` and let everything settle (so it is queued, or at an agent)."""
    nursery.start_soon(call.run)
    await trio.testing.wait_all_tasks_blocked()
    return call
