"""The ``/api/ask`` wire path in a real relayd: raw HTTP/1.1 over loopback sockets.

A connection whose first request is a plain ``POST /api/ask`` is served by
relayd's own loop (relayd/front/ask_wire.py) until its first request of another kind,
which goes to Hypercorn with every byte unread. The two paths can be told apart
on the wire: the wire path's status line carries the reason phrase
(``HTTP/1.1 503 Service Unavailable``), Hypercorn's (h11's) has none
(``HTTP/1.1 503 ``). Everything else must be the same.

Agents are agentkit's (``run_agent``), started with tests/test_relay_e2e.py's
helpers. Every wait is bounded by ``trio.fail_after``; every socket is on
127.0.0.1.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from relayd.agentkit import echo_handler
from relayd.protocol import Request
from tests.raw_http import RawClient
from tests.support import Relayd
from tests.test_relay_e2e import client, connections, start_agent, wait_for_agents

HOST = "127.0.0.1"
HEALTH = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_AGENT = {"error": "no agent connected"}


# -- raw HTTP ----------------------------------------------------------------------------


def ask_request(
    relayd: Relayd,
    body: bytes | dict[str, Any],
    *,
    authorization: str | None = None,
    extra: bytes = b"",
) -> bytes:
    """A plain ``POST /api/ask`` (the admin key as a raw token unless ``authorization``)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    token = relayd.admin_key if authorization is None else authorization
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + token.encode() + b"\r\n"
        b"Content-Length: %d\r\n" % len(raw) + extra + b"\r\n" + raw
    )


def get_request(target: str, *extra: bytes) -> bytes:
    lines = b"".join(line + b"\r\n" for line in extra)
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: relay.example\r\n" + lines + b"\r\n"


async def open_connection(relayd: Relayd) -> RawClient:
    return RawClient(await trio.open_tcp_stream(HOST, relayd.port))


# Which loop served a connection is in relayd's debug log (--log-level debug): the
# status lines are the same on both paths.
DEBUG = ["--log-level", "debug"]


def served(relayd: Relayd, connection: RawClient) -> tuple[bool, bool]:
    """``(taken by the wire path, handed back to Hypercorn)`` for ``connection``,
    from the log of a relayd started with :data:`DEBUG`."""
    assert connection.local is not None
    log = relayd.log
    assert "log level debug" in log, "start relayd with --log-level debug to see which loop served"
    remote = f"remote={connection.local}\n"
    return (
        f"connection served on the wire path: {remote}" in log,
        f"connection handed to Hypercorn: {remote}" in log,
    )


def assert_wire_path(relayd: Relayd, connection: RawClient) -> None:
    """Every request so far on ``connection`` was answered by relayd's own loop."""
    assert served(relayd, connection) == (True, False)


def assert_handed_to_hypercorn(relayd: Relayd, connection: RawClient) -> None:
    """``connection`` started on the wire path, then went to Hypercorn."""
    assert served(relayd, connection) == (True, True)


def assert_hypercorn(relayd: Relayd, connection: RawClient) -> None:
    """Hypercorn served ``connection`` from its first request."""
    assert served(relayd, connection) == (False, False)


@pytest.fixture
def relayd(relayd_factory: Callable[..., Relayd]) -> Relayd:
    """A relayd on embedded defaults that logs which loop serves each connection."""
    return relayd_factory(args=DEBUG)


async def wait_for_log(relayd: Relayd, text: str) -> None:
    """Poll the log (bounded by the caller's fail_after) until it contains ``text``."""
    while True:
        if text in relayd.log:
            return
        await trio.sleep(0.02)


async def wait_for_inflight(http: httpx.AsyncClient, relayd: Relayd, inflight: list[int]) -> None:
    """Poll /api/connections (bounded by the caller's fail_after) until the agents'
    ``inflight`` counts are ``inflight``."""
    while True:
        if [entry["inflight"] for entry in await connections(http, relayd)] == inflight:
            return
        await trio.sleep(0.02)


# -- (a) pipelining, then Hypercorn ------------------------------------------------------


async def test_pipelined_asks_health_and_ask_are_answered_in_order(relayd: Relayd) -> None:
    """Five requests in one send: three asks on the wire path, the /health that hands
    the connection to Hypercorn, and an ask that Hypercorn serves."""
    with trio.fail_after(20):
        connection = await open_connection(relayd)
        await connection.send(
            ask_request(relayd, {"content": "one"})
            + ask_request(relayd, {"content": ""})  # a different answer: the order shows
            + ask_request(relayd, {"content": "three"})
            + HEALTH
            + ask_request(relayd, {"content": "five"})
        )
        responses = [await connection.response() for _ in range(5)]
        # Hypercorn keeps the connection alive, and keeps serving it.
        await connection.send(HEALTH)
        again = await connection.response()
        await connection.aclose()
    first, second, third, health, fifth = responses
    for response in (first, third, fifth):
        assert response.status == 503, response
        assert response.json() == NO_AGENT
        assert response.header(b"retry-after") == b"5"
    assert second.status == 400
    assert second.json() == {"error": "content must be a non-empty string"}
    assert (health.status, health.body) == (200, b"OK")
    assert (again.status, again.body) == (200, b"OK")
    for response in (first, second, third):
        assert response.header(b"connection") is None
    assert_handed_to_hypercorn(relayd, connection)  # at the /health
    assert relayd.process.poll() is None


# -- (b) one keep-alive connection, both paths, a real agent -----------------------------


async def test_an_answered_ask_then_other_routes_on_the_same_connection(
    relayd: Relayd,
) -> None:
    prompt = f"wire {uuid.uuid4()}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, echo_handler())
            await wait_for_agents(http, relayd, ids={agent.id})
            connection = await open_connection(relayd)
            await connection.send(ask_request(relayd, {"content": prompt}))
            asked = await connection.response()
            assert_wire_path(relayd, connection)
            await connection.send(get_request("/"))
            index = await connection.response()
            admin = f"Authorization: {relayd.admin_key}".encode()
            await connection.send(get_request("/api/connections", admin))
            listing = await connection.response()
            await connection.send(ask_request(relayd, {"content": prompt + " again"}))
            asked_again = await connection.response()
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert asked.status == 200, asked
    answer = asked.json()
    assert answer["content"] == "echo:" + prompt
    assert answer["error"] == ""
    assert set(answer) == {"id", "response_id", "conversation_id", "content", "error"}
    assert index.status == 200
    assert index.json()["name"] == "relayd"
    assert_handed_to_hypercorn(relayd, connection)
    assert listing.status == 200
    (entry,) = listing.json()["connections"]
    assert entry["Id"] == agent.id
    assert entry["inflight"] == 0
    assert asked_again.status == 200
    assert asked_again.json()["content"] == "echo:" + prompt + " again"
    assert agent.stats.contents == [prompt, prompt + " again"]


# -- (c) Expect: 100-continue ------------------------------------------------------------


async def test_expect_100_continue(relayd: Relayd) -> None:
    prompt = f"continue {uuid.uuid4()}"
    request = ask_request(relayd, {"content": prompt}, extra=b"Expect: 100-continue\r\n")
    head_length = request.index(b"\r\n\r\n") + 4
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, echo_handler())
            await wait_for_agents(http, relayd, ids={agent.id})
            connection = await open_connection(relayd)
            await connection.send(request[:head_length])
            assert await connection.read_exactly(len(CONTINUE)) == CONTINUE
            assert await connection.silent_for(0.2)  # the answer waits for the body
            await connection.send(request[head_length:])
            answered = await connection.response()
            # With the body sent along, no 100 Continue: the answer comes first.
            await connection.send(request)
            answered_again = await connection.response()
            await connection.aclose()
            nursery.cancel_scope.cancel()
    for response in (answered, answered_again):
        assert response.status == 200, response
        assert response.json()["content"] == "echo:" + prompt
    assert_wire_path(relayd, connection)
    assert agent.stats.contents == [prompt, prompt]


# -- (d) a client that leaves while an agent works ---------------------------------------


async def test_a_client_that_leaves_has_its_request_abandoned(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(args=DEBUG)
    received = trio.Event()
    release = trio.Event()

    async def slow(request: Request) -> tuple[str, str, str]:
        if request.content == "slow":
            received.set()
            await release.wait()
        return str(uuid.uuid4()), str(uuid.uuid4()), "echo:" + request.content

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, client(relayd) as http:
            agent = await start_agent(nursery, relayd.agent_url, slow)
            await wait_for_agents(http, relayd, ids={agent.id})
            leaving = await open_connection(relayd)
            await leaving.send(ask_request(relayd, {"content": "slow"}))
            await received.wait()
            await leaving.aclose()
            await wait_for_log(relayd, "client went away, request abandoned: user=admin")
            # The agent still works on it: its slot is held until it answers.
            assert [entry["inflight"] for entry in await connections(http, relayd)] == [1]
            release.set()
            await wait_for_inflight(http, relayd, [0])
            # relayd serves on, on the wire path.
            connection = await open_connection(relayd)
            await connection.send(ask_request(relayd, {"content": "after"}))
            after = await connection.response()
            await connection.aclose()
            nursery.cancel_scope.cancel()
    assert after.status == 200, after
    assert after.json()["content"] == "echo:after"
    assert_wire_path(relayd, connection)
    assert agent.stats.contents == ["slow", "after"]
    assert relayd.process.poll() is None
    log = relayd.log
    assert log.count("client went away, request abandoned") == 1, log
    assert "Traceback" not in log and " ERROR " not in log, log


# -- (e) the same answers on both paths --------------------------------------------------

SAME_CONFIG = '[requests]\nmax_content = "16B"\n'


@dataclass(frozen=True)
class Case:
    body: bytes | dict[str, Any]
    authorization: str | None = None
    extra: bytes = b""


CASES = {
    "no-agent": Case({"content": "hello"}),
    "bearer-admin-key": Case({"content": "hello"}, authorization="Bearer {key}"),
    "connection-close": Case({"content": "hello"}, extra=b"Connection: close\r\n"),
    "invalid-token": Case({"content": "hello"}, authorization="not-a-token"),
    "no-token": Case({"content": "hello"}, authorization=""),
    "not-json": Case(b'{"content": '),
    "not-an-object": Case(b'["content"]'),
    "no-content": Case({}),
    "content-not-a-string": Case({"content": 5}),
    "content-over-max-content": Case({"content": "x" * 17}),
    "bad-conversation-id": Case({"content": "hello", "conversation_id": 5}),
    "empty-body": Case(b""),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_the_wire_path_answers_as_hypercorn_does(
    relayd_factory: Callable[..., Relayd], case: Case
) -> None:
    relayd = relayd_factory(config=SAME_CONFIG, args=DEBUG)
    authorization = case.authorization
    if authorization is not None:
        authorization = authorization.format(key=relayd.admin_key)
    request = ask_request(relayd, case.body, authorization=authorization, extra=case.extra)
    with trio.fail_after(20):
        wire = await open_connection(relayd)
        await wire.send(request)
        on_wire = await wire.response()
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request)  # not the first request: Hypercorn's
        health = await hypercorn.response()
        through_hypercorn = await hypercorn.response()
        await wire.aclose()
        await hypercorn.aclose()
    assert health.status == 200
    assert_wire_path(relayd, wire)
    assert_hypercorn(relayd, hypercorn)
    assert on_wire.status == through_hypercorn.status
    assert on_wire.json() == through_hypercorn.json()
    assert on_wire.names == through_hypercorn.names
    assert {b"content-type", b"content-length", b"date"} <= on_wire.names
    for name in on_wire.names - {b"date"}:
        assert on_wire.header(name).lower() == through_hypercorn.header(name).lower(), name


async def test_a_stalled_body_is_408_on_both_paths(relayd_factory: Callable[..., Relayd]) -> None:
    """Both answer 408 after server.idle_timeout and close the connection. (Hypercorn
    closes it without saying ``connection: close``; the wire path says so.)"""
    relayd = relayd_factory(config='[server]\nidle_timeout = "1s"\n', args=DEBUG)
    request = ask_request(relayd, {"content": "never all there"})[:-5]
    with trio.fail_after(20):
        wire = await open_connection(relayd)
        await wire.send(request)
        on_wire = await wire.response()
        assert await wire.rest() == b""
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request)
        health = await hypercorn.response()
        through_hypercorn = await hypercorn.response()
        assert await hypercorn.rest() == b""
    assert health.status == 200
    assert_wire_path(relayd, wire)
    assert_hypercorn(relayd, hypercorn)
    assert on_wire.status == through_hypercorn.status == 408
    expected = {"error": "the request body stopped arriving for server.idle_timeout (1 s)"}
    assert on_wire.json() == through_hypercorn.json() == expected
    assert on_wire.header(b"connection") == b"close"
    assert on_wire.names - {b"connection"} == through_hypercorn.names - {b"connection"}


async def test_a_throttled_client_gets_the_same_429_on_both_paths(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(
        config='[auth]\nfailure_burst = 1\nfailure_interval = "60s"\n', args=DEBUG
    )
    request = ask_request(relayd, {"content": "hello"}, authorization="not-a-token")
    with trio.fail_after(20):
        first = await open_connection(relayd)
        await first.send(request)
        refused = await first.response()  # spends the only token
        wire = await open_connection(relayd)
        await wire.send(request)
        on_wire = await wire.response()
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request)
        await hypercorn.response()
        through_hypercorn = await hypercorn.response()
        for connection in (first, wire, hypercorn):
            await connection.aclose()
    assert refused.status == 401
    assert_wire_path(relayd, wire)
    assert_hypercorn(relayd, hypercorn)
    assert on_wire.status == through_hypercorn.status == 429
    assert on_wire.json() == through_hypercorn.json()
    assert on_wire.names == through_hypercorn.names
    wire_wait, hypercorn_wait = (
        on_wire.header(b"retry-after"),
        through_hypercorn.header(b"retry-after"),
    )
    assert wire_wait is not None and hypercorn_wait is not None
    assert abs(int(wire_wait) - int(hypercorn_wait)) <= 1
    assert 0 < int(wire_wait) <= 60


# -- defects found while writing these tests, and fixed ---------------------------------


async def test_bad_credentials_with_a_stalled_body_are_401_on_both_paths(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config='[server]\nidle_timeout = "1s"\n', args=DEBUG)
    request = ask_request(relayd, {"content": "never all there"}, authorization="bad")[:-5]
    with trio.fail_after(20):
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request)
        await hypercorn.response()
        through_hypercorn = await hypercorn.response()
        wire = await open_connection(relayd)
        await wire.send(request)
        on_wire = await wire.response()
    assert through_hypercorn.status == 401
    assert through_hypercorn.json() == {"error": "invalid token"}
    assert on_wire.status == 401, on_wire
    assert on_wire.json() == {"error": "invalid token"}


async def test_a_content_length_of_thousands_of_digits_is_400_on_both_paths(
    relayd: Relayd,
) -> None:
    request = (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Content-Length: " + b"0" * 5000 + b"2\r\n\r\n{}"
    )
    with trio.fail_after(20):
        hypercorn = await open_connection(relayd)
        await hypercorn.send(HEALTH + request)
        await hypercorn.response()
        through_hypercorn = await hypercorn.response()
        assert through_hypercorn.status == 400
        wire = await open_connection(relayd)
        await wire.send(request)
        on_wire = await wire.response()
    assert on_wire.status == 400
