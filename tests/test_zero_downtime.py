"""Restarts without failed requests, end to end (issue 18).

The test holds the listening socket, as systemd's relayd.socket does, and
starts relayd generations socket-activated on it (fd 3, ``LISTEN_FDS=1``,
``LISTEN_PID``, READY=1 on ``NOTIFY_SOCKET``) with one state directory. 32
keep-alive clients ask all the time (``/api/ask``, a quarter of them streaming,
conversations of up to five turns), 8 agents answer (four v1 agents in a
reconnect loop of the test's, with backoff and their old id, as agents written
for the seed do it; four v2 agents, ``V2Agent.run``). Five times in a row the
old relayd gets SIGTERM, the test waits for it to exit and starts the next one
on the same socket (``systemctl restart relayd`` with relayd.socket enabled).

What a client may do, as HTTP clients do: a request whose connection closes
before any byte of a response (an idle keep-alive connection the old relayd
closed) is sent again at once on a new connection, with the same
``Idempotency-Key``, so a resend can never run a question twice. Anything else
fails the request: an error status (503 included), a connection lost after
the response began, a wrong or missing answer. Every question must get
exactly one answer, with its content echoed, and reach an agent exactly once.

Two kinds of clients: ``back-to-back`` ones ask again as soon as they have an
answer; ``pausing`` ones wait 50-500 ms between questions, so their keep-alive
connections are idle when SIGTERM comes. The second is an expected failure
while relayd's wire path keeps such connections open (see PAUSING).

The test prints what it measured (``pytest -s``): failed requests, resends,
the longest extra wait a client saw (its slowest answer minus the median),
how long each restart took and how long each agent was away.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import socket
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
)

from relayd.agentkit import AgentProfile, Finish, V2Agent, run_agent
from relayd.bench.launch import Handover
from relayd.protocol import Request
from relayd.protocol.v2 import ChatRequest, Goodbye
from tests.support import ADMIN_KEY, Relayd, run_relayd, stop_all

pytestmark = pytest.mark.slow

CLIENTS = 32
STREAMING_EVERY = 4  # every fourth client asks with {"stream": true}
V1_AGENTS = 4
V2_AGENTS = 4
RESTARTS = 5
SERVE_BETWEEN = 1.2  # seconds each generation serves with every agent connected
TURNS = 5  # a client's conversation is continued this many times, then a new one
AGENT_DELAY = 0.02  # v1: before the answer; v2: between streamed words
NO_RESPONSE_TRIES = 3  # sends of one question whose connection closes before a response
ATTEMPT_TIMEOUT = 30.0  # above agents.startup_grace (15 s)
V1_BACKOFF_FIRST = 0.5  # the v1 agents' reconnect loop: full jitter, doubling, capped
V1_BACKOFF_CAP = 8.0


# -- the clock and the relayd generations ----------------------------------------------


@dataclass
class Generation:
    number: int
    relayd: Relayd
    ready: float  # the test's clock (trio), when READY=1 came
    sigterm: float | None = None
    exited: float | None = None

    def served(self, when: float) -> bool:
        return self.ready <= when and (self.exited is None or when <= self.exited)


@dataclass
class Timeline:
    generations: list[Generation] = field(default_factory=list)

    def generation_at(self, when: float) -> str:
        for generation in self.generations:
            if generation.served(when):
                return str(generation.number)
        return "none (between generations)"

    def around(self, when: float) -> str:
        """``when`` relative to the nearest SIGTERM, for the report."""
        stops = [g for g in self.generations if g.sigterm is not None]
        if not stops:
            return "no restart yet"
        nearest = min(stops, key=lambda g: abs(when - (g.sigterm or 0.0)))
        assert nearest.sigterm is not None
        return f"{when - nearest.sigterm:+.3f}s from SIGTERM to generation {nearest.number}"


# -- clients -------------------------------------------------------------------------


class NoResponse(Exception):
    """The connection closed (or reset) before any byte of a response: safe to resend."""


class BrokenResponse(Exception):
    """The connection failed after the response began, or the response is malformed."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def close(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Connection:
    """One keep-alive HTTP/1.1 client connection over a raw socket, so that the
    test knows exactly whether a failed exchange had received any byte."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.received = 0  # bytes of the exchange under way
        self.exchanges = 0  # answered on this connection so far (0: a fresh one)

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def exchange(self, request: bytes) -> Response:
        self.received = 0
        try:
            await self.stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise NoResponse(f"send failed: {error!r}") from None
        try:
            response = await self._response()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError) as error:
            if self.received == 0:
                raise NoResponse(f"closed before a response: {error!r}") from None
            raise BrokenResponse(
                f"connection lost after {self.received} bytes of the response: {error!r}"
            ) from None
        self.exchanges += 1
        return response

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("end of stream")
        self.received += len(data)
        self.buffer += data

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            await self._fill()
        part, self.buffer = self.buffer.split(marker, 1)
        return part

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        part, self.buffer = self.buffer[:size], self.buffer[size:]
        return part

    async def _response(self) -> Response:
        head = await self._until(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self._until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._until(b"\r\n")  # no trailers from relayd
                    break
                body += await self._exactly(size)
                if await self._exactly(2) != b"\r\n":
                    raise BrokenResponse("a chunk not followed by CRLF")
        else:
            body = await self._exactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)


@dataclass
class Attempt:
    sent: float
    ended: float
    reused: bool  # on a keep-alive connection that had answered before
    outcome: str  # "200", "503: ...", "no response: ...", "broken: ..."


@dataclass
class Question:
    client: int
    number: int
    content: str
    stream: bool
    conversation: str | None  # continued, or None for a new one
    started: float
    ended: float = 0.0
    answered: bool = False
    failure: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.ended - self.started


def request_bytes(port: int, body: dict[str, object], key: str) -> bytes:
    raw = json.dumps(body).encode()
    head = (
        f"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def answer_of(question: Question, response: Response) -> tuple[str | None, str]:
    """The answer's conversation id and ``""``, or None and what is wrong with it."""
    if question.stream:
        events = [block for block in response.body.decode().split("\n\n") if block.strip()]
        deltas = []
        done: dict[str, object] | None = None
        for block in events:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            data = json.loads(fields["data"])
            if fields["event"] == "delta":
                deltas.append(data["content"])
            elif fields["event"] == "done":
                done = data
            else:
                return None, f"stream event {block!r}"
        if done is None:
            return None, f"no done event in {response.body!r}"
        if "".join(deltas) != done["content"]:
            return None, f"deltas {deltas!r} do not add up to {done['content']!r}"
        answer = done
    else:
        answer = json.loads(response.body)
    if answer["content"] != "echo:" + question.content:
        return None, f"wrong content {answer['content']!r}"
    conversation = str(answer["conversation_id"])
    if question.conversation is not None and conversation != question.conversation:
        return None, f"conversation {conversation} instead of {question.conversation}"
    return conversation, ""


async def ask(port: int, question: Question, connection: Connection | None) -> Connection | None:
    """Ask until answered, resending at once (same key) while no response came;
    the connection to use next (None: open a new one)."""
    body: dict[str, object] = {"content": question.content}
    if question.stream:
        body["stream"] = True
    if question.conversation is not None:
        body["conversation_id"] = question.conversation
    request = request_bytes(port, body, f"zd-{question.client}-{question.number}-{uuid.uuid4()}")
    for _ in range(NO_RESPONSE_TRIES):
        sent = trio.current_time()
        if connection is None:
            try:
                connection = await Connection.open(port)
            except OSError as error:  # never sent: may be sent again
                question.attempts.append(Attempt(sent, sent, False, f"connect: {error!r}"))
                continue
        reused = connection.exchanges > 0
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT):
                response = await connection.exchange(request)
        except NoResponse as error:
            question.attempts.append(Attempt(sent, trio.current_time(), reused, f"{error}"))
            await connection.aclose()
            connection = None
            continue  # what any HTTP client does with a closed keep-alive connection
        except (BrokenResponse, trio.TooSlowError) as error:
            question.attempts.append(
                Attempt(sent, trio.current_time(), reused, f"broken: {error!r}")
            )
            question.failure = f"broken: {error!r}"
            await connection.aclose()
            return None
        ended = trio.current_time()
        text = response.body[:200].decode(errors="replace")
        question.attempts.append(Attempt(sent, ended, reused, f"{response.status}: {text}"))
        question.ended = ended
        if response.status != 200:
            question.failure = f"status {response.status}: {text}"
        else:
            conversation, problem = answer_of(question, response)
            if conversation is None:
                question.failure = problem
            else:
                question.answered = True
                question.conversation = conversation
        if response.close:
            await connection.aclose()
            return None
        return connection
    question.failure = f"no response {NO_RESPONSE_TRIES} times"
    return connection


async def client(
    index: int,
    port: int,
    questions: list[Question],
    stop: trio.Event,
    pause: tuple[float, float],
) -> None:
    """Ask until ``stop``, finishing the question under way; ``pause``: the
    range of seconds between a question's answer and the next question."""
    connection: Connection | None = None
    conversation: str | None = None
    turns = 0
    number = 0
    try:
        while not stop.is_set():
            number += 1
            if turns >= TURNS:
                conversation, turns = None, 0
            question = Question(
                index,
                number,
                f"client {index} question {number}",
                stream=index % STREAMING_EVERY == 0,
                conversation=conversation,
                started=trio.current_time(),
            )
            questions.append(question)
            connection = await ask(port, question, connection)
            if question.ended == 0.0:
                question.ended = trio.current_time()
            if not question.answered:
                conversation, turns = None, 0
            else:
                conversation, turns = question.conversation, turns + 1
            if pause[1] > 0:
                with trio.move_on_after(random.uniform(*pause)):
                    await stop.wait()
    finally:
        if connection is not None:
            await connection.aclose()


# -- agents --------------------------------------------------------------------------


@dataclass
class Presence:
    """One agent's connections as the agent saw them (the test's clock)."""

    name: str
    protocol: int
    ids: list[str] = field(default_factory=list)  # the id of each connection
    connected: list[float] = field(default_factory=list)
    disconnected: list[float] = field(default_factory=list)
    goodbyes: list[float] = field(default_factory=list)  # v2: each goodbye's reconnect_after
    changed: trio.Event = field(default_factory=trio.Event)  # set (and replaced) on a change

    @property
    def online(self) -> bool:
        return len(self.connected) > len(self.disconnected)

    def came(self, agent_id: str) -> None:
        self.ids.append(agent_id)
        self.connected.append(trio.current_time())
        self.changed.set()
        self.changed = trio.Event()

    def went(self) -> None:
        self.disconnected.append(trio.current_time())
        self.changed.set()
        self.changed = trio.Event()


class Started:
    """A ``task_status`` that tells the test when a connection's handshake is done."""

    def __init__(self, then: Callable[[str], None]) -> None:
        self.then = then

    def started(self, value: str | None = None) -> None:
        assert value is not None
        self.then(value)


@dataclass
class Work:
    """What the agents were asked: how often each question, and by which agent
    each conversation was answered."""

    asked: Counter[str] = field(default_factory=Counter)
    owners: dict[str, set[str]] = field(default_factory=dict)

    def record(self, agent: str, content: str, conversation: str) -> None:
        self.asked[content] += 1
        self.owners.setdefault(conversation, set()).add(agent)


def v1_handler(name: str, work: Work) -> Callable[[Request], Awaitable[tuple[str, str, str]]]:
    async def handle(request: Request) -> tuple[str, str, str]:
        await trio.sleep(AGENT_DELAY)
        conversation = request.conversation_id or str(uuid.uuid4())
        work.record(name, request.content, conversation)
        return str(uuid.uuid4()), conversation, "echo:" + request.content

    return handle


async def v1_agent(url: str, presence: Presence, work: Work) -> None:
    """A v1 agent as agents written for the seed reconnect: after a close, again
    after a short random wait; while the relay cannot be reached, with full
    jitter exponential backoff; always answering the greeting with its old id."""
    handler = v1_handler(presence.name, work)
    agent_id: str | None = None
    failures = 0
    while True:
        handshakes = len(presence.connected)

        with contextlib.suppress(OSError, HandshakeError, ConnectionClosed, DisconnectionTimeout):
            await run_agent(
                url,
                handler,
                reclaim_id=agent_id,
                task_status=Started(presence.came),  # type: ignore[arg-type]
            )
        if len(presence.connected) > handshakes:
            presence.went()
            agent_id = presence.ids[-1]
            failures = 0
            ceiling = V1_BACKOFF_FIRST
        else:
            failures += 1
            ceiling = min(V1_BACKOFF_CAP, V1_BACKOFF_FIRST * 2**failures)
        await trio.sleep(random.uniform(0, ceiling))


class RecordedV2Agent(V2Agent):
    """``V2Agent`` (its own reconnect loop, goodbye and resume), recording its
    connections."""

    def __init__(self, url: str, presence: Presence, work: Work) -> None:
        async def handle(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
            assert isinstance(request, Request)
            conversation = request.conversation_id or str(uuid.uuid4())
            words = ("echo:" + request.content).split(" ")
            for index, word in enumerate(words):
                if index:
                    await trio.sleep(AGENT_DELAY)
                yield word if index == len(words) - 1 else word + " "
            work.record(presence.name, request.content, conversation)
            yield Finish(conversation_id=conversation)

        super().__init__(url, handle, AgentProfile(name=presence.name, capacity=2))
        self.presence = presence

    async def serve(
        self, ws: WebSocketConnection, *, task_status: trio.TaskStatus[str] | None = None
    ) -> Goodbye | None:
        presence = self.presence

        def welcomed(agent_id: str) -> None:
            presence.came(agent_id)
            if task_status is not None:
                task_status.started(agent_id)

        handshakes = len(presence.connected)
        try:
            goodbye = await super().serve(ws, task_status=Started(welcomed))  # type: ignore[arg-type]
            if goodbye is not None:
                presence.goodbyes.append(goodbye.reconnect_after)
            return goodbye
        finally:
            if len(presence.connected) > handshakes:
                presence.went()


# -- the run -------------------------------------------------------------------------


# What systemd does for relayd.service when relayd.socket holds the socket: the
# listening socket as fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=http, and LISTEN_PID, the
# pid of the relayd itself (so set after the fork, here just before the exec).
SYSTEMD_EXEC = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "relayd", *sys.argv[2:]])
"""


def start_activated(tmp_path: Path, held: socket.socket) -> Relayd:
    """Start ``relayd serve`` socket-activated on ``held`` with the state directory
    in ``tmp_path``; wait for its READY=1 on NOTIFY_SOCKET."""
    log_path = tmp_path / f"relayd-{time.monotonic_ns()}.log"
    handover = Handover.open(tmp_path, "relayd", listener=held)
    environment = handover.environment(
        {"RELAYD_ADMIN_KEY": ADMIN_KEY, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    )
    state_dir = tmp_path / "state"
    command = [sys.executable, "-c", SYSTEMD_EXEC, str(held.fileno())]
    command += ["serve", "--state-dir", str(state_dir)]
    return run_relayd(command, handover, state_dir, log_path, environment)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[[], Relayd]]:
    """``relay()`` starts a relayd generation on the held socket and the one state
    directory, socket-activated, and waits for its READY=1."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(128)
    started: list[Relayd] = []

    def start() -> Relayd:
        relayd = start_activated(tmp_path, held)
        started.append(relayd)
        assert "socket activation: serving on fd://3" in relayd.log, relayd.log
        return relayd

    yield start
    stop_all(started)
    held.close()


@dataclass
class Run:
    timeline: Timeline
    questions: list[Question]
    presences: list[Presence]
    work: Work


async def all_online(presences: list[Presence], since: float) -> None:
    """Until every agent has a connection made after ``since``."""
    for presence in presences:
        while not (presence.online and presence.connected[-1] >= since):
            await presence.changed.wait()


async def restart_five_times(relay: Callable[[], Relayd], pause: tuple[float, float]) -> Run:
    timeline = Timeline()
    questions: list[Question] = []
    work = Work()
    presences = [Presence(f"v1-{n}", 1) for n in range(V1_AGENTS)]
    presences += [Presence(f"v2-{n}", 2) for n in range(V2_AGENTS)]
    relayd = await trio.to_thread.run_sync(relay)
    timeline.generations.append(Generation(1, relayd, trio.current_time()))
    url = relayd.agent_url
    stop_clients = trio.Event()
    async with trio.open_nursery() as agents:
        for presence in presences:
            if presence.protocol == 1:
                agents.start_soon(v1_agent, url, presence, work)
            else:
                agents.start_soon(RecordedV2Agent(url, presence, work).run)
        await all_online(presences, 0.0)
        async with trio.open_nursery() as clients:
            for index in range(CLIENTS):
                clients.start_soon(client, index, relayd.port, questions, stop_clients, pause)
            for number in range(2, RESTARTS + 2):
                old = timeline.generations[-1]
                await trio.sleep(SERVE_BETWEEN)
                # systemctl restart: SIGTERM, wait for the exit, start the next one.
                old.sigterm = trio.current_time()
                old.relayd.signal(signal.SIGTERM)
                code = await trio.to_thread.run_sync(old.relayd.process.wait, 60)
                old.exited = trio.current_time()
                assert code == 0, old.relayd.log
                relayd = await trio.to_thread.run_sync(relay)
                timeline.generations.append(Generation(number, relayd, trio.current_time()))
                with trio.fail_after(30):
                    await all_online(presences, old.exited)
            await trio.sleep(SERVE_BETWEEN)
            stop_clients.set()
        agents.cancel_scope.cancel()
    return Run(timeline, questions, presences, work)


def describe(question: Question, timeline: Timeline) -> str:
    lines = [
        f"client {question.client} question {question.number} "
        f"({'stream' if question.stream else 'json'}, "
        f"{'continuing' if question.conversation else 'new'} conversation): "
        f"{question.failure}"
    ]
    for attempt in question.attempts:
        lines.append(
            f"    sent {timeline.around(attempt.sent)} on a "
            f"{'reused keep-alive' if attempt.reused else 'new'} connection, ended "
            f"{timeline.around(attempt.ended)} (generation "
            f"{timeline.generation_at(attempt.ended)}): {attempt.outcome[:120]}"
        )
    return "\n".join(lines)


def report(run: Run) -> str:
    """What the run measured, for the test's output."""
    timeline, questions = run.timeline, run.questions
    latencies = sorted(q.latency for q in questions if q.answered)
    median = statistics.median(latencies)
    retried = [q for q in questions if len(q.attempts) > 1]
    lines = [
        f"{len(questions)} questions, {sum(q.answered for q in questions)} answered, "
        f"{sum(q.failure is not None for q in questions)} failed; "
        f"{len(retried)} resent after a connection closed before any response "
        f"({sum(a.reused for q in retried for a in q.attempts[:-1])} of them on a "
        "reused keep-alive connection)",
        f"latency: median {median * 1000:.0f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, longest "
        f"{latencies[-1] * 1000:.0f} ms: longest extra wait "
        f"{(latencies[-1] - median) * 1000:.0f} ms",
    ]
    for generation in timeline.generations:
        sigterm, exited = generation.sigterm, generation.exited
        if sigterm is None or exited is None:
            continue
        following = timeline.generations[generation.number]
        lines.append(
            f"restart {generation.number}: drain and exit {(exited - sigterm) * 1000:.0f} ms, "
            f"start to READY {(following.ready - exited) * 1000:.0f} ms; "
            f"{len(in_flight_at(questions, sigterm))} questions in flight at SIGTERM, "
            f"{len(asked_between(questions, sigterm, following.ready))} asked before READY"
        )
        for presence in run.presences:
            gone = [t for t in presence.disconnected if t >= sigterm]
            back = [t for t in presence.connected if t >= exited]
            if gone and back:
                lines.append(
                    f"    {presence.name}: away {(back[0] - gone[0]) * 1000:.0f} ms, "
                    f"back {(back[0] - following.ready) * 1000:+.0f} ms after READY"
                )
    return "\n".join(lines)


def in_flight_at(questions: list[Question], when: float) -> list[Question]:
    return [q for q in questions if q.started < when < q.ended]


def asked_between(questions: list[Question], start: float, end: float) -> list[Question]:
    return [q for q in questions if start < q.started < end]


class RefusedWhileDraining(AssertionError):
    """Every failed request is the known defect's: one question, sent after SIGTERM
    on a keep-alive connection the old relayd kept open, answered 503 by it."""


def the_defect(question: Question, timeline: Timeline) -> bool:
    last = question.attempts[-1]
    number = timeline.generation_at(last.ended)
    if not number.isdigit():
        return False
    generation = timeline.generations[int(number) - 1]
    return (
        len(question.attempts) == 1
        and last.reused
        and last.outcome.startswith('503: {"error": "relayd is shutting down"}')
        and generation.sigterm is not None
        and last.sent > generation.sigterm
    )


def check(run: Run) -> None:
    timeline, questions = run.timeline, run.questions
    summary = report(run)
    print("\n" + summary)
    failed = [q for q in questions if q.failure is not None]
    for question in failed:
        print(describe(question, timeline))
    for generation in timeline.generations:
        refused = [line for line in generation.relayd.log.splitlines() if "failed" in line]
        if refused:
            print(f"generation {generation.number} log:\n  " + "\n  ".join(refused[:20]))
    if failed and all(the_defect(q, timeline) for q in failed):
        raise RefusedWhileDraining(f"{len(failed)} requests answered 503 after SIGTERM")
    assert not failed, f"{len(failed)} failed requests (printed above)"

    # The run proves something: every restart had questions under way at SIGTERM
    # and questions asked while no relayd accepted (they waited in the socket).
    for generation in timeline.generations[:-1]:
        assert generation.sigterm is not None
        following = timeline.generations[generation.number]
        assert in_flight_at(questions, generation.sigterm), summary
        assert asked_between(questions, generation.sigterm, following.ready), summary
    # Every answer reached an agent exactly once (a resend carries the same
    # Idempotency-Key), every conversation stayed on its agent, every agent came
    # back after every restart with its id, v2 agents told to come back after 1 s.
    answered = [q.content for q in questions if q.answered]
    assert len(answered) == len(questions)
    twice = [(content, run.work.asked[content]) for content in answered]
    assert all(count == 1 for _, count in twice), [pair for pair in twice if pair[1] != 1]
    assert all(len(agents) == 1 for agents in run.work.owners.values())
    for presence in run.presences:
        assert len(presence.connected) == RESTARTS + 1, presence
        assert len(set(presence.ids)) == 1, presence
        if presence.protocol == 2:
            assert presence.goodbyes == [1.0] * RESTARTS, presence
    # The longest wait is the restart's own length (SIGTERM to READY) and a little
    # more, far from the startup grace (15 s) that would mean an agent missing.
    gap = max(
        following.ready - (generation.sigterm or 0.0)
        for generation, following in itertools.pairwise(timeline.generations)
    )
    latencies = sorted(q.latency for q in questions)
    assert latencies[-1] <= gap + 3.0, summary
    assert latencies[-1] - statistics.median(latencies) < 10.0, summary


@pytest.mark.parametrize(
    "pause",
    [
        # Each client asks again as soon as it has its answer.
        pytest.param((0.0, 0.0), id="back-to-back"),
        # Each client pauses 50-500 ms between an answer and its next question
        # (a person, a batch job with work between calls): its keep-alive
        # connection is idle when SIGTERM comes.
        pytest.param((0.05, 0.5), id="pausing"),
    ],
)
def test_five_restarts_fail_no_request_and_lose_no_answer(
    relay: Callable[[], Relayd], pause: tuple[float, float]
) -> None:
    async def restarts() -> Run:
        with trio.fail_after(80):
            return await restart_five_times(relay, pause)

    # Its own trio.run, so that check() raises its summary outside any nursery.
    check(trio.run(restarts))
