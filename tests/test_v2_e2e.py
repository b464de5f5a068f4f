"""Protocol v2 end to end: a real relayd subprocess, real ``relayd.agentkit.V2Agent``
agents over trio-websocket, raw HTTP/1.1 clients on 127.0.0.1.

Streamed answers are read with the small chunked/server-sent-events reader below
(tests/raw_http.py reads Content-Length bodies only). Both ways a request reaches
``/api/ask`` are covered: relayd's wire path (a connection whose first request is a
plain ``POST /api/ask``) and Hypercorn's (a chunked request body, or ``GET /health``
first on the same connection); which one served is read from relayd's debug log.

Everything runs in real time, so every wait is bounded by ``trio.fail_after`` and
every "until" is a bounded poll of something observable (the agents' stats in this
process, ``/api/connections``, relayd's log).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from relayd.agentkit import (
    AgentProfile,
    Finish,
    V2Agent,
    V2Handler,
    echo_handler,
    echo_stream_handler,
)
from relayd.protocol import Request
from relayd.protocol.v2 import ChatRequest, Goodbye
from tests.support import Relayd
from tests.test_ask_wire_e2e import DEBUG, HEALTH, ask_request, wait_for_log
from tests.test_relay_e2e import Agent, client, connections

HOST = "127.0.0.1"
STEP = 20.0  # bound on one step that should take well under a second
RelaydFactory = Callable[..., Relayd]


# -- agents ------------------------------------------------------------------------------


class RunningV2:
    """A V2Agent's run() loop in its own cancel scope, so that a test can stop it."""

    def __init__(self, agent: V2Agent) -> None:
        self.agent = agent
        self.scope = trio.CancelScope()
        self.finished = trio.Event()

    @property
    def stats(self) -> Any:
        return self.agent.stats

    @property
    def id(self) -> str:
        assert self.agent.agent_id is not None
        return self.agent.agent_id

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.agent.run(task_status=task_status)
        finally:
            self.finished.set()


async def start_v2(
    nursery: trio.Nursery,
    url: str,
    handler: V2Handler,
    profile: AgentProfile | None = None,
    **kwargs: Any,
) -> RunningV2:
    """Start a V2Agent; return once the relay has welcomed it."""
    running = RunningV2(V2Agent(url, handler, profile, **kwargs))
    await nursery.start(running.run)
    return running


async def start_v1(nursery: trio.Nursery, url: str) -> Agent:
    agent = Agent(url, echo_handler())
    agent.id = await nursery.start(agent.run)
    return agent


def holding(gate: trio.Event, received: trio.Event | None = None, first: str = "") -> V2Handler:
    """Yield ``first`` (if any), then wait for ``gate``, then ``echo:<content>``."""

    async def handle(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        assert isinstance(request, Request)
        if first:
            yield first
        if received is not None:
            received.set()
        await gate.wait()
        yield "echo:" + request.content

    return handle


def forever(first: str = "") -> V2Handler:
    """Yield ``first`` (if any), then never finish."""

    async def handle(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        if first:
            yield first
        await trio.sleep_forever()

    return handle


async def until(check: Callable[[], bool], interval: float = 0.005) -> None:
    """Poll ``check`` (bounded by the caller's fail_after)."""
    while True:
        if check():
            return
        await trio.sleep(interval)


async def listing(http: httpx.AsyncClient, relayd: Relayd) -> dict[str, dict[str, Any]]:
    return {entry["Id"]: entry for entry in await connections(http, relayd)}


async def wait_listed(
    http: httpx.AsyncClient, relayd: Relayd, check: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """Poll /api/connections until ``check`` holds for it (bounded by the caller)."""
    while True:
        entries = await listing(http, relayd)
        if check(entries):
            return entries
        await trio.sleep(0.02)


# -- raw HTTP with chunked bodies and server-sent events -----------------------------------


@dataclass
class Head:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key.lower() == name]
        assert len(values) <= 1, self.headers
        return values[0] if values else None


@dataclass
class Streamed:
    head: Head
    events: list[tuple[str, Any]] = field(default_factory=list)
    chunks: int = 0

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(data["content"] for kind, data in self.events if kind == "delta")


class HttpConnection:
    """One client connection that reads responses framed by Content-Length or chunked,
    and server-sent events out of a chunked body, as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        host, port = stream.socket.getsockname()[:2]
        self.local = f"{host}:{port}"

    @classmethod
    async def open(cls, relayd: Relayd) -> HttpConnection:
        return cls(await trio.open_tcp_stream(HOST, relayd.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise AssertionError(f"the connection ended; unparsed: {self.buffer[:200]!r}")
        self.buffer += data

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            await self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def head(self) -> Head:
        status_line = await self._line()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = []
        while line := await self._line():
            name, colon, value = line.partition(b":")
            assert colon, line
            headers.append((name.strip(), value.strip()))
        return Head(status_line, headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The chunks of a chunked body, as they arrive, until the last one."""
        while True:
            size_line = await self._line()
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await self._line():  # trailer fields, then the empty line
                    pass
                return
            data = await self._exactly(size)
            assert await self._exactly(2) == b"\r\n"
            yield data

    async def json_body(self, head: Head) -> Any:
        if head.header(b"transfer-encoding") == b"chunked":
            body = b"".join([data async for data in self.chunks()])
        else:
            length = head.header(b"content-length")
            assert length is not None, head
            body = await self._exactly(int(length))
        return json.loads(body)

    async def stream_events(
        self, head: Head, on_event: Callable[[str, Any], Any] | None = None
    ) -> Streamed:
        """Read a ``text/event-stream`` body to its end; ``on_event`` is called as
        each event arrives (it may return an awaitable)."""
        assert head.status == 200, head
        assert head.header(b"content-type") == b"text/event-stream; charset=utf-8", head
        assert head.header(b"transfer-encoding") == b"chunked", head
        result = Streamed(head)
        pending = b""
        async for data in self.chunks():
            result.chunks += 1
            pending += data
            while b"\n\n" in pending:
                block, pending = pending.split(b"\n\n", 1)
                fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
                assert set(fields) == {b"event", b"data"}, block
                event = (fields[b"event"].decode(), json.loads(fields[b"data"]))
                result.events.append(event)
                if on_event is not None:
                    awaited = on_event(*event)
                    if awaited is not None:
                        await awaited
        assert pending == b"", pending
        return result


def chunked_ask(relayd: Relayd, body: dict[str, Any], extra: bytes = b"") -> bytes:
    """``POST /api/ask`` with a chunked body: not for the wire path, so Hypercorn's."""
    raw = json.dumps(body).encode()
    half = len(raw) // 2
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + relayd.admin_key.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n" + extra + b"\r\n"
        b"%x\r\n" % half + raw[:half] + b"\r\n"
        b"%x\r\n" % (len(raw) - half) + raw[half:] + b"\r\n0\r\n\r\n"
    )


PATHS = ["wire", "hypercorn-chunked", "hypercorn-after-health"]


async def send_ask(
    connection: HttpConnection,
    relayd: Relayd,
    path: str,
    body: dict[str, Any],
    extra: bytes = b"",
) -> None:
    """Send an ask the way ``path`` says (after /health on the same connection, for that)."""
    if path == "wire":
        await connection.send(ask_request(relayd, body, extra=extra))
    elif path == "hypercorn-chunked":
        await connection.send(chunked_ask(relayd, body, extra))
    else:
        await connection.send(HEALTH)
        health = await connection.head()
        assert health.status == 200
        length = health.header(b"content-length")
        assert length is not None
        assert await connection._exactly(int(length)) == b"OK"
        await connection.send(ask_request(relayd, body, extra=extra))


def assert_served_by(relayd: Relayd, connection: HttpConnection, path: str) -> None:
    """Which loop served ``connection``, from relayd's debug log."""
    log = relayd.log
    remote = f"remote={connection.local}\n"
    wire = f"connection served on the wire path: {remote}" in log
    handed = f"connection handed to Hypercorn: {remote}" in log
    assert (wire, handed) == ((True, False) if path == "wire" else (False, False)), path


ANSWER_FIELDS = {"id", "response_id", "conversation_id", "content", "error"}


# -- streaming through /api/ask ----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_stream_comes_as_deltas_then_done_on_both_paths(
    relayd_factory: RelaydFactory, path: str
) -> None:
    relayd = relayd_factory(args=DEBUG)
    gate = trio.Event()

    async def handler(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        assert isinstance(request, Request)
        yield "Hel"
        yield "lo, "
        await gate.wait()  # the first pieces must reach the client before the rest exists
        yield "wörld ✓"
        yield Finish(response_id="resp-1", finish_reason="stop")

    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd.agent_url, handler)
            connection = await HttpConnection.open(relayd)
            await send_ask(connection, relayd, path, {"content": "hi", "stream": True})
            head = await connection.head()

            def on_event(kind: str, data: Any) -> None:
                if kind == "delta" and data["content"] == "lo, ":
                    gate.set()

            streamed = await connection.stream_events(head, on_event)
            # The connection is kept alive, and the next (plain) answer has the same JSON.
            await send_ask(connection, relayd, "wire", {"content": "hi"})
            plain_head = await connection.head()
            gate.set()
            plain = await connection.json_body(plain_head)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert_served_by(relayd, connection, path)
    assert head.header(b"cache-control") == b"no-cache"
    assert head.header(b"content-length") is None
    assert streamed.kinds == ["delta", "delta", "delta", "done"]
    assert [data for kind, data in streamed.events if kind == "delta"] == [
        {"content": "Hel"},
        {"content": "lo, "},
        {"content": "wörld ✓"},
    ]
    done = streamed.events[-1][1]
    assert set(done) == ANSWER_FIELDS
    assert (done["content"], done["response_id"], done["error"]) == ("Hello, wörld ✓", "resp-1", "")
    assert streamed.text == done["content"]
    assert plain_head.status == 200
    assert set(plain) == set(done)
    assert plain["content"] == done["content"]
    assert agent.stats.replies == 2


@pytest.mark.parametrize("path", PATHS)
async def test_accept_event_stream_streams_and_stream_false_does_not(
    relayd_factory: RelaydFactory, path: str
) -> None:
    relayd = relayd_factory(args=DEBUG)
    accept = b"Accept: text/event-stream\r\n"
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            await start_v2(nursery, relayd.agent_url, echo_stream_handler())
            connection = await HttpConnection.open(relayd)
            await send_ask(connection, relayd, path, {"content": "one two three"}, accept)
            streamed = await connection.stream_events(await connection.head())
            await send_ask(connection, relayd, "wire", {"content": "a b", "stream": False}, accept)
            head = await connection.head()
            plain = await connection.json_body(head)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert streamed.kinds == ["delta", "delta", "delta", "done"]
    assert streamed.text == "echo:one two three"
    assert head.status == 200
    assert head.header(b"content-type") == b"application/json"
    assert plain["content"] == "echo:a b"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", ["yes", 1, None, [True]], ids=repr)
async def test_stream_that_is_not_a_boolean_is_400(
    relayd_factory: RelaydFactory, path: str, stream: Any
) -> None:
    relayd = relayd_factory(args=DEBUG)
    body: dict[str, Any] = {"content": "hi", "stream": stream}
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(nursery, relayd.agent_url, echo_stream_handler())
            connection = await HttpConnection.open(relayd)
            await send_ask(connection, relayd, path, body)
            head = await connection.head()
            answer = await connection.json_body(head)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    if stream is None:  # "not given"
        assert head.status == 200, answer
        assert answer["content"] == "echo:hi"
        return
    assert head.status == 400, answer
    assert answer == {"error": "stream must be true or false"}
    assert agent.stats.requests == 0


@pytest.mark.parametrize("path", PATHS)
async def test_an_error_before_the_first_piece_keeps_its_status(
    relayd_factory: RelaydFactory, path: str
) -> None:
    relayd = relayd_factory(args=DEBUG)
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            await start_v2(
                nursery, relayd.agent_url, echo_stream_handler(), AgentProfile(models=("a",))
            )
            connection = await HttpConnection.open(relayd)
            await send_ask(
                connection, relayd, path, {"content": "hi", "stream": True, "model": "b"}
            )
            head = await connection.head()
            answer = await connection.json_body(head)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert head.status == 404
    assert head.header(b"content-type") == b"application/json"
    assert answer == {"error": "no connected agent serves model 'b'; models served: a"}


# -- cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "plain"])
async def test_the_agent_sees_the_cancel_within_100ms_of_the_client_leaving(
    relayd_factory: RelaydFactory, path: str, streaming: bool
) -> None:
    relayd = relayd_factory(args=DEBUG)
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_v2(nursery, relayd.agent_url, forever("first piece"))
            connection = await HttpConnection.open(relayd)
            await send_ask(connection, relayd, path, {"content": "hi", "stream": streaming})
            if streaming:
                head = await connection.head()
                assert head.status == 200
            await until(lambda: agent.stats.inflight == 1)
            if streaming:
                # The first piece reached the client: the stream is under way.
                while b"first piece" not in connection.buffer:
                    await connection._fill()
            closed_at = trio.current_time()
            await connection.aclose()
            await until(lambda: bool(agent.stats.cancel_times))
            entries = await listing(http, relayd)
            await wait_for_log(relayd, "reason=the client went away")
            nursery.cancel_scope.cancel()
    (cancelled_at,) = agent.stats.cancel_times
    assert cancelled_at - closed_at < 0.1, cancelled_at - closed_at
    assert agent.stats.inflight == 0  # the handler was cancelled
    assert entries[agent.id]["inflight"] == 0  # the slot is free at once


async def test_deadline_cancels_at_the_agent_answers_504_and_frees_the_slot(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory(config='[requests]\ntimeout = "1s"\n')
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_v2(nursery, relayd.agent_url, forever())
            connection = await HttpConnection.open(relayd)
            started = trio.current_time()
            await send_ask(connection, relayd, "wire", {"content": "never answered"})
            head = await connection.head()
            answer = await connection.json_body(head)
            answered = trio.current_time()
            entries = await listing(http, relayd)
            await until(lambda: bool(agent.stats.cancel_times))
            await until(lambda: agent.stats.inflight == 0)
            await wait_for_log(relayd, "reason=requests.timeout passed")
            # The freed slot takes the next request at once (and times out the same way).
            await send_ask(connection, relayd, "wire", {"content": "next"})
            second = await connection.head()
            await connection.json_body(second)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert head.status == 504
    assert answer == {"error": "no answer within requests.timeout (1s)"}
    assert 0.9 <= answered - started <= 3.0
    assert entries[agent.id]["inflight"] == 0
    assert agent.stats.requests == 2
    assert second.status == 504
    assert len(agent.stats.cancels) == 2


# -- drain -------------------------------------------------------------------------------


async def test_drain_finishes_in_flight_work_sends_new_work_elsewhere_then_disconnects(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory()
    gate = trio.Event()
    received = trio.Event()
    in_flight: list[httpx.Response] = []
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            draining = await start_v2(
                nursery,
                relayd.agent_url,
                holding(gate, received),
                AgentProfile(name="leaving", capacity=2),
            )

            async def first() -> None:
                in_flight.append(
                    await http.post(
                        "/api/ask",
                        content=json.dumps({"content": "in flight"}).encode(),
                        headers={"Authorization": relayd.admin_key},
                    )
                )

            nursery.start_soon(first)
            await received.wait()
            staying = await start_v2(
                nursery, relayd.agent_url, echo_stream_handler(), AgentProfile(name="staying")
            )
            await draining.agent.drain()
            entries = await wait_listed(
                http, relayd, lambda e: e.get(draining.id, {}).get("draining") is True
            )
            assert entries[draining.id]["inflight"] == 1
            assert entries[staying.id]["draining"] is False
            for n in range(3):
                response = await http.post(
                    "/api/ask",
                    content=json.dumps({"content": f"new {n}"}).encode(),
                    headers={"Authorization": relayd.admin_key},
                )
                assert response.status_code == 200, response.text
                assert response.json()["content"] == f"echo:new {n}"
            assert not in_flight
            gate.set()
            await draining.finished.wait()  # its run() ends: drained, not reconnecting
            await until(lambda: bool(in_flight))
            entries = await wait_listed(http, relayd, lambda e: draining.id not in e)
            nursery.cancel_scope.cancel()
    assert in_flight[0].status_code == 200, in_flight[0].text
    assert in_flight[0].json()["content"] == "echo:in flight"
    assert draining.stats.contents == ["in flight"]
    assert staying.stats.contents == ["new 0", "new 1", "new 2"]
    assert list(entries) == [staying.id]
    assert draining.stats.connections == 1


# -- goodbye, reconnect, resume ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


async def stop(relayd: Relayd) -> int:
    """SIGTERM and wait for the exit, off the Trio loop (the agents keep running)."""
    return await trio.to_thread.run_sync(relayd.stop)


@pytest.mark.slow
async def test_sigterm_sends_goodbye_to_a_v2_agent(relayd_factory: RelaydFactory) -> None:
    relayd = relayd_factory(config='[server]\nshutdown_grace = "1s"\n')
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            agent = await start_v2(
                nursery,
                relayd.agent_url,
                echo_stream_handler(),
                backoff_first=0.05,
                backoff_cap=0.2,
            )
            relayd.signal(signal.SIGTERM)
            await until(lambda: agent.stats.close_code is not None)
            nursery.cancel_scope.cancel()
    assert agent.stats.close_code == 1001
    assert agent.stats.goodbyes == [Goodbye("relayd is shutting down", 1.0)]


@pytest.mark.slow
async def test_run_reconnects_to_a_new_relayd_on_the_same_port_and_resumes(
    relayd_factory: RelaydFactory,
) -> None:
    """A restart on the same port (and state directory): V2Agent.run reconnects, the
    new relayd remembers the agent's id (relayd/persist.py), so it is resumed, and a
    conversation started before the restart continues on it."""
    port = free_port()
    args = ["--listen", f"{HOST}:{port}"]
    first = relayd_factory(args=args, config='[server]\nshutdown_grace = "1s"\n')
    url = f"ws://{HOST}:{port}/client/register"
    headers = {"Authorization": first.admin_key}
    with trio.fail_after(3 * STEP):
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=10) as http,
        ):
            agent = await start_v2(
                nursery,
                url,
                echo_stream_handler(),
                AgentProfile(name="survivor"),
                backoff_first=0.05,
                backoff_cap=0.2,
            )
            first_id = agent.id
            before = await http.post(
                "/api/ask", content=json.dumps({"content": "before"}).encode(), headers=headers
            )
            conversation = before.json()["conversation_id"]
            assert await stop(first) == 0
            assert agent.stats.close_code == 1001
            second = relayd_factory(args=args)
            entries = await wait_listed(http, second, lambda e: len(e) == 1)
            after = await http.post(
                "/api/ask",
                content=json.dumps({"content": "after", "conversation_id": conversation}).encode(),
                headers=headers,
            )
            nursery.cancel_scope.cancel()
    ((agent_id, entry),) = entries.items()
    assert (entry["name"], entry["protocol"]) == ("survivor", 2)
    assert agent.stats.connections >= 2
    assert agent_id == first_id == agent.id  # resumed
    assert before.status_code == 200, before.text
    assert after.status_code == 200, after.text
    assert after.json()["content"] == "echo:after"
    assert after.json()["conversation_id"] == conversation
    assert agent.stats.contents == ["before", "after"]


class Proxy:
    """A TCP proxy to relayd whose connections the test can cut abruptly (a reset,
    no WebSocket close frame): an agent's network failing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        upstream = await trio.open_tcp_stream(HOST, self.target_port)
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, nursery)
                nursery.start_soon(self._pump, upstream, downstream, nursery)
        self._scopes.discard(scope)
        for stream in (downstream, upstream):
            # SO_LINGER 0: close() sends a reset, like a dead network path.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()


async def test_an_abruptly_cut_agent_reconnects_resumes_its_id_and_keeps_its_conversation(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory()
    seen: list[Request] = []

    async def handler(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        assert isinstance(request, Request)
        seen.append(request)
        yield "echo:" + request.content

    proxy = Proxy(relayd.port)
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            await nursery.start(proxy.run)
            url = f"ws://{HOST}:{proxy.port}/client/register"
            agent = await start_v2(nursery, url, handler, backoff_first=0.05, backoff_cap=0.2)
            agent_id = agent.id
            headers = {"Authorization": relayd.admin_key}
            first = await http.post(
                "/api/ask", content=json.dumps({"content": "turn 1"}).encode(), headers=headers
            )
            conversation = first.json()["conversation_id"]
            proxy.cut()
            await until(lambda: agent.stats.connections == 2)
            await wait_listed(http, relayd, lambda e: agent_id in e and len(e) == 1)
            second = await http.post(
                "/api/ask",
                content=json.dumps({"content": "turn 2", "conversation_id": conversation}).encode(),
                headers=headers,
            )
            nursery.cancel_scope.cancel()
    assert agent.agent.agent_id == agent_id
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert second.json()["content"] == "echo:turn 2"
    assert second.json()["conversation_id"] == conversation
    assert [r.conversation_id for r in seen] == ["", conversation]
    assert proxy.accepted == 2
    assert "agent went away without a close frame" in relayd.log


async def test_a_refused_v2_agent_backs_off_before_reconnecting(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory(config="[agents]\nmax_agents = 1\n")
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            await start_v2(nursery, relayd.agent_url, echo_stream_handler())
            refused = RunningV2(
                V2Agent(relayd.agent_url, echo_stream_handler(), backoff_first=0.5, backoff_cap=2)
            )
            nursery.start_soon(refused.run)
            await until(lambda: refused.stats.close_code is not None)
            started = trio.current_time()
            with trio.move_on_after(1.5):  # a measuring window, not a synchronisation
                await trio.sleep_forever()
            attempts = refused.stats.connections
            elapsed = trio.current_time() - started
            assert len(await connections(http, relayd)) == 1
            nursery.cancel_scope.cancel()
    assert refused.stats.close_code == 1013
    # Backoff from 0.5 s with full jitter: a handful of attempts in 1.5 s, not hundreds.
    assert attempts <= 10, f"{attempts} connections in {elapsed:.1f}s"


# -- slow readers --------------------------------------------------------------------------

SLOW_READER_CONFIG = """
[requests]
max_response = "{max_response}"
timeout = "{timeout}"
[agents]
max_message = "64MiB"
"""


def flood(piece: int = 200, pause: float = 0.001) -> V2Handler:
    """Small pieces, one every ``pause`` seconds (each is written before the next comes
    while the client reads), never done: only a client that stops reading falls behind."""

    async def handle(request: Request | ChatRequest) -> AsyncIterator[str | Finish]:
        text = "x" * piece
        while True:
            yield text
            await trio.sleep(pause)

    return handle


async def slow_client(relayd: Relayd, body: dict[str, Any]) -> trio.SocketStream:
    """A client with a tiny receive buffer that sends ``body`` as a streamed ask and
    never reads."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((HOST, relayd.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(ask_request(relayd, body))
    return stream


@pytest.mark.slow
async def test_a_client_that_stops_reading_has_its_request_cancelled_and_relayd_serves_on(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory(config=SLOW_READER_CONFIG.format(max_response="1KiB", timeout="6s"))
    with trio.fail_after(3 * STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            flooding = await start_v2(
                nursery, relayd.agent_url, flood(), AgentProfile(models=("flood",))
            )
            await start_v2(
                nursery, relayd.agent_url, echo_stream_handler(), AgentProfile(models=("echo",))
            )
            stuck = await slow_client(relayd, {"content": "x", "model": "flood", "stream": True})
            await wait_for_log(relayd, "client reads too slowly")
            # Meanwhile relayd serves other clients.
            headers = {"Authorization": relayd.admin_key}
            during = await http.post(
                "/api/ask",
                content=json.dumps({"content": "during", "model": "echo"}).encode(),
                headers=headers,
            )
            await until(lambda: bool(flooding.stats.cancels), interval=0.05)
            await until(lambda: flooding.stats.inflight == 0)
            entries = await listing(http, relayd)
            after = await http.post(
                "/api/ask",
                content=json.dumps({"content": "after", "model": "echo"}).encode(),
                headers=headers,
            )
            await stuck.aclose()
            nursery.cancel_scope.cancel()
    assert during.status_code == 200, during.text
    assert after.status_code == 200, after.text
    assert entries[flooding.id]["inflight"] == 0
    assert relayd.process.poll() is None
    assert "Traceback" not in relayd.log, relayd.log


@pytest.mark.slow
async def test_a_client_that_stops_reading_is_cancelled_at_the_agent_promptly(
    relayd_factory: RelaydFactory,
) -> None:
    # 64 KiB: far more than a burst of pieces while one is written; only a write that
    # blocks (the client stopped reading) lets that much pile up.
    relayd = relayd_factory(config=SLOW_READER_CONFIG.format(max_response="64KiB", timeout="60s"))
    with trio.fail_after(3 * STEP):
        async with trio.open_nursery() as nursery:
            flooding = await start_v2(nursery, relayd.agent_url, flood())
            stuck = await slow_client(relayd, {"content": "x", "stream": True})
            await wait_for_log(relayd, "client reads too slowly")
            with trio.fail_after(3):  # not when the blocked write is cut short (30 s)
                await until(lambda: bool(flooding.stats.cancels), interval=0.05)
            await wait_for_log(relayd, "reason=the client read the answer more slowly than it came")
            await stuck.aclose()
            nursery.cancel_scope.cancel()


# -- model routing, mixed pools, /api/connections ---------------------------------------------


async def test_model_routing(relayd_factory: RelaydFactory) -> None:
    relayd = relayd_factory()
    headers = {"Authorization": relayd.admin_key}
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            a_agent = await start_v2(
                nursery,
                relayd.agent_url,
                echo_stream_handler(prefix="A:"),
                AgentProfile(models=("a",)),
            )
            b_agent = await start_v2(
                nursery,
                relayd.agent_url,
                echo_stream_handler(prefix="B:"),
                AgentProfile(models=("b",)),
            )

            async def ask(**body: Any) -> httpx.Response:
                return await http.post(
                    "/api/ask", content=json.dumps(body).encode(), headers=headers
                )

            to_a = [await ask(content=f"a{n}", model="a") for n in range(3)]
            to_b = [await ask(content=f"b{n}", model="b") for n in range(3)]
            unknown = await ask(content="c", model="c")
            anyone = [await ask(content=f"any{n}") for n in range(4)]
            empty_model = await ask(content="empty", model="")
            nursery.cancel_scope.cancel()
    assert [r.json()["content"] for r in to_a] == ["A:a0", "A:a1", "A:a2"]
    assert [r.json()["content"] for r in to_b] == ["B:b0", "B:b1", "B:b2"]
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "no connected agent serves model 'c'; models served: a, b"}
    assert all(r.status_code == 200 for r in anyone)
    assert {r.json()["content"][:2] for r in anyone} == {"A:", "B:"}  # either, and both
    assert empty_model.status_code == 200  # "" means "not given"
    assert a_agent.stats.contents[:3] == ["a0", "a1", "a2"]
    assert b_agent.stats.contents[:3] == ["b0", "b1", "b2"]


async def test_mixed_pool_a_v1_answer_streams_as_one_delta_then_done(
    relayd_factory: RelaydFactory,
) -> None:
    relayd = relayd_factory()
    gate = trio.Event()
    received = trio.Event()
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            v2 = await start_v2(nursery, relayd.agent_url, holding(gate, received, first="v2 "))
            held = await HttpConnection.open(relayd)
            await send_ask(held, relayd, "wire", {"content": "held", "stream": True})
            held_head = await held.head()
            await received.wait()
            v1 = await start_v1(nursery, relayd.agent_url)
            await wait_listed(http, relayd, lambda e: len(e) == 2)
            connection = await HttpConnection.open(relayd)
            await send_ask(connection, relayd, "wire", {"content": "to v1", "stream": True})
            streamed = await connection.stream_events(await connection.head())
            gate.set()
            held_stream = await held.stream_events(held_head)
            entries = await listing(http, relayd)
            await connection.aclose()
            await held.aclose()
            nursery.cancel_scope.cancel()
    assert streamed.kinds == ["delta", "done"]
    assert streamed.events[0] == ("delta", {"content": "echo:to v1"})
    assert streamed.events[1][1]["content"] == "echo:to v1"
    assert set(streamed.events[1][1]) == ANSWER_FIELDS
    assert v1.stats.contents == ["to v1"]
    assert held_stream.kinds == ["delta", "delta", "done"]
    assert held_stream.text == "v2 echo:held"
    assert {entry["protocol"] for entry in entries.values()} == {1, 2}
    assert entries[v2.id]["protocol"] == 2
    assert entries[v1.id]["protocol"] == 1


async def test_connections_show_the_v2_fields(relayd_factory: RelaydFactory) -> None:
    relayd = relayd_factory(config="[agents]\nmax_inflight = 3\n")
    profile = AgentProfile(
        name="gpu-box-1", version="ollama-bridge 1.4", capacity=4, models=("llama3.1:8b", "qwen")
    )
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            v2 = await start_v2(nursery, relayd.agent_url, echo_stream_handler(), profile)
            v1 = await start_v1(nursery, relayd.agent_url)
            entries = await wait_listed(http, relayd, lambda e: len(e) == 2)
            await v2.agent.update(capacity=2, models=("qwen",))
            updated = await wait_listed(http, relayd, lambda e: e[v2.id]["capacity"] == 2)
            nursery.cancel_scope.cancel()
    entry = entries[v2.id]
    assert {
        key: entry[key]
        for key in ("protocol", "name", "software", "models", "draining", "capacity", "inflight")
    } == {
        "protocol": 2,
        "name": "gpu-box-1",
        "software": "ollama-bridge 1.4",
        "models": ["llama3.1:8b", "qwen"],
        "draining": False,
        "capacity": 4,
        "inflight": 0,
    }
    old = entries[v1.id]
    assert {key: old[key] for key in ("protocol", "name", "software", "models", "draining")} == {
        "protocol": 1,
        "name": "",
        "software": "",
        "models": [],
        "draining": False,
    }
    assert old["capacity"] == 3
    assert updated[v2.id]["models"] == ["qwen"]
    assert uuid.UUID(v2.id)
