"""The agent's side of the protocol over trio-websocket.

:func:`run_agent` connects to a relay, does the handshake, answers pings and
runs a handler for each request, several at once up to ``capacity``, replying
in whatever order they finish. It is what ``relayd bench`` simulates agents
with, what the tests use as a well-behaved agent, and the core of a reference
agent that bridges to a real backend.

A handler receives the :class:`~relayd.protocol.Request` and returns
``(response_id, conversation_id, content)``; raising :class:`HandlerError`
sends the protocol's ``error`` reply with its text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import trio
from trio_websocket import (
    ConnectionClosed,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from relayd import __version__
from relayd.protocol import AgentConnection, AgentError, Greeting, Ping, Reply, Request
from relayd.protocol.v2 import (
    SUBPROTOCOL,
    AgentConnectionV2,
    AgentHello,
    Cancel,
    ChatRequest,
    Delta,
    Drain,
    Goodbye,
    Update,
    Welcome,
)

__all__ = [
    "AgentProfile",
    "AgentStats",
    "Finish",
    "HandlerError",
    "HandlerFailure",
    "RelayRefusedV2",
    "V2Agent",
    "V2Handler",
    "V2Stats",
    "echo_handler",
    "echo_stream_handler",
    "run_agent",
    "serve_agent",
]

log = logging.getLogger("relayd.agentkit")

Handler = Callable[[Request], Awaitable[tuple[str, str, str]]]


class HandlerError(Exception):
    """Raised by a handler: the relay gets an ``error`` reply with this text."""


@dataclass
class AgentStats:
    """What one simulated agent saw; the tests and the bench read it."""

    connection_id: str | None = None
    requests: int = 0
    replies: int = 0
    errors: int = 0
    pings: int = 0
    inflight: int = 0
    max_inflight: int = 0
    contents: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None


def echo_handler(delay: float = 0.0) -> Handler:
    """A handler that answers ``echo:<content>`` after ``delay`` seconds, keeping
    the conversation id (a fresh one for a new conversation)."""

    async def handle(request: Request) -> tuple[str, str, str]:
        if delay:
            await trio.sleep(delay)
        conversation = request.conversation_id or str(uuid.uuid4())
        return str(uuid.uuid4()), conversation, "echo:" + request.content

    return handle


async def serve_agent(
    ws: WebSocketConnection,
    handler: Handler,
    *,
    reclaim_id: str | None = None,
    stats: AgentStats | None = None,
    inline: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Speak the agent protocol on an open WebSocket until it closes.

    ``task_status.started(connection_id)`` once the handshake is answered.
    Returns when the relay closes the socket. Each request's handler runs in a
    task of its own, so that requests are answered concurrently; with
    ``inline`` it runs in the task that reads them, one at a time, which saves
    a task per request for handlers that never wait (the bench's instant
    agents).
    """
    stats = stats if stats is not None else AgentStats()
    connection = AgentConnection()

    async def send(text: str) -> None:
        # trio-websocket writes whole frames one at a time, in order (its own
        # FIFO lock), so concurrent replies need no lock of ours: a second lock
        # would cost a pass through the scheduler on every reply.
        # On a close, the reader sees it and ends the session.
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(text)

    async def work(request: Request) -> None:
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        try:
            try:
                response_id, conversation_id, content = await handler(request)
            except HandlerError as error:
                stats.errors += 1
                await send(connection.send(request.fail(str(error))))
                return
            stats.replies += 1
            await send(connection.send(request.reply(response_id, conversation_id, content)))
        finally:
            stats.inflight -= 1

    async with trio.open_nursery() as nursery:
        try:
            while True:
                event = connection.receive_text(str(await ws.get_message()))
                if isinstance(event, Greeting):
                    hello = event.reclaim(reclaim_id) if reclaim_id else event.accept()
                    await send(connection.send(hello))
                    stats.connection_id = hello.connection_id
                    task_status.started(hello.connection_id)
                elif isinstance(event, Ping):
                    stats.pings += 1
                    await send(connection.send(event.reply()))
                elif isinstance(event, Request):
                    stats.requests += 1
                    stats.contents.append(event.content)
                    if inline:
                        await work(event)
                    else:
                        nursery.start_soon(work, event)
        except ConnectionClosed as closed:
            if closed.reason is not None:
                stats.close_code = closed.reason.code
                stats.close_reason = closed.reason.reason
        finally:
            connection.connection_lost()
            nursery.cancel_scope.cancel()


async def run_agent(
    url: str,
    handler: Handler,
    *,
    reclaim_id: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    stats: AgentStats | None = None,
    inline: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> AgentStats:
    """Connect to ``url`` (``ws://host:port/client/register``) and serve until closed.

    ``inline``: see :func:`serve_agent`.
    """
    stats = stats if stats is not None else AgentStats()
    async with open_websocket_url(url, extra_headers=headers or [], message_queue_size=16) as ws:
        await serve_agent(
            ws,
            handler,
            reclaim_id=reclaim_id,
            stats=stats,
            inline=inline,
            task_status=task_status,
        )
    return stats


# -- protocol v2 ------------------------------------------------------------------------


@dataclass(frozen=True)
class Finish:
    """What a v2 handler may yield last: the ids and details of its answer.

    Without one, the answer gets a fresh ``response_id`` and keeps the
    request's conversation (a fresh one for a new conversation).
    """

    response_id: str | None = None
    conversation_id: str | None = None
    finish_reason: str | None = "stop"
    usage: dict[str, int] | None = None


class HandlerFailure(Exception):
    """Raised by a v2 handler: the relay gets an ``error`` with this code,
    message and retryable flag (see relayd.protocol.v2.ERROR_CODES)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


V2Handler = Callable[[Request | ChatRequest], AsyncIterator[str | Finish]]


@dataclass
class AgentProfile:
    """What a v2 agent says in its hello."""

    name: str = "relayd.agentkit"
    version: str = __version__
    capacity: int = 1
    models: tuple[str, ...] = ()


@dataclass
class V2Stats:
    """What one v2 agent saw: the tests and the reference agent read it."""

    agent_id: str | None = None
    connections: int = 0
    requests: int = 0
    replies: int = 0
    errors: int = 0
    cancels: list[str] = field(default_factory=list)  # ids the relay cancelled
    cancel_times: list[float] = field(default_factory=list)  # trio clock, when each came
    inflight: int = 0
    max_inflight: int = 0
    contents: list[str] = field(default_factory=list)
    goodbyes: list[Goodbye] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None


class RelayRefusedV2(Exception):
    """The relay did not accept the ``relayd.v2`` subprotocol (an older relayd?)."""


class V2Agent:
    """An agent speaking protocol v2: hello, handlers that stream, cancel, drain.

    :meth:`serve` runs one connection; :meth:`run` connects, serves, and
    reconnects with exponential backoff and full jitter (capped), resuming
    its agent id, until cancelled or drained. The handler runs in a task of
    its own per request, in a cancel scope that the relay's ``cancel`` (or a
    lost connection) cancels.
    """

    def __init__(
        self,
        url: str,
        handler: V2Handler,
        profile: AgentProfile | None = None,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        stats: V2Stats | None = None,
        backoff_first: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.url = url
        self.handler = handler
        self.profile = profile or AgentProfile()
        self.headers = headers or []
        self.stats = stats if stats is not None else V2Stats()
        self.backoff_first = backoff_first
        self.backoff_cap = backoff_cap
        self.agent_id: str | None = None  # resumed on reconnect
        self._connection: AgentConnectionV2 | None = None
        self._ws: WebSocketConnection | None = None
        self._scopes: dict[str, trio.CancelScope] = {}
        self._draining = False
        self._idle = trio.Event()
        self._welcomes = 0  # how many connections got as far as the welcome

    # -- control ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Take no new work, finish what is in flight, then close (and stay closed)."""
        self._draining = True
        if self._connection is not None and self._ws is not None:
            await self._send(self._connection.send(Drain()))
            if not self._scopes:
                await self._ws.aclose()

    async def update(
        self, *, capacity: int | None = None, models: tuple[str, ...] | None = None
    ) -> None:
        """Announce a new capacity or model list."""
        if capacity is not None:
            self.profile.capacity = capacity
        if models is not None:
            self.profile.models = models
        if self._connection is not None:
            await self._send(self._connection.send(Update(capacity, models)))

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and serve until drained or cancelled, reconnecting when the
        connection drops (full jitter backoff) or the relay says goodbye."""
        failures = 0
        started = False
        while not self._draining:
            wait = 0.0
            welcomed = self._welcomes
            try:
                goodbye = await self._connect_once(task_status if not started else None)
                started = started or self.agent_id is not None
                if goodbye is not None:
                    wait = goodbye.reconnect_after
                    failures = 0
                elif self._welcomes > welcomed:
                    failures = 0  # it was serving: reconnect at once
                else:
                    failures += 1  # accepted, then closed before the welcome: back off
            except (OSError, HandshakeError, ConnectionClosed, DisconnectionTimeout) as error:
                failures += 1
                log.info("relay unreachable (%s); retrying", type(error).__name__)
            if self._draining:
                break
            if failures:
                ceiling = min(self.backoff_cap, self.backoff_first * 2 ** (failures - 1))
                wait = max(wait, random.uniform(0, ceiling))
            await trio.sleep(wait)

    async def _connect_once(self, task_status: trio.TaskStatus[str] | None) -> Goodbye | None:
        async with open_websocket_url(
            self.url,
            subprotocols=[SUBPROTOCOL],
            extra_headers=self.headers,
            message_queue_size=16,
        ) as ws:
            return await self.serve(ws, task_status=task_status)

    async def serve(
        self, ws: WebSocketConnection, *, task_status: trio.TaskStatus[str] | None = None
    ) -> Goodbye | None:
        """Speak v2 on an open WebSocket until it closes; the relay's goodbye, if any."""
        if ws.subprotocol != SUBPROTOCOL:
            raise RelayRefusedV2(f"the relay answered subprotocol {ws.subprotocol!r}")
        connection = AgentConnectionV2()
        self._connection, self._ws = connection, ws
        self.stats.connections += 1
        profile = self.profile
        goodbye: Goodbye | None = None
        hello = AgentHello(
            profile.name, profile.version, profile.capacity, profile.models, self.agent_id
        )
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await ws.send_message(connection.hello(hello))
                    while True:
                        event = connection.receive_text(str(await ws.get_message()))
                        if isinstance(event, Welcome):
                            self._welcomes += 1
                            self.agent_id = self.stats.agent_id = event.agent_id
                            if task_status is not None:
                                task_status.started(event.agent_id)
                                task_status = None
                        elif isinstance(event, Request | ChatRequest):
                            self._start(nursery, event)
                        elif isinstance(event, Cancel):
                            self.stats.cancels.append(event.request_id)
                            self.stats.cancel_times.append(trio.current_time())
                            scope = self._scopes.get(event.request_id)
                            if scope is not None:
                                scope.cancel()
                        elif isinstance(event, Goodbye):
                            goodbye = event
                            self.stats.goodbyes.append(event)
                except ConnectionClosed as closed:
                    if closed.reason is not None:
                        self.stats.close_code = closed.reason.code
                        self.stats.close_reason = closed.reason.reason
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            connection.connection_lost()
            self._connection = self._ws = None
            self._scopes.clear()
        return goodbye

    def _start(self, nursery: trio.Nursery, request: Request | ChatRequest) -> None:
        scope = trio.CancelScope()
        self._scopes[request.request_id] = scope
        self.stats.requests += 1
        if isinstance(request, Request):
            self.stats.contents.append(request.content)
        nursery.start_soon(self._work, request, scope)

    async def _work(self, request: Request | ChatRequest, scope: trio.CancelScope) -> None:
        connection = self._connection
        assert connection is not None
        stats = self.stats
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        finish = Finish()
        pieces: list[str] = []
        try:
            with scope:
                try:
                    async for item in self.handler(request):
                        if isinstance(item, Finish):
                            finish = item
                            continue
                        if request.request_id not in connection.pending:
                            return  # cancelled before the handler reached a checkpoint
                        pieces.append(item)
                        await self._send(connection.send(Delta(request.request_id, item)))
                except HandlerFailure as failure:
                    stats.errors += 1
                    error = AgentError(
                        request.request_id,
                        failure.message,
                        code=failure.code,
                        retryable=failure.retryable,
                    )
                    if request.request_id in connection.pending:
                        await self._send(connection.send(error))
                    return
                conversation = finish.conversation_id
                if conversation is None:
                    given = request.conversation_id if isinstance(request, Request) else ""
                    conversation = given or str(uuid.uuid4())
                reply = Reply(
                    request.request_id,
                    finish.response_id or str(uuid.uuid4()),
                    conversation,
                    "".join(pieces),
                    finish_reason=finish.finish_reason,
                    usage=finish.usage,
                )
                if request.request_id not in connection.pending:
                    return  # cancelled meanwhile: the relay no longer waits for it
                stats.replies += 1
                await self._send(connection.done(reply, include_content=False))
        finally:
            stats.inflight -= 1
            self._scopes.pop(request.request_id, None)
            if self._draining and not self._scopes and self._ws is not None:
                await self._ws.aclose()

    async def _send(self, text: str) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send_message(text)


def echo_stream_handler(delay: float = 0.0, prefix: str = "echo:") -> V2Handler:
    """A v2 handler that answers ``echo:<content>`` word by word (a chat
    request: its last message's content), ``delay`` seconds between words."""

    async def handle(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        if isinstance(request, ChatRequest):
            last = request.messages[-1].get("content", "") if request.messages else ""
            text = prefix + (last if isinstance(last, str) else json.dumps(last))
        else:
            text = prefix + request.content
        words = text.split(" ")
        for index, word in enumerate(words):
            if index and delay:
                await trio.sleep(delay)
            yield word if index == len(words) - 1 else word + " "

    return handle
