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
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from relayd.protocol import AgentConnection, Greeting, Ping, Request

__all__ = ["AgentStats", "HandlerError", "echo_handler", "run_agent", "serve_agent"]

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
