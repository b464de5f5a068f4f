"""Simulated agents for the bench, and the tracker that times requests end to end.

Agents are real :func:`relayd.agentkit.run_agent` connections (trio-websocket,
the seed protocol) in the bench's own Trio run, so the bench's clients and its
agents read the same clock: the :class:`Tracker` notes when a client sent
request number *n* and when an agent received it, and queue wait is the
difference. A request carries its number in its content (``"bench <n>"``);
content in any other form (warm-up requests) is answered but not timed.

A :class:`Fleet` owns nothing but bookkeeping: agents run in a nursery the
caller passes (and cancels to disconnect them). With ``ssl_context`` its agents
connect over wss (relay-32-tls), still trio-websocket and the seed protocol.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from relayd.agentkit import AgentStats, Handler, run_agent, serve_agent
from relayd.protocol import Request

__all__ = [
    "CONNECT_CONCURRENCY",
    "Fleet",
    "Tracker",
    "connect_many",
    "content_for",
    "number_of",
]

log = logging.getLogger("relayd.bench")

# Handshakes in flight at once: well under Hypercorn's listen backlog (100), so
# no SYN is dropped and retried a second later.
CONNECT_CONCURRENCY = 64
_PREFIX = "bench "
# How many failure reasons a fleet keeps for its report.
FAILURES_KEPT = 5


def content_for(number: int) -> str:
    return f"{_PREFIX}{number}"


def number_of(content: str) -> int | None:
    """The request number in a bench request's content, or None."""
    if content.startswith(_PREFIX) and content[len(_PREFIX) :].isdigit():
        return int(content[len(_PREFIX) :])
    return None


class Tally(Protocol):
    failed: int  # agents that could not connect
    failures: list[str]  # the first few reasons


async def connect_many(
    number: int,
    connect_one: Callable[[], Awaitable[None]],
    errors: tuple[type[Exception], ...],
    tally: Tally,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run ``connect_one`` ``number`` times, :data:`CONNECT_CONCURRENCY` at a time;
    returns when each has connected or failed with one of ``errors`` (counted in
    ``tally``). ``on_progress(done, number)`` after each."""
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    done = 0

    async def one() -> None:
        nonlocal done
        async with limiter:
            try:
                await connect_one()
            except errors as error:
                tally.failed += 1
                if len(tally.failures) < FAILURES_KEPT:
                    tally.failures.append(f"{type(error).__name__}: {error}")
        done += 1
        if on_progress is not None:
            on_progress(done, number)

    async with trio.open_nursery() as connecting:
        for _ in range(number):
            connecting.start_soon(one)


class Tracker:
    """When each numbered request was sent by a client and reached an agent."""

    def __init__(self) -> None:
        self._sent: dict[int, float] = {}
        self._reached: dict[int, float] = {}
        self._expected: dict[int, trio.Event] = {}

    def sent(self, number: int, now: float) -> None:
        self._sent[number] = now

    def reached(self, content: str, now: float) -> None:
        number = number_of(content)
        if number is None:
            return
        if number in self._sent:
            self._reached[number] = now
        event = self._expected.pop(number, None)
        if event is not None:
            event.set()

    def expect(self, number: int) -> trio.Event:
        """An event set when request ``number`` reaches an agent."""
        event = self._expected[number] = trio.Event()
        return event

    def forget(self, number: int) -> None:
        self._sent.pop(number, None)
        self._reached.pop(number, None)
        self._expected.pop(number, None)

    def finish(self, number: int) -> float | None:
        """Queue wait of request ``number`` (reached - sent), forgetting it; None if unknown."""
        sent = self._sent.pop(number, None)
        reached = self._reached.pop(number, None)
        if sent is None or reached is None:
            return None
        return reached - sent


def bench_handler(tracker: Tracker, *, delay: float = 0.0, answer: bool = True) -> Handler:
    """An agent handler: notes the arrival, waits ``delay``, echoes the content.

    With ``answer=False`` it never answers: the agent keeps the relay's slot
    taken for as long as it is connected (a busy agent).
    """
    replies = count()
    prefix = uuid.uuid4().hex[:12]  # conversation ids unique across handlers and runs

    async def handle(request: Request) -> tuple[str, str, str]:
        tracker.reached(request.content, trio.current_time())
        if not answer:
            await trio.sleep_forever()
        if delay:
            await trio.sleep(delay)
        n = next(replies)
        conversation = request.conversation_id or f"bench-{prefix}-{n}"
        return f"bench-response-{n}", conversation, "echo:" + request.content

    return handle


@dataclass
class Fleet:
    """Agents of one kind connected to ``url``; what they saw is in ``stats``."""

    url: str
    handler: Handler
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Answer in the task that reads the request (instant agents: no task per request).
    inline: bool = False
    ssl_context: ssl.SSLContext | None = None  # for a wss:// url: whom to trust
    stats: list[AgentStats] = field(default_factory=list)
    failed: int = 0  # agents that could not connect
    failures: list[str] = field(default_factory=list)  # the first few reasons

    @property
    def connected(self) -> int:
        return sum(1 for stats in self.stats if stats.close_code is None)

    @property
    def requests(self) -> int:
        return sum(stats.requests for stats in self.stats)

    async def start(
        self,
        nursery: trio.Nursery,
        number: int,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Connect ``number`` agents, running them in ``nursery``; returns when every
        handshake is done or has failed (``failed`` counts those)."""

        async def connect_one() -> None:
            stats = AgentStats()
            await nursery.start(self._run, stats)
            self.stats.append(stats)

        errors = (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError)
        await connect_many(number, connect_one, errors, self, on_progress=on_progress)

    async def _run(
        self, stats: AgentStats, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            if self.ssl_context is None:
                await run_agent(
                    self.url,
                    self.handler,
                    headers=self.headers,
                    stats=stats,
                    inline=self.inline,
                    task_status=task_status,
                )
            else:
                # run_agent with a context: the same connection, trusting the bench's CA.
                async with open_websocket_url(
                    self.url,
                    self.ssl_context,
                    extra_headers=self.headers,
                    message_queue_size=16,
                ) as ws:
                    await serve_agent(
                        ws, self.handler, stats=stats, inline=self.inline, task_status=task_status
                    )
        except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
            if stats.connection_id is None:
                raise  # before started(): nursery.start() reports it to start_one
            log.debug("agent %s lost its connection", stats.connection_id, exc_info=True)
        if stats.close_code is None:
            stats.close_code = 1006  # gone without a close frame
