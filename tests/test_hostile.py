"""Hostile input against a real relayd: every scenario ends with the daemon still serving.

Each test starts a real relayd subprocess on 127.0.0.1 (tests/support.py), attacks
it the way a broken or malicious peer on the internet would, and then calls
:func:`assert_still_serving`: the process is alive, ``/health`` answers quickly,
and a well-behaved agent that connects now still gets work and answers it.

The first scenarios are regression tests for the Hypercorn traps fixed in
relayd/front/server.py (see its docstring); each would fail without its fix.
Every wait is bounded by ``trio.fail_after``; every socket is on loopback.

The tests must hold on a busy machine: a test waits for what it can observe (the
agent list in /api/connections, a log line, bytes arriving on a socket, a response)
and never sleeps to let relayd get somewhere. Where a test times something, the
bound is generous (:data:`PROMPT`, or a margin of seconds) yet well short of what
the trap it guards against would take (a timeout of 10 s or more, or never).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from relayd.agentkit import AgentStats, echo_handler, run_agent, serve_agent
from relayd.daemon import HYPERCORN_GRACE
from relayd.protocol import Request as AgentRequest
from relayd.throttle import FailureThrottle
from tests.support import Relayd

StartRelayd = Callable[..., Relayd]

HOST = "127.0.0.1"
# Loopback too on Linux: a second client address, for what must not affect others.
OTHER_HOST = "127.0.0.2"
AGENT_PATH = "/client/register"
# "Answered promptly": a daemon stuck behind a hostile peer would take a timeout of
# 10 s or more (idle_timeout in these tests, the 30 s write timeout) or never answer,
# while a busy machine can delay a healthy answer by a second or two.
PROMPT = 5.0


# -- helpers ---------------------------------------------------------------------------


def http_client(relayd: Relayd, local_address: str | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=local_address) if local_address else None
    return httpx.AsyncClient(base_url=relayd.url, timeout=10, transport=transport)


def admin_headers(relayd: Relayd) -> dict[str, str]:
    return {"Authorization": relayd.admin_key}


async def ask(
    client: httpx.AsyncClient, relayd: Relayd, content: str, **fields: Any
) -> httpx.Response:
    body = json.dumps({"content": content, **fields})
    return await client.post("/api/ask", content=body, headers=admin_headers(relayd))


async def connections(client: httpx.AsyncClient, relayd: Relayd) -> list[dict[str, Any]]:
    response = await client.get(
        "/api/connections", headers={"Authorization": f"Bearer {relayd.admin_key}"}
    )
    assert response.status_code == 200, response.text
    listing: list[dict[str, Any]] = response.json()["connections"]
    return listing


async def connected_ids(client: httpx.AsyncClient, relayd: Relayd) -> list[str]:
    return [entry["Id"] for entry in await connections(client, relayd)]


async def wait_for_agents(
    client: httpx.AsyncClient, relayd: Relayd, predicate: Callable[[list[str]], bool]
) -> list[str]:
    """Poll /api/connections (bounded) until ``predicate(ids)`` holds."""
    with trio.fail_after(10):
        while True:
            ids = await connected_ids(client, relayd)
            if predicate(ids):
                return ids
            await trio.sleep(0.02)


async def wait_for_inflight(
    client: httpx.AsyncClient, relayd: Relayd, agent_id: str | None, inflight: int
) -> None:
    """Poll /api/connections (bounded) until agent ``agent_id`` has ``inflight`` requests."""
    with trio.fail_after(10):
        while True:
            listing = await connections(client, relayd)
            if [entry["inflight"] for entry in listing if entry["Id"] == agent_id] == [inflight]:
                return
            await trio.sleep(0.02)


async def wait_for_log(relayd: Relayd, text: str, count: int = 1) -> None:
    """Poll relayd's log (bounded) until ``text`` occurs in it ``count`` times."""
    with trio.fail_after(10):
        while True:
            if relayd.log.count(text) >= count:
                return
            await trio.sleep(0.02)


def json_error(response: httpx.Response) -> str:
    """The ``error`` text of a JSON error response; fails on anything else."""
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.status_code,
        response.headers,
        response.text[:300],
    )
    assert "<html" not in response.text.lower()
    document = response.json()
    assert isinstance(document, dict) and isinstance(document.get("error"), str), document
    assert document["error"]
    return str(document["error"])


@contextlib.asynccontextmanager
async def echo_agent(
    relayd: Relayd, *, local_address: str | None = None, stats: AgentStats | None = None
) -> AsyncIterator[str]:
    """A well-behaved agent (agentkit's), connected from ``local_address``; yields its id
    once relayd lists it among the connections."""
    stats = stats if stats is not None else AgentStats()
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=local_address)
        ws = await wrap_client_stream(nursery, stream, HOST, AGENT_PATH, message_queue_size=16)

        async def serve(task_status: trio.TaskStatus[str]) -> None:
            async with ws:
                await serve_agent(ws, echo_handler(), stats=stats, task_status=task_status)

        agent_id: str = await nursery.start(serve)
        async with http_client(relayd, local_address) as client:
            await wait_for_agents(client, relayd, lambda ids: agent_id in ids)
        yield agent_id
        nursery.cancel_scope.cancel()


async def assert_still_serving(relayd: Relayd, *, local_address: str | None = None) -> None:
    """The daemon is alive, answers /health and a question promptly (:data:`PROMPT`), and a
    new agent gets work."""
    assert relayd.process.poll() is None, f"relayd exited:\n{relayd.log}"
    with trio.fail_after(30):
        async with http_client(relayd, local_address) as client:
            started = time.monotonic()
            health = await client.get("/health")
            assert health.status_code == 200 and health.text == "OK", health.text
            assert time.monotonic() - started < PROMPT
            stats = AgentStats()
            async with echo_agent(relayd, local_address=local_address, stats=stats):
                nonce = uuid.uuid4().hex
                started = time.monotonic()
                response = await client.post(
                    "/api/ask",
                    content=json.dumps({"content": nonce}),
                    headers=admin_headers(relayd),
                )
                assert response.status_code == 200, response.text
                assert response.json()["content"] == "echo:" + nonce
                assert time.monotonic() - started < PROMPT
                assert nonce in stats.contents
    assert relayd.process.poll() is None, f"relayd exited:\n{relayd.log}"


async def read_until_closed(stream: trio.SocketStream, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic).

    Fails if the connection is still open after ``limit`` seconds.
    """
    received = b""
    with trio.fail_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the server: closed too
                data = b""
            if not data:
                return received, time.monotonic()
            received += data


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client WebSocket frame, built by hand (for invalid payloads)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    elif length < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def frame(frame_id: str, kind: str, data: str = "") -> str:
    return json.dumps({"id": frame_id, "message": kind, "data": data})


class RawAgent:
    """A WebSocket agent written on wsproto, so a test controls every byte it sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None
        self.closed = False
        self.agent_id: str | None = None
        self._pending: deque[str | bytes | CloseConnection] = deque()
        self._text: list[str] = []
        self._bytes = b""

    @classmethod
    async def open(
        cls,
        relayd: Relayd,
        target: str = AGENT_PATH,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        local_address: str | None = None,
    ) -> tuple[RawAgent, int, dict[str, str], bytes]:
        """Connect; ``(agent, status, headers, body)``: 101 when accepted, else the refusal."""
        stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=local_address)
        agent = cls(stream)
        request = Request(host=f"{HOST}:{relayd.port}", target=target, extra_headers=list(headers))
        await stream.send_all(agent.ws.send(request))
        status = 0
        response_headers: dict[str, str] = {}
        body = b""
        with trio.fail_after(10):
            while True:
                data = await stream.receive_some(65536)
                agent.ws.receive_data(data or None)
                for event in agent.ws.events():
                    if isinstance(event, AcceptConnection):
                        return agent, 101, {}, b""
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        response_headers = {
                            name.decode().lower(): value.decode() for name, value in event.headers
                        }
                        if not event.has_body:
                            await stream.aclose()
                            return agent, status, response_headers, body
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            await stream.aclose()
                            return agent, status, response_headers, body
                if not data:
                    raise AssertionError(f"connection closed during the upgrade; status {status}")

    @classmethod
    async def connect(cls, relayd: Relayd, target: str = AGENT_PATH) -> RawAgent:
        """Connect and answer the greeting (a fresh id)."""
        agent, status, _, body = await cls.open(relayd, target)
        assert status == 101, (status, body)
        greeting = await agent.receive_json()
        assert greeting["message"] == "Connection id", greeting
        await agent.send_text(frame(greeting["id"], "Connection id"))
        agent.agent_id = greeting["id"]
        return agent

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(Message(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(Message(data=data)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> str | bytes | CloseConnection | None:
        """The next whole message, the server's close, or None once the socket is gone."""
        while True:
            await self._drain_events()
            if self._pending:
                return self._pending.popleft()
            if self.closed:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = True
                return None
            self.ws.receive_data(data)

    async def _drain_events(self) -> None:
        # Events may be buffered already (the greeting can come with the 101).
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    self._pending.append("".join(self._text))
                    self._text = []
            elif isinstance(event, BytesMessage):
                self._bytes += event.data
                if event.message_finished:
                    self._pending.append(self._bytes)
                    self._bytes = b""
            elif isinstance(event, Ping):
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self._pending.append(event)
                with contextlib.suppress(Exception):
                    await self.stream.send_all(self.ws.send(event.response()))
                self.closed = True

    async def receive_json(self, *, skip_pings: bool = True) -> dict[str, Any]:
        """The next protocol frame (pings answered and skipped); fails on a close."""
        with trio.fail_after(10):
            while True:
                message = await self.receive()
                assert isinstance(message, str), f"expected a text frame, got {message!r}"
                document: dict[str, Any] = json.loads(message)
                if skip_pings and document.get("message") == "ping":
                    await self.send_text(frame(document["id"], "pong"))
                    continue
                return document

    async def wait_closed(self, limit: float = 10) -> int | None:
        """The close code the server sends (None: the socket just went away)."""
        with trio.fail_after(limit):
            while True:
                message = await self.receive()
                if message is None or isinstance(message, CloseConnection):
                    return self.close_code

    async def abort(self) -> None:
        """Vanish: no close frame, a TCP reset."""
        self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()
        self.closed = True

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def reply_frame(request: dict[str, Any], content: str) -> str:
    data = json.dumps(
        {"response_id": str(uuid.uuid4()), "conversation_id": str(uuid.uuid4()), "content": content}
    )
    return frame(request["id"], "ChatGptResponse", data)


def request_content(request: dict[str, Any]) -> str:
    assert request["message"] == "ChatGptRequest", request
    return str(json.loads(request["data"])["content"])


# -- trap 1: a bad upgrade request used to kill the process -----------------------------

UPGRADE_HEADERS = (
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)
BAD_UPGRADE = b"GET /client/register HTTP/1.1\r\n" + UPGRADE_HEADERS + b"\r\nx\n"
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        BAD_UPGRADE,  # relayd's own agent wire path
        b"GET /elsewhere HTTP/1.1\r\n" + UPGRADE_HEADERS + b"\r\nx\n",  # Hypercorn's path
        HEALTH_REQUEST + BAD_UPGRADE,  # an upgrade after another request: Hypercorn's path
    ],
    ids=["agent-path", "other-path", "after-a-request"],
)
async def test_upgrade_with_bytes_after_the_headers_gets_400_and_the_daemon_lives(
    relayd: Relayd, request_bytes: bytes
) -> None:
    """RFC 6455: a client waits for the 101 before sending frames. The 400 is
    followed by the connection closing at once (Hypercorn's own path used to
    leave it open, waiting for an app that waited for messages)."""
    for _ in range(20):
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        await stream.send_all(request_bytes)
        received, _ = await read_until_closed(stream, PROMPT)
        last_response = received[received.rfind(b"HTTP/1.1 ") :]
        assert status_of(last_response) == 400, received
        await stream.aclose()
        assert relayd.process.poll() is None, relayd.log
    await assert_still_serving(relayd)


async def test_an_agent_upgrading_after_another_request_is_served(relayd: Relayd) -> None:
    """An upgrade that is not a connection's first request is not taken by
    relayd's wire path; Hypercorn and the ASGI agent endpoint serve it, fully."""
    stream = await trio.open_tcp_stream(HOST, relayd.port)
    await stream.send_all(HEALTH_REQUEST)
    received = b""
    with trio.fail_after(10):
        while not received.endswith(b"\r\n\r\nOK"):
            received += await stream.receive_some(65536)
    assert status_of(received) == 200
    agent = RawAgent(stream)
    await stream.send_all(agent.ws.send(Request(host=f"{HOST}:{relayd.port}", target=AGENT_PATH)))
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            agent.ws.receive_data(data)
            if any(isinstance(event, AcceptConnection) for event in agent.ws.events()):
                break
    greeting = await agent.receive_json()
    await agent.send_text(frame(greeting["id"], "Connection id"))
    async with http_client(relayd) as client, trio.open_nursery() as nursery:
        await wait_for_agents(client, relayd, lambda ids: greeting["id"] in ids)
        answered: list[httpx.Response] = []

        async def asker() -> None:
            answered.append(await ask(client, relayd, "via hypercorn"))

        nursery.start_soon(asker)
        question = await agent.receive_json()
        assert request_content(question) == "via hypercorn"
        await agent.send_text(reply_frame(question, "answered"))
    assert answered[0].status_code == 200, answered[0].text
    assert answered[0].json()["content"] == "answered"
    await agent.aclose()


async def test_bad_upgrades_do_not_flood_the_log_with_errors(relayd: Relayd) -> None:
    """The same request, for what the operator sees: at most a line per request, no
    ERROR record with a traceback (anyone could otherwise fill the journal at error
    priority, one packet each)."""
    for _ in range(5):
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        await stream.send_all(BAD_UPGRADE)
        received, _ = await read_until_closed(stream, 5)
        await stream.aclose()
        assert status_of(received) == 400
    await assert_still_serving(relayd)
    log = relayd.log
    assert " ERROR " not in log and "Traceback" not in log, log
    assert len(log.splitlines()) < 30, log


# -- trap 2: idle keep-alive connections were never closed -------------------------------

IDLE_1S = '[server]\nidle_timeout = "1s"\n'


async def test_idle_connections_are_closed_by_idle_timeout(relayd_factory: StartRelayd) -> None:
    """After one request, with no request at all, or trickling a header byte every 0.3 s:
    each connection is closed ``idle_timeout`` (1 s) after it last became idle, give or
    take what a busy machine adds; not at once, and not 30 s later when the trickle ends.

    Each start time is taken before relayd can start its timer (before the connect, or
    before the request is sent), so a slow test process can only lengthen what it
    measures, never shorten it."""
    relayd = relayd_factory(config=IDLE_1S)
    results: dict[str, tuple[bytes, float, float]] = {}

    async def after_one_request() -> None:
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        idle_from = time.monotonic()  # relayd's idle time starts once it has answered
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"OK" not in received:
            received += await stream.receive_some(65536)
        rest, closed_at = await read_until_closed(stream, 10)
        results["after one request"] = (received + rest, idle_from, closed_at)

    async def silent() -> None:
        opened = time.monotonic()
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        received, closed_at = await read_until_closed(stream, 10)
        results["silent"] = (received, opened, closed_at)

    async def trickling() -> None:
        opened = time.monotonic()
        stream = await trio.open_tcp_stream(HOST, relayd.port)
        headers = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100

        async def trickle() -> None:
            for byte in headers:
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(0.3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            received, closed_at = await read_until_closed(stream, 10)
            nursery.cancel_scope.cancel()
        results["trickling"] = (received, opened, closed_at)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(after_one_request)
        nursery.start_soon(silent)
        nursery.start_soon(trickling)
    # The trickle would go on for 30 s: a close within a few seconds is idle_timeout's.
    for name, (received, idle_from, closed_at) in results.items():
        assert 0.9 < closed_at - idle_from < 1 + PROMPT, (name, closed_at - idle_from)
        if name != "after one request":
            assert received == b"", (name, received)
    await assert_still_serving(relayd)


async def test_an_agent_connection_is_not_idle(relayd_factory: StartRelayd) -> None:
    """A WebSocket agent stays connected well past ``idle_timeout``: an upgraded
    connection has a request under way for its whole life."""
    relayd = relayd_factory(config=IDLE_1S)
    stats = AgentStats()
    with trio.fail_after(15):
        async with http_client(relayd) as client, echo_agent(relayd, stats=stats) as agent_id:
            await trio.sleep(2.5)
            assert stats.close_code is None, (stats.close_code, relayd.log)
            assert agent_id in await connected_ids(client, relayd), relayd.log
            response = await ask(client, relayd, "still there?")
            assert response.status_code == 200, response.text
            assert response.json()["content"] == "echo:still there?"
    await assert_still_serving(relayd)


async def test_a_request_longer_than_idle_timeout_is_answered(relayd_factory: StartRelayd) -> None:
    """A connection whose request takes 2.5 s (an agent thinking) is not idle and is not
    cut at ``idle_timeout`` (1 s)."""
    relayd = relayd_factory(config=IDLE_1S)

    async def slow(request: AgentRequest) -> tuple[str, str, str]:
        await trio.sleep(2.5)
        return str(uuid.uuid4()), str(uuid.uuid4()), "slow:" + request.content

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery, http_client(relayd) as client:
            agent_id = await nursery.start(
                lambda task_status: run_agent(relayd.agent_url, slow, task_status=task_status)
            )
            await wait_for_agents(client, relayd, lambda ids: agent_id in ids)
            response = await ask(client, relayd, "think")
            assert response.status_code == 200, (response.text, relayd.log)
            assert response.json()["content"] == "slow:think"
            nursery.cancel_scope.cancel()
    await assert_still_serving(relayd)


async def test_sigterm_with_an_idle_client_exits_quickly(relayd_factory: StartRelayd) -> None:
    """An idle keep-alive client must not hold shutdown for shutdown_grace (30 s default)."""
    relayd = relayd_factory(config='[server]\nidle_timeout = "60s"\n')
    await assert_still_serving(relayd)
    stream = await trio.open_tcp_stream(HOST, relayd.port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(10):
        assert b"200" in await stream.receive_some(65536)
    started = time.monotonic()
    relayd.signal(signal.SIGTERM)
    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(relayd.process.wait)
    # Well short of the 30 s that the idle client would otherwise hold it for.
    assert time.monotonic() - started < 2 * PROMPT, relayd.log
    assert code == 0, relayd.log
    await stream.aclose()


# -- trap 3: an agent that vanishes while relayd has frames for it ------------------------


async def test_agent_vanishing_with_frames_pending_does_not_stall_the_daemon(
    relayd_factory: StartRelayd,
) -> None:
    relayd = relayd_factory(
        config="[agents]\nmax_inflight = 8\n"
        'heartbeat_interval = "20ms"\nheartbeat_timeout = "30s"\n'
    )
    agent = await RawAgent.connect(relayd)
    content = "y" * 200_000
    outcomes: list[int] = []
    with trio.fail_after(20):
        async with http_client(relayd) as client:
            await wait_for_agents(client, relayd, lambda ids: agent.agent_id in ids)

            async def asker() -> None:
                response = await ask(client, relayd, content)
                outcomes.append(response.status_code)
                json_error(response)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(asker)
                # The agent reads nothing: once all eight are its and relayd's frames have
                # started arriving, they and the pings pile up; then it vanishes.
                await wait_for_inflight(client, relayd, agent.agent_id, 8)
                await trio.lowlevel.wait_readable(agent.stream.socket)
                await agent.abort()
                for _ in range(10):  # over a second or so, /health is answered at once
                    started = time.monotonic()
                    health = await client.get("/health")
                    assert health.status_code == 200
                    assert time.monotonic() - started < PROMPT, relayd.log
                    await trio.sleep(0.1)
    # The agent went before replying and no other agent was there.
    assert outcomes == [503] * 8, outcomes
    await assert_still_serving(relayd)


async def test_an_agent_that_stops_reading_does_not_hold_clients_past_the_timeout(
    relayd_factory: StartRelayd,
) -> None:
    """An agent that completes the handshake and then never reads its socket: relayd's
    writes to it block once the socket buffers are full. Clients must still get their
    answer (504, or 503) within ``requests.timeout`` (1 s) plus a margin (generous: a busy
    machine), not when the 30 s write timeout finally drops the agent."""
    relayd = relayd_factory(config='[requests]\ntimeout = "1s"\n[agents]\nmax_inflight = 4\n')
    agent = await RawAgent.connect(relayd)
    outcomes: list[tuple[int, float]] = []
    async with http_client(relayd) as client:
        await wait_for_agents(client, relayd, lambda ids: agent.agent_id in ids)

        async def asker() -> None:
            started = time.monotonic()
            response = await ask(client, relayd, "q" * 250_000)
            json_error(response)
            outcomes.append((response.status_code, time.monotonic() - started))

        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(asker)
    stuck = 12 - len(outcomes)
    assert stuck == 0, f"{stuck} of 12 clients still waiting after 20 s: {outcomes}"
    assert all(status in (503, 504) for status, _ in outcomes), outcomes
    assert max(elapsed for _, elapsed in outcomes) < 1 + PROMPT, outcomes
    await agent.abort()
    await assert_still_serving(relayd)


# -- trap 4: a client that never reads its response ---------------------------------------

BIG_ANSWER = 8_000_000  # more than the loopback socket buffers hold


async def writing_to(sock: trio.socket.SocketType) -> None:
    """Once relayd has started writing its answer to a non-reading client. That answer is
    ``BIG_ANSWER`` bytes against a receive window of a few KiB: from here on, relayd's
    write to ``sock`` is blocked."""
    await trio.lowlevel.wait_readable(sock)


async def open_non_reading_client(relayd: Relayd) -> trio.socket.SocketType:
    """A client that asks for a big answer and never reads it (receive window ~4 KiB)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((HOST, relayd.port))
    body = b'{"content": "big please"}'
    await sock.send(
        b"POST /api/ask HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + relayd.admin_key.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return sock


def big_handler(answered: int, done: trio.Event) -> Callable[[AgentRequest], Any]:
    """Answers 8 MB; sets ``done`` once it has answered ``answered`` requests."""
    count = 0

    async def handle(request: AgentRequest) -> tuple[str, str, str]:
        nonlocal count
        count += 1
        if count >= answered:
            done.set()
        return str(uuid.uuid4()), str(uuid.uuid4()), "z" * BIG_ANSWER

    return handle


BIG_CONFIG = '[server]\nshutdown_grace = "1s"\n[agents]\nmax_message = "32MiB"\n'


async def start_big_agent(
    nursery: trio.Nursery, client: httpx.AsyncClient, relayd: Relayd, answered: int
) -> trio.Event:
    """A real agent on `big_handler`, admitted; the event is set once it has answered
    ``answered`` requests."""
    done = trio.Event()
    agent_id = await nursery.start(
        lambda task_status: run_agent(
            relayd.agent_url, big_handler(answered, done), task_status=task_status
        )
    )
    await wait_for_agents(client, relayd, lambda ids: agent_id in ids)
    return done


async def test_a_client_that_never_reads_does_not_block_others(
    relayd_factory: StartRelayd,
) -> None:
    relayd = relayd_factory(config=BIG_CONFIG)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, http_client(relayd) as client:
            answered = await start_big_agent(nursery, client, relayd, 3)
            stuck = [await open_non_reading_client(relayd) for _ in range(3)]
            await answered.wait()
            for sock in stuck:
                await writing_to(sock)  # relayd is now blocked writing 3 x 8 MB
            for _ in range(5):
                started = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                assert time.monotonic() - started < PROMPT
            nursery.cancel_scope.cancel()
    await assert_still_serving(relayd)
    for sock in stuck:
        sock.close()


async def test_shutdown_with_a_client_that_never_reads(relayd_factory: StartRelayd) -> None:
    """SIGTERM with a peer stuck in a write: a clean exit (0) once shutdown_grace (1 s)
    and Hypercorn's grace for what is left of connections are over, before the hard stop
    (``HARD_STOP_MARGIN`` later) would have to end it with "exiting now" and 1."""
    relayd = relayd_factory(config=BIG_CONFIG)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, http_client(relayd) as client:
            answered = await start_big_agent(nursery, client, relayd, 1)
            stuck = await open_non_reading_client(relayd)
            await answered.wait()
            await writing_to(stuck)
            nursery.cancel_scope.cancel()
        await assert_still_serving(relayd)
        started = time.monotonic()
        relayd.signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(relayd.process.wait)
    elapsed = time.monotonic() - started
    stuck.close()
    assert elapsed < 1 + HYPERCORN_GRACE + PROMPT, (elapsed, relayd.log)
    assert code == 0, (code, relayd.log)
    assert "exiting now" not in relayd.log


# -- thousands of silent sockets ----------------------------------------------------------


@pytest.mark.slow
async def test_thousands_of_silent_sockets(relayd_factory: StartRelayd) -> None:
    """2,000 connections that never send a byte: while they are all open, /health and
    a question are answered promptly; then ``idle_timeout`` (10 s, counted from each
    connection's accept) closes every one of them, none much earlier (each start time is
    taken before the connect, so a slow test process cannot make a close look early)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = 2000
    idle = 10.0
    relayd = relayd_factory(config=f'[server]\nidle_timeout = "{idle:g}s"\n')
    streams: list[tuple[trio.SocketStream, float]] = []
    with trio.fail_after(60):
        limiter = trio.CapacityLimiter(64)

        async def open_one() -> None:
            async with limiter:
                opened = time.monotonic()
                stream = await trio.open_tcp_stream(HOST, relayd.port)
                streams.append((stream, opened))

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(open_one)
        assert len(streams) == count
        # While all of them are open, the daemon serves as usual.
        await assert_still_serving(relayd)
        poller = select.poll()
        for stream, _ in streams:
            poller.register(stream.socket.fileno(), select.POLLIN)
        readable = poller.poll(0)  # a silent connection the server closed is readable (EOF)
        assert not readable, f"{len(readable)} closed before the checks were over"

        closed_after: list[float] = []

        async def wait_closed(stream: trio.SocketStream, opened: float) -> None:
            received, closed_at = await read_until_closed(stream, idle + 10)
            assert received == b""
            closed_after.append(closed_at - opened)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for stream, opened in streams:
                nursery.start_soon(wait_closed, stream, opened)
    assert len(closed_after) == count
    assert min(closed_after) > idle - 0.5, min(closed_after)
    await assert_still_serving(relayd)


# -- agents that never answer the greeting -----------------------------------------------


async def test_handshakeless_agents_are_closed_with_1008(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config='[agents]\nhandshake_timeout = "500ms"\n')
    codes: list[int | None] = []
    durations: list[float] = []

    async def mute() -> None:
        started = time.monotonic()  # before relayd's handshake timer can start
        async with open_websocket_url(relayd.agent_url) as ws:
            greeting = json.loads(await ws.get_message())
            assert greeting["message"] == "Connection id"
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                codes.append(closed.reason.code if closed.reason else None)
                durations.append(time.monotonic() - started)
            else:
                raise AssertionError("relayd sent something else than a close")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(mute)
            # Meanwhile a real agent connects and works.
            await assert_still_serving(relayd)
    assert codes == [1008] * 200, (Counter(codes), relayd.log[-3000:])
    # Closed by the 500 ms handshake timeout (generous upper bound: 200 at once, on a
    # possibly busy machine), not never.
    assert all(0.5 <= duration < 2 * PROMPT for duration in durations), (
        min(durations),
        max(durations),
    )
    await assert_still_serving(relayd)


# -- malformed bodies ---------------------------------------------------------------------

MALFORMED_CONFIG = '[auth]\nfailure_burst = 1000\n[requests]\nmax_content = "1KiB"\n'


async def test_malformed_bodies_get_exact_json_errors(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config=MALFORMED_CONFIG)
    key = relayd.admin_key
    not_objects: list[bytes] = [
        b"",
        b"   ",
        b"hello",
        b"[1, 2]",
        b"42",
        b'"a string"',
        b"null",
        b"true",
        b"[" * 100_000,
        b"{" * 100_000,
        b'{"content": "\xff\xfe"}',
        b'{"content": "x"',
    ]
    cases: list[tuple[str, str, bytes, dict[str, str], int]] = []
    for body in not_objects:
        cases.append(("POST", "/api/ask", body, {"Authorization": key}, 400))
        cases.append(("POST", "/admin/users/add", body, {}, 400))
        cases.append(("POST", "/admin/users/delete", body, {}, 400))

    def ask_case(document: dict[str, Any], status: int) -> None:
        cases.append(
            ("POST", "/api/ask", json.dumps(document).encode(), {"Authorization": key}, status)
        )

    for bad in (None, 1, 1.5, True, [], ["x"], {}, {"a": "b"}, ""):
        ask_case({"content": bad}, 400)
    ask_case({}, 400)
    ask_case({"contents": "typo"}, 400)
    for field in ("conversation_id", "parent_id"):
        for bad in (1, True, [], {}, ["x"]):
            ask_case({"content": "x", field: bad}, 400)
    cases.append(("POST", "/api/ask", b'{"content": NaN}', {"Authorization": key}, 400))
    cases.append(("POST", "/api/ask", b"\xef\xbb\xbf{}", {"Authorization": key}, 400))
    ask_case({"content": "x", "conversation_id": "no-such-conversation"}, 404)
    ask_case({"content": "x" * 2000}, 413)  # requests.max_content = 1KiB
    ask_case({"content": "é" * 600}, 413)  # 1200 bytes of UTF-8
    ask_case({"content": "x"}, 503)  # valid, but no agent: not a 500
    cases.append(("POST", "/api/ask", b'{"content": "x"}', {}, 401))
    cases.append(("POST", "/api/ask", b'{"content": "x"}', {"Authorization": "wrong"}, 401))
    cases.append(("POST", "/api/ask", b'{"content": "x"}', {"Authorization": "Bearer"}, 401))

    def admin_case(path: str, document: dict[str, Any], status: int) -> None:
        cases.append(("POST", path, json.dumps(document).encode(), {}, status))

    for bad in (1, None, True, [], {}, [key]):
        admin_case("/admin/users/add", {"admin_key": bad}, 400)
        admin_case("/admin/users/delete", {"admin_key": bad, "user_id": "u"}, 400)
    admin_case("/admin/users/add", {}, 401)
    admin_case("/admin/users/add", {"admin_key": "wrong"}, 401)
    for bad_name in (1, True, [], {}, "x" * 201, "two\nlines", "\x00"):
        admin_case("/admin/users/add", {"admin_key": key, "name": bad_name}, 400)
    for bad_id in (None, 1, True, [], {}, ""):
        admin_case("/admin/users/delete", {"admin_key": key, "user_id": bad_id}, 400)
    admin_case("/admin/users/delete", {"admin_key": key}, 400)
    admin_case("/admin/users/delete", {"admin_key": key, "user_id": "no-such-user"}, 404)
    cases += [
        ("GET", "/admin/users", b"", {}, 401),
        ("GET", "/admin/users?admin_key=", b"", {}, 401),
        ("GET", "/admin/users?admin_key=wrong", b"", {}, 401),
        ("GET", "/api/connections", b"", {"Authorization": "Bearer wrong"}, 401),
        ("GET", "/no/such/route", b"", {}, 404),
        ("GET", "/api/ask", b"", {}, 405),
        ("DELETE", "/health", b"", {}, 405),
        ("POST", "/health", b"{}", {}, 405),
    ]

    failures = []
    with trio.fail_after(30):
        async with http_client(relayd) as client:
            for method, path, body, headers, expected in cases:
                response = await client.request(method, path, content=body, headers=headers)
                if response.status_code != expected:
                    failures.append((method, path, body[:60], response.status_code, expected))
                    continue
                json_error(response)
    assert not failures, failures
    assert "Traceback" not in relayd.log
    await assert_still_serving(relayd)


async def test_a_body_over_max_body_is_refused_at_once(relayd_factory: StartRelayd) -> None:
    """50 MB announced with Content-Length: 413 before the body is sent, and relayd does
    not keep it (its memory does not grow by anything near 50 MB)."""
    relayd = relayd_factory()
    await assert_still_serving(relayd)
    before = rss_kib(relayd.process.pid)
    size = 50 * 1024 * 1024
    with trio.fail_after(20):
        for path in ("/admin/users/add", "/api/ask"):
            stream = await trio.open_tcp_stream(HOST, relayd.port)
            started = time.monotonic()
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {relayd.admin_key}\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
                + b"a" * 65536
            )
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                assert data, head
                head += data
            # 413 while 50 MB minus 64 KiB of the body are still unsent: relayd did not wait
            # for the body (nor for a body timeout).
            assert status_of(head) == 413, head
            assert time.monotonic() - started < PROMPT
            # Whatever relayd does with the rest, it does not keep it.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                with trio.move_on_after(5):
                    await stream.send_all(b"a" * (size - 65536))
            await stream.aclose()
    assert rss_kib(relayd.process.pid) - before < 20 * 1024
    # A chunked body (no Content-Length) over max_body gets 413 too.
    with trio.fail_after(10):
        async with http_client(relayd) as client:

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(40):
                    yield b"b" * 65536

            for path in ("/admin/users/add", "/api/ask"):
                # relayd answers 413 and closes while the client is still sending;
                # the client's kernel may then see a reset before it reads the
                # answer (unread data in relayd's socket turns the close into an
                # RST). Either way the body is refused; retry to see the 413.
                for _ in range(5):
                    try:
                        response = await client.post(
                            path,
                            content=chunks(),
                            headers={
                                "Content-Type": "text/plain",
                                "Authorization": relayd.admin_key,
                            },
                        )
                    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
                        continue
                    break
                else:
                    raise AssertionError(f"{path}: never saw the 413 in 5 tries")
                assert response.status_code == 413, response.text
                json_error(response)
    await assert_still_serving(relayd)


async def test_websocket_upgrade_to_a_non_agent_path_is_a_clean_4xx(relayd: Relayd) -> None:
    """A WebSocket handshake on an HTTP route or an unknown path: a JSON 4xx, not a 500
    with a traceback in the log."""
    paths = [
        "/nope",
        "/api/ask",
        "/admin/users",
        "/agent/some-key/other",
        "/agent//client/register",
        "/agent/a/b/client/register",
        "/client/register/extra",
    ]
    with trio.fail_after(15):
        for path in paths:
            _, status, headers, body = await RawAgent.open(relayd, path)
            assert 400 <= status < 500, (path, status, body)
            assert headers.get("content-type", "").startswith("application/json"), (path, headers)
            assert isinstance(json.loads(body)["error"], str), (path, body)
            assert b"some-key" not in body
    assert "Traceback" not in relayd.log, relayd.log
    assert " ERROR " not in relayd.log, relayd.log
    await assert_still_serving(relayd)


# -- garbage from an agent after the handshake ---------------------------------------------


async def test_garbage_frames_from_an_agent_are_dropped(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config='[requests]\ntimeout = "1s"\n')
    agent = await RawAgent.connect(relayd)
    assert agent.agent_id is not None
    garbage_text = [
        "not json",
        "[1, 2, 3]",
        "42",
        '"a string"',
        "null",
        "{" * 50_000,
        json.dumps({"id": 1, "message": "pong", "data": ""}),
        json.dumps({"message": "pong", "data": ""}),
        json.dumps({"id": "x", "data": ""}),
        json.dumps({"id": "x", "message": None}),
        json.dumps({"id": "x", "message": "pong", "data": {"a": 1}}),
        frame("x", "no such kind"),
        frame("x", "ChatGptRequest"),
        frame("x", "ping"),
        frame(agent.agent_id, "Connection id"),
        frame("no-such-request", "ChatGptResponse", "{}"),
        frame("no-such-request", "error", "Unknown error"),
    ]
    with trio.fail_after(30):
        async with http_client(relayd) as client:
            await wait_for_agents(client, relayd, lambda ids: agent.agent_id in ids)

            async def answered_by_raw_agent(
                act: Callable[[dict[str, Any]], Any], expected_status: int = 200
            ) -> httpx.Response:
                """Ask; let ``act`` handle the request frame at the raw agent."""
                nonce = uuid.uuid4().hex
                result: list[httpx.Response] = []

                async def asker() -> None:
                    result.append(await ask(client, relayd, nonce))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(asker)
                    request = await agent.receive_json()
                    assert request_content(request) == nonce
                    await act(request)
                assert result[0].status_code == expected_status, result[0].text
                return result[0]

            async def echo(request: dict[str, Any]) -> None:
                await agent.send_text(reply_frame(request, "raw:" + request_content(request)))

            for text in garbage_text:
                await agent.send_text(text)
            await agent.send_bytes(b"\x00\x01binary")
            await agent.send_bytes(json.dumps({"id": "x", "message": "pong"}).encode())
            response = await answered_by_raw_agent(echo)
            assert response.json()["content"].startswith("raw:")

            # A reply that is JSON but not a valid reply body: 502, the agent stays.
            async def malformed(request: dict[str, Any]) -> None:
                await agent.send_text(frame(request["id"], "ChatGptResponse", "[1]"))

            json_error(await answered_by_raw_agent(malformed, 502))

            # Duplicate replies to an answered id are dropped.
            answered: list[dict[str, Any]] = []

            async def echo_twice(request: dict[str, Any]) -> None:
                await echo(request)
                answered.append(request)

            await answered_by_raw_agent(echo_twice)
            await agent.send_text(reply_frame(answered[0], "again"))
            await agent.send_text(frame(answered[0]["id"], "error", "again"))

            # A late reply, after the client got 504, frees the agent's slot.
            late: list[dict[str, Any]] = []

            async def too_slow(request: dict[str, Any]) -> None:
                late.append(request)

            json_error(await answered_by_raw_agent(too_slow, 504))
            await agent.send_text(reply_frame(late[0], "late"))
            response = await answered_by_raw_agent(echo)
            assert response.json()["content"].startswith("raw:")

            assert not agent.closed and agent.close_code is None
            assert agent.agent_id in await connected_ids(client, relayd)
    await agent.aclose()
    await assert_still_serving(relayd)


async def test_invalid_utf8_text_frame_ends_the_connection(relayd: Relayd) -> None:
    """wsproto fails the connection on a text frame that is not UTF-8 (close reason
    1007); Hypercorn then drops the socket without sending a close frame, so the
    agent sees the connection end, with 1007 or without a code."""
    agent = await RawAgent.connect(relayd)
    async with http_client(relayd) as client:
        await wait_for_agents(client, relayd, lambda ids: agent.agent_id in ids)
        await agent.send_raw(masked_frame(0x1, b'{"id": "\xff\xfe", "message": "pong"}'))
        assert await agent.wait_closed(PROMPT) in (1007, None)
        await wait_for_agents(client, relayd, lambda ids: agent.agent_id not in ids)
    await assert_still_serving(relayd)


async def test_twenty_consecutive_protocol_errors_close_the_agent(relayd: Relayd) -> None:
    agent = await RawAgent.connect(relayd)
    async with http_client(relayd) as client:
        await wait_for_agents(client, relayd, lambda ids: agent.agent_id in ids)
        for _ in range(19):
            await agent.send_text(frame("x", "no such kind"))
        # relayd has read and dropped all 19 (one log line each), and kept the agent.
        await wait_for_log(relayd, "agent protocol error, frame dropped", 19)
        assert "agent protocol error, closing" not in relayd.log
        assert not agent.closed
        assert agent.agent_id in await connected_ids(client, relayd)
        await agent.send_text("[]")
        assert await agent.wait_closed() == 1008
        await wait_for_agents(client, relayd, lambda ids: agent.agent_id not in ids)
    await assert_still_serving(relayd)


async def test_oversized_frame_closes_with_1009(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config='[agents]\nmax_message = "1KiB"\n')
    agent = await RawAgent.connect(relayd)
    await agent.send_text(frame("x", "pong", "a" * 2000))
    assert await agent.wait_closed() == 1009
    await assert_still_serving(relayd)


# -- brute force ---------------------------------------------------------------------------

THROTTLE_CONFIG = '[auth]\nfailure_burst = 5\nfailure_interval = "60s"\n'


async def test_admin_key_brute_force_is_throttled_per_address(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config=THROTTLE_CONFIG)
    good = {"Authorization": f"Bearer {relayd.admin_key}"}
    with trio.fail_after(30):
        async with http_client(relayd) as client:
            # Successes spend nothing and are never slowed (a throttled success would be
            # a 429 with a Retry-After of seconds; relayd never delays an answer).
            for _ in range(30):
                started = time.monotonic()
                response = await client.get("/admin/users", headers=good)
                assert response.status_code == 200
                assert time.monotonic() - started < PROMPT
            statuses = []
            for attempt in range(50):
                response = await client.get(
                    "/admin/users", headers={"Authorization": f"Bearer wrong-{attempt}"}
                )
                statuses.append(response.status_code)
                json_error(response)
                if response.status_code == 429:
                    assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert statuses == [401] * 5 + [429] * 45, statuses
            # The lockout is per address and checked before the credentials: during it,
            # even the right key from that address gets 429 (it learns nothing either way).
            response = await client.get("/admin/users", headers=good)
            assert response.status_code == 429
            assert "Retry-After" in response.headers
            response = await ask(client, relayd, "x")
            assert response.status_code == 429
        # Another address is not affected.
        async with http_client(relayd, OTHER_HOST) as other:
            assert (await other.get("/admin/users", headers=good)).status_code == 200
            response = await other.get("/admin/users", headers={"Authorization": "Bearer no"})
            assert response.status_code == 401
    await assert_still_serving(relayd, local_address=OTHER_HOST)


async def test_agent_key_brute_force_is_throttled(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config=THROTTLE_CONFIG + '[agents]\nkeys = ["good"]\n')
    attempts = [
        (AGENT_PATH + "?key=bad", ()),
        (AGENT_PATH + "?key=bad2", ()),
        ("/agent/bad3" + AGENT_PATH, ()),
        ("/agent/bad4" + AGENT_PATH, ()),
        (AGENT_PATH, ((b"authorization", b"Bearer bad5"),)),
        (AGENT_PATH + "?key=bad6", ()),
        (AGENT_PATH + "?key=good", ()),  # the right key, during the lockout
    ]
    statuses = []
    with trio.fail_after(15):
        for target, headers in attempts:
            _, status, response_headers, body = await RawAgent.open(relayd, target, headers=headers)
            statuses.append(status)
            assert isinstance(json.loads(body)["error"], str)
            if status == 429:
                assert 1 <= int(response_headers["retry-after"]) <= 60
        assert statuses == [403] * 5 + [429] * 2, statuses
        # From another address the right key works, a wrong one gets its own 403.
        agent, status, _, _ = await RawAgent.open(
            relayd, AGENT_PATH + "?key=good", local_address=OTHER_HOST
        )
        assert status == 101
        await agent.aclose()
        _, status, _, _ = await RawAgent.open(
            relayd, AGENT_PATH + "?key=bad", local_address=OTHER_HOST
        )
        assert status == 403
    assert relayd.log.count("agent refused") >= 7
    await assert_still_serving(relayd, local_address=OTHER_HOST)


def test_failure_throttle_is_per_address() -> None:
    throttle = FailureThrottle(burst=3, interval=10.0)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1", 100.0) is None
        throttle.failed("10.0.0.1", 100.0)
    assert throttle.retry_after("10.0.0.1", 100.0) == pytest.approx(10.0)
    # Another address is untouched, and spends its own bucket.
    assert throttle.retry_after("10.0.0.2", 100.0) is None
    throttle.failed("10.0.0.2", 100.0)
    assert throttle.retry_after("10.0.0.2", 100.0) is None
    assert throttle.retry_after("10.0.0.1", 100.0) is not None
    # One token back per interval.
    assert throttle.retry_after("10.0.0.1", 105.0) == pytest.approx(5.0)
    assert throttle.retry_after("10.0.0.1", 110.0) is None
    throttle.failed("10.0.0.1", 110.0)
    assert throttle.retry_after("10.0.0.1", 110.0) == pytest.approx(10.0)
    # Bounded memory.
    small = FailureThrottle(burst=1, interval=60.0, max_entries=100)
    for number in range(1000):
        small.failed(f"10.1.{number // 256}.{number % 256}", 0.0)
    assert len(small) == 100


# -- caps ----------------------------------------------------------------------------------


async def test_max_agents_refuses_the_next_agent_with_1013(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config="[agents]\nmax_agents = 3\n")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery, http_client(relayd) as client:
            for _ in range(3):
                await nursery.start(
                    lambda task_status: run_agent(
                        relayd.agent_url, echo_handler(), task_status=task_status
                    )
                )
            await wait_for_agents(client, relayd, lambda ids: len(ids) == 3)
            extra = await run_agent(relayd.agent_url, echo_handler())
            assert extra.close_code == 1013, extra
            assert len(await connected_ids(client, relayd)) == 3
            nursery.cancel_scope.cancel()
        async with http_client(relayd) as client:
            await wait_for_agents(client, relayd, lambda ids: not ids)
    assert "agents.max_agents=3 reached" in relayd.log
    await assert_still_serving(relayd)


async def test_max_queue_answers_503_queue_full(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config="[requests]\nmax_queue = 2\n")
    gate = trio.Event()
    first_arrived = trio.Event()
    stats = AgentStats()

    async def gated(request: AgentRequest) -> tuple[str, str, str]:
        first_arrived.set()
        await gate.wait()
        return str(uuid.uuid4()), str(uuid.uuid4()), "gated:" + request.content

    responses: dict[str, httpx.Response] = {}
    refused = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, http_client(relayd) as client:
            agent_id = await nursery.start(
                lambda task_status: run_agent(
                    relayd.agent_url, gated, stats=stats, task_status=task_status
                )
            )
            await wait_for_agents(client, relayd, lambda ids: agent_id in ids)

            async def asker(content: str) -> None:
                responses[content] = response = await ask(client, relayd, content)
                if response.status_code == 503:
                    refused.set()

            async with trio.open_nursery() as askers:
                askers.start_soon(asker, "first")
                await first_arrived.wait()
                # No queue length is visible from outside, and the order in which three
                # clients arrive is not theirs to choose: whichever comes third finds the
                # two places taken. Nothing else can be answered while the agent is held.
                for content in ("queued a", "queued b", "queued c"):
                    askers.start_soon(asker, content)
                await refused.wait()
                assert len(responses) == 1, responses
                # Both places are still taken: the next one is refused too.
                response = await ask(client, relayd, "one too many")
                assert response.status_code == 503
                assert "queue is full" in json_error(response)
                assert "Retry-After" in response.headers
                gate.set()
            nursery.cancel_scope.cancel()
    refused_content = next(c for c, r in responses.items() if r.status_code == 503)
    assert "queue is full" in json_error(responses[refused_content])
    assert "Retry-After" in responses[refused_content].headers
    served = sorted(content for content, r in responses.items() if r.status_code == 200)
    assert served == sorted({"first", "queued a", "queued b", "queued c"} - {refused_content})
    assert sorted(stats.contents) == served
    await assert_still_serving(relayd)


async def test_conversations_max_forgets_the_oldest(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config="[conversations]\nmax = 2\n")
    with trio.fail_after(15):
        async with http_client(relayd) as client, echo_agent(relayd):
            answers = []
            for number in range(3):
                response = await ask(client, relayd, f"start {number}")
                assert response.status_code == 200, response.text
                answers.append(response.json())
            oldest = answers[0]
            response = await ask(
                client,
                relayd,
                "continue",
                conversation_id=oldest["conversation_id"],
                parent_id=oldest["response_id"],
            )
            assert response.status_code == 404
            json_error(response)
            for answer in answers[1:]:
                response = await ask(
                    client,
                    relayd,
                    "continue",
                    conversation_id=answer["conversation_id"],
                    parent_id=answer["response_id"],
                )
                assert response.status_code == 200, response.text
                assert response.json()["conversation_id"] == answer["conversation_id"]
    await assert_still_serving(relayd)
