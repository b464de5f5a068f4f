"""stream-32: answers streamed as server-sent events from lean v2 agents.

The unit's pieces, all in the bench's own Trio run (so that agents and
clients share its CPU the way relay-32's do):

* :class:`StreamAgent`: a raw protocol-v2 agent over a plain socket (no
  trio-websocket, no wsproto): the upgrade, ``hello``, then for each request
  :data:`DELTAS` ``delta`` frames as fast as it can (one write each, a pass
  through the scheduler after each so that the clients being timed are not
  starved), then ``done`` without content. Each delta's text is
  ``ts=<ns>``: :func:`time.monotonic_ns` just before its write. That clock
  is CLOCK_MONOTONIC, the machine's, so the client's receive time minus it is
  the delta's added latency on one clock. It answers WebSocket pings, and
  sends one unsolicited pong after its welcome (see :data:`PONG_FIRST`).
* :class:`StreamClient`: the bench's HTTP client (:mod:`relayd.bench.httpclient`)
  asking ``POST /api/ask`` with ``{"stream": true}`` and reading the chunked
  event stream (:class:`ChunkedDecoder`, :class:`EventParser`); each read is
  timed once, and every delta in it gets that time.
* :class:`StreamPhase`: the load phase of :mod:`relayd.bench.load` with these
  clients instead (turns, windows, CPU snapshots are the same), and the
  figures per delta: deltas/s, CPU µs per delta, added latency.

The ceiling, ``bare-stream-32``, is the same agents and clients against
:mod:`relayd.bench.bareloop`.

The agents' frames are built by :mod:`relayd.bench.frames` (a zero masking
key: see there).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from relayd.bench.fleet import connect_many
from relayd.bench.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SUBPROTOCOL,
    TEXT_HEADS,
    FrameError,
    client_frame,
    parse_frame,
)
from relayd.bench.httpclient import HttpClient, HttpError, StaleConnection, parse_head
from relayd.bench.load import STREAM_ASK, Load, LoadPhase, Shape
from relayd.bench.model import ScenarioResult
from relayd.bench.servers import Target
from relayd.bench.stats import Distribution, LoadRecorder, rate
from relayd.front.sockets import read_some, write_now

__all__ = [
    "DELTAS",
    "ChunkedDecoder",
    "EventParser",
    "StreamAgent",
    "StreamClient",
    "StreamFleet",
    "StreamOutcome",
    "StreamPhase",
    "StreamRecorder",
    "stamp_of",
]

log = logging.getLogger("relayd.bench")

# Deltas in every answer.
DELTAS = 256
# Each agent sends one pong right after its welcome. relayd parses an agent's
# frames on a fast path until the first control frame, and with wsproto from
# then on; every v2 agent answers the relay's first heartbeat ping within one
# interval, so that is the steady state, measured from the start of the run
# rather than switching in the middle of it (at the first ping, 15 s in).
PONG_FIRST = True
_RECEIVE_SIZE = 65536
MAX_HEAD = 64 * 1024
MAX_EVENT = 1024 * 1024
_STAMP = re.compile(rb"ts=(\d+)")
_HEX = frozenset(b"0123456789abcdefABCDEF")

# -- the client's side: chunks and events -------------------------------------------------


class ChunkedDecoder:
    """An HTTP/1.1 chunked body, decoded as it comes (no trailers, no extensions needed).

    :meth:`feed` returns the body bytes complete so far; ``finished`` is set
    by the last chunk, after which :attr:`rest` holds what followed it.
    Raises :class:`HttpError` for a malformed chunk.
    """

    __slots__ = ("_buffer", "finished")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.finished = False

    @property
    def rest(self) -> bytes:
        return bytes(self._buffer) if self.finished else b""

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            self._buffer += data
            return b""
        buffer = self._buffer
        buffer += data
        pieces: list[bytes] = []
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                if len(buffer) - position > 1024:
                    raise HttpError("a chunk-size line without an end")
                break
            size_text = bytes(buffer[position:line_end]).partition(b";")[0].strip()
            if not size_text or not _HEX.issuperset(size_text) or len(size_text) > 16:
                raise HttpError(f"malformed chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                if len(buffer) < line_end + 4:
                    break
                if buffer[line_end + 2 : line_end + 4] != b"\r\n":
                    raise HttpError("trailers after the last chunk are not supported")
                position = line_end + 4
                self.finished = True
                break
            start = line_end + 2
            end = start + size
            if len(buffer) < end + 2:
                break
            if buffer[end : end + 2] != b"\r\n":
                raise HttpError("a chunk not followed by CRLF")
            pieces.append(bytes(buffer[start:end]))
            position = end + 2
        del buffer[:position]
        return b"".join(pieces)


class EventParser:
    """Server-sent events (``event:`` and ``data:`` lines, a blank line after each)
    as they come: :meth:`feed` returns the events complete so far as
    ``(kind, data)``, ``kind`` ``b"message"`` when unnamed, several ``data``
    lines joined with ``\\n``. Lines end with ``\\n`` (what relayd sends)."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        text = self._rest + data if self._rest else data
        *blocks, self._rest = text.split(b"\n\n")
        if len(self._rest) > MAX_EVENT:
            raise HttpError(f"an event larger than {MAX_EVENT} bytes")
        events: list[tuple[bytes, bytes]] = []
        for block in blocks:
            kind = b"message"
            lines: list[bytes] = []
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if name == b"event":
                    kind = value
                elif name == b"data":
                    lines.append(value)
            if lines or kind != b"message":
                events.append((kind, b"\n".join(lines)))
        return events


def _openai_kind(payload: bytes) -> bytes:
    """An OpenAI stream chunk as the /api/ask event it stands for."""
    if payload == b"[DONE]":
        return b"done"
    if _STAMP.search(payload) is not None:
        return b"delta"
    if payload.startswith(b'{"error"'):
        return b"error"
    return b"other"  # the role chunk, the finish chunk, a usage chunk


def stamp_of(data: bytes) -> int | None:
    """The agent's send time (``ts=<ns>``) in a delta event's data, or None."""
    match = _STAMP.search(data)
    return None if match is None else int(match.group(1))


@dataclass(slots=True)
class StreamOutcome:
    """One streamed answer as the client saw it."""

    status: int | None = None  # None: no HTTP answer (a connection error)
    deltas: int = 0
    done: bool = False  # the ``done`` event came
    problem: str | None = None  # why it is not a whole answer (None: it is)

    @property
    def ok(self) -> bool:
        return self.problem is None and self.status == 200 and self.done


class StreamClient(HttpClient):
    """One keep-alive connection asking for streamed answers (see the module docstring)."""

    def __init__(self, host: str, port: int, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(host, port, headers=headers)
        self.expected = DELTAS
        self._openai = False

    async def stream(
        self, body: bytes, latencies: array[int], path: str = "/api/ask"
    ) -> StreamOutcome:
        """Ask ``path`` with ``body`` and read the whole answer; each delta's added
        latency (ns) is appended to ``latencies``. Never raises for the server's
        fault: the outcome says what went wrong (and the connection is closed then).

        ``/api/ask`` streams ``delta``/``done``/``error`` events; ``/v1/...``
        streams OpenAI's unnamed chunks ending in ``[DONE]``, where a delta is a
        chunk with the agent's time stamp in its content (the role chunk and the
        finish chunk carry none)."""
        self._openai = path.startswith("/v1/")
        message = (
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\n"
            + self._common
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        outcome = StreamOutcome()
        try:
            try:
                await self._stream_once(message, outcome, latencies)
            except StaleConnection:
                await self.aclose()
                await self._stream_once(message, outcome, latencies)
        except (OSError, trio.BrokenResourceError, HttpError) as error:
            outcome.problem = f"{type(error).__name__}: {error}"
            await self.aclose()
        except BaseException:
            await self.aclose()
            raise
        if outcome.problem is None:
            if outcome.status != 200:
                outcome.problem = f"status {outcome.status}"
            elif not outcome.done:
                outcome.problem = "no done event"
            elif outcome.deltas != self.expected:
                outcome.problem = f"{outcome.deltas} deltas, {self.expected} expected"
        return outcome

    async def _stream_once(
        self, message: bytes, outcome: StreamOutcome, latencies: array[int]
    ) -> None:
        await self.connect()
        stream = self._stream
        assert isinstance(stream, trio.SocketStream)
        reused = self._used
        await self._send(stream, message, reused)
        buffer = self._buffer
        now = 0
        waited = False
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise HttpError(f"response head larger than {MAX_HEAD} bytes")
            data, now = await _receive(stream, wait_first=not waited)
            waited = True
            if not data:
                if reused and not buffer:
                    raise StaleConnection()
                raise trio.BrokenResourceError("connection closed before the response head")
            buffer += data
        status, _, headers = parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        outcome.status = status
        if headers.get("transfer-encoding", "").lower() != "chunked":
            # Not a stream (an error before the first byte): its body, by Content-Length.
            text = headers.get("content-length", "0")
            if not text.isdigit():
                raise HttpError(f"response without a valid Content-Length: {text!r}")
            while len(buffer) < int(text):
                data, now = await _receive(stream, wait_first=False)
                if not data:
                    raise trio.BrokenResourceError("connection closed in the middle of the body")
                buffer += data
            body = bytes(buffer[: int(text)])[:200]
            outcome.problem = (
                f"status {status}: {body!r}" if status != 200 else f"not an event stream: {body!r}"
            )
            del buffer[: int(text)]
        else:
            decoder = ChunkedDecoder()
            events = EventParser()
            data = bytes(buffer)
            buffer.clear()
            while True:
                if data:
                    for kind, payload in events.feed(decoder.feed(data)):
                        if self._openai:
                            kind = _openai_kind(payload)
                        if kind == b"delta":
                            stamp = stamp_of(payload)
                            if stamp is None:
                                raise HttpError(f"a delta without a time stamp: {payload[:80]!r}")
                            latencies.append(now - stamp)
                            outcome.deltas += 1
                        elif kind == b"done":
                            outcome.done = True
                        elif kind == b"error":
                            outcome.problem = f"error event: {payload[:200]!r}"
                    if decoder.finished:
                        break
                data, now = await _receive(stream, wait_first=False)
                if not data:
                    raise trio.BrokenResourceError("connection closed in the middle of the stream")
            buffer += decoder.rest
        self._used = True
        if headers.get("connection", "").lower() == "close":
            await self.aclose()


async def _receive(stream: trio.SocketStream, *, wait_first: bool) -> tuple[bytes, int]:
    """The next bytes from ``stream`` (b"" at its end) and when they were read
    (:func:`time.monotonic_ns`, right after the read). Data that was there
    without a wait still lets other tasks run first (after the time is taken)."""
    waited = False
    if wait_first:
        await trio.lowlevel.wait_readable(stream.socket)
        waited = True
    while True:
        descriptor = stream.socket.fileno()
        if descriptor < 0:
            return b"", time.monotonic_ns()
        data = None
        try:
            data = os.read(descriptor, _RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError:
            return b"", time.monotonic_ns()
        if data is not None:
            now = time.monotonic_ns()
            if not waited:
                await trio.lowlevel.checkpoint()
            return data, now
        await trio.lowlevel.wait_readable(stream.socket)
        waited = True


# -- the agents ----------------------------------------------------------------------------


class AgentRefused(Exception):
    """The relay did not accept the agent (no 101, no relayd.v2, no welcome)."""


@dataclass
class StreamAgent:
    """One lean v2 agent connected to ``host:port`` (see the module docstring)."""

    host: str
    port: int
    path: str = "/client/register"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    deltas: int = DELTAS
    agent_id: str | None = None
    requests: int = 0
    closed: bool = False
    _inbox: bytearray = field(default_factory=bytearray)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, say hello, and answer until the connection ends (or cancelled)."""
        stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            await self._handshake(stream)
            task_status.started(self.agent_id or "")
            await self._serve(stream)
        finally:
            self.closed = True
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        key = base64.b64encode(secrets.token_bytes(16))
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode()
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            + b"Sec-WebSocket-Key: "
            + key
            + b"\r\nSec-WebSocket-Protocol: "
            + SUBPROTOCOL
            + b"\r\n"
            + extra
            + b"\r\n"
        )
        await stream.send_all(request)
        buffer = self._inbox
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise AgentRefused("an endless response head")
            data = await read_some(stream, _RECEIVE_SIZE)
            if not data:
                raise AgentRefused("connection closed during the upgrade")
            buffer += data
        try:
            status, reason, headers = parse_head(bytes(buffer[:end]))
        except HttpError as error:
            raise AgentRefused(str(error)) from None
        del buffer[: end + 4]
        if status != 101:
            raise AgentRefused(f"upgrade answered {status} {reason}")
        if headers.get("sec-websocket-protocol", "").encode() != SUBPROTOCOL:
            raise AgentRefused("the relay did not choose subprotocol relayd.v2")
        hello = {"type": "hello", "name": "bench-stream", "version": "1", "capacity": 1}
        await stream.send_all(client_frame(json.dumps(hello).encode()))
        opcode, payload = await self._frame(stream)
        if opcode != OP_TEXT:
            raise AgentRefused(f"a frame of opcode {opcode} instead of welcome")
        welcome = json.loads(payload)
        if welcome.get("type") != "welcome":
            raise AgentRefused(f"{payload[:200]!r} instead of welcome")
        self.agent_id = str(welcome.get("agent_id"))
        if PONG_FIRST:
            await stream.send_all(client_frame(b"", OP_PONG))

    async def _frame(self, stream: trio.SocketStream) -> tuple[int, bytes]:
        """The relay's next frame (EOFError when the connection ends)."""
        buffer = self._inbox
        while (parsed := parse_frame(buffer)) is None:
            data = await read_some(stream, _RECEIVE_SIZE, drained=True)
            if not data:
                raise EOFError
            buffer += data
        opcode, payload, end = parsed
        del buffer[:end]
        return opcode, payload

    async def _serve(self, stream: trio.SocketStream) -> None:
        while True:
            try:
                opcode, payload = await self._frame(stream)
            except EOFError:
                return
            if opcode == OP_PING:
                await _write(stream, client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                await _write(stream, client_frame(payload[:2], OP_CLOSE))
                return
            elif opcode == OP_TEXT:
                frame: dict[str, Any] = json.loads(payload)
                if frame.get("type") == "request":
                    await self._answer(stream, str(frame["id"]).encode())

    async def _answer(self, stream: trio.SocketStream, request_id: bytes) -> None:
        """:attr:`deltas` deltas as fast as the socket takes them, then ``done``."""
        self.requests += 1
        prefix = b'{"type":"delta","id":"' + request_id + b'","text":"ts='
        heads = TEXT_HEADS
        monotonic_ns = time.monotonic_ns
        checkpoint = trio.lowlevel.checkpoint
        for _ in range(self.deltas):
            payload = prefix + b'%d"}' % monotonic_ns()
            frame = heads[len(payload)] + payload if len(payload) < 126 else client_frame(payload)
            written = write_now(stream, frame)
            if written != len(frame):
                await _finish_write(stream, frame, written)
            await checkpoint()
        done = b'{"type":"done","id":"' + request_id + b'","finish_reason":"stop"}'
        await _write(stream, client_frame(done))


async def _write(stream: trio.SocketStream, data: bytes) -> None:
    written = write_now(stream, data)
    if written != len(data):
        await _finish_write(stream, data, written)


async def _finish_write(stream: trio.SocketStream, data: bytes, written: int | None) -> None:
    if written is None:
        raise trio.BrokenResourceError("the relay closed the connection")
    await stream.send_all(data[written:])


@dataclass
class StreamFleet:
    """:class:`StreamAgent` s connected to one relay (or bare loop)."""

    host: str
    port: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    agents: list[StreamAgent] = field(default_factory=list)
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def connected(self) -> int:
        return sum(1 for agent in self.agents if not agent.closed)

    async def start(
        self,
        nursery: trio.Nursery,
        number: int,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Connect ``number`` agents, running them in ``nursery``; returns once every
        handshake is done or has failed."""

        async def connect_one() -> None:
            agent = StreamAgent(self.host, self.port, headers=self.headers)
            await nursery.start(self._run, agent)
            self.agents.append(agent)

        errors = (OSError, trio.BrokenResourceError, AgentRefused, ValueError)
        await connect_many(number, connect_one, errors, self, on_progress=on_progress)

    @staticmethod
    async def _run(
        agent: StreamAgent, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await agent.run(task_status=task_status)
        except (OSError, trio.BrokenResourceError, FrameError, ValueError):
            if agent.agent_id is None:
                raise  # before started(): nursery.start() reports it
            log.debug("stream agent %s lost its connection", agent.agent_id, exc_info=True)


# -- the load ------------------------------------------------------------------------------


@dataclass
class StreamRecorder(LoadRecorder):
    """:class:`LoadRecorder` (one request = one streamed answer) plus its deltas."""

    deltas: int = 0
    delta_latencies: array[int] = field(default_factory=lambda: array("q"))  # ns

    def stream_done(self, now: float, outcome: StreamOutcome, latency: float) -> None:
        """One answer ended (its deltas' latencies are in ``delta_latencies`` already)."""
        self.deltas += outcome.deltas
        if outcome.ok:
            self.request_done(now, 200, latency)
            return
        self.finished = now if self.finished is None else max(self.finished, now)
        if outcome.status is None:
            kind = "connection"
        elif outcome.status != 200:
            kind = str(outcome.status)
        else:
            kind = "incomplete stream"
        self.errors[kind] += 1


def stream_figures(result: ScenarioResult, recorder: StreamRecorder) -> None:
    """``result``'s per-delta figures from ``recorder`` (its CPU figures filled already)."""
    result.deltas_per_answer = DELTAS
    result.deltas = recorder.deltas
    result.deltas_per_s = rate(recorder.deltas, recorder.elapsed)
    result.delta_latency = Distribution.of(
        [value / 1e9 for value in recorder.delta_latencies]
    ).as_ms()
    latencies = recorder.delta_latencies
    if latencies and result.deltas_per_s:
        # Little's law: deltas between the agents and the clients, on average.
        mean = sum(latencies) / len(latencies) / 1e9
        in_flight = mean * result.deltas_per_s
        note = (
            f"{in_flight:,.0f} deltas in flight on average (mean added latency "
            f"{mean * 1000:.1f} ms times {result.deltas_per_s:,.0f} deltas/s), of at most "
            f"{result.clients * DELTAS:,} ({result.clients} answers of {DELTAS})"
        )
        if in_flight > 2 * max(1, result.clients):
            note += (
                ": the agents send faster than the server forwards, so a delta's added "
                "latency is mostly its wait behind the deltas sent before it"
            )
        result.notes.append(note)
    if recorder.deltas:
        if result.server_cpu_s is not None:
            result.server_cpu_us_per_delta = result.server_cpu_s / recorder.deltas * 1e6
        if result.bench_cpu_s is not None:
            result.bench_cpu_us_per_delta = result.bench_cpu_s / recorder.deltas * 1e6


class StreamPhase(LoadPhase):
    """:class:`LoadPhase` with :class:`StreamClient` s asking for streamed answers."""

    def new_client(self, target: Target) -> HttpClient:
        return StreamClient(target.host, target.port, headers=target.client_headers())

    async def warm_up(self, client: HttpClient, shape: Shape = STREAM_ASK) -> None:
        assert isinstance(client, StreamClient)
        outcome = await client.stream(shape.warm_up, array("q"), shape.path)
        if not outcome.ok:
            log.debug("warm-up stream failed: %s", outcome.problem)

    async def client_loop(
        self,
        client: HttpClient,
        recorder: LoadRecorder,
        deadline: float,
        tracked: bool,
        shape: Shape = STREAM_ASK,
    ) -> None:
        assert isinstance(client, StreamClient) and isinstance(recorder, StreamRecorder)
        budget = self.settings.requests
        latencies = recorder.delta_latencies
        while True:
            now = trio.current_time()
            if now >= deadline or (budget is not None and recorder.sent >= budget):
                return
            body = shape.body(next(self.numbers))
            recorder.request_sent(now)
            outcome = await client.stream(body, latencies, shape.path)
            end = trio.current_time()
            recorder.stream_done(end, outcome, end - now)
            if not outcome.ok:
                log.debug("stream failed: %s", outcome.problem)
                if outcome.status is None:
                    await trio.sleep(0.1)  # do not spin on a refused connection

    def fill(self, load: Load) -> None:
        super().fill(load)
        assert isinstance(load.recorder, StreamRecorder)
        stream_figures(load.result, load.recorder)

    def load_line(self, result: ScenarioResult, recorder: LoadRecorder) -> str:
        deltas = recorder.deltas if isinstance(recorder, StreamRecorder) else 0
        per_second = rate(deltas, recorder.elapsed) or 0.0
        return (
            f"{result.clients} streams  {recorder.ok} answers  {recorder.failed} errors  "
            f"{per_second:,.0f} deltas/s"
        )
