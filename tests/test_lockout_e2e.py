"""A lockout must not lock out the innocent: the throttle end to end, in a real relayd.

The rule (relayd/throttle.py, relayd/web.py ``Gate``):

- a request whose user token is valid is served even from a locked address or
  prefix, and spends nothing;
- the admin key and agent keys stay behind the lockout: a locked address gets
  429 (with Retry-After) for them, right or wrong;
- unknown or missing credentials get 401 until the address's burst
  (``auth.failure_burst``) is spent, then 429 with Retry-After;
- failures count per network prefix too (``auth.ipv4_prefix``,
  ``auth.prefix_failure_burst``): failures spread over the addresses of one /24
  lock the whole /24, for everything but valid user tokens;
- admin routes count each candidate key they compare (the Authorization
  header, ``admin_key`` in a JSON body, ``admin_key`` in the query).

Each test starts a real relayd subprocess (tests/support.py) with a long
``failure_interval`` so that a lockout holds for the whole test, and a real
echo agent (agentkit's, over trio-websocket). Clients are raw HTTP/1.1
(tests/raw_http.py), so each ``/api/ask`` is known to go the way it is meant
to: relayd's own wire path (the connection's first request is a plain ``POST
/api/ask``), or Hypercorn's (a chunked body, or a ``GET /health`` first); the
status line tells them apart (tests/test_ask_wire_e2e.py). Other client
addresses are other loopback addresses (127.0.0.N binds on Linux; 127.0.1.N
is another /24). Every wait is bounded by ``trio.fail_after``; nothing sleeps
to synchronise.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url, wrap_client_stream

from relayd.agentkit import echo_handler
from tests.raw_http import RawClient, Response
from tests.support import Relayd
from tests.test_ask_wire_e2e import DEBUG, served
from tests.test_relay_e2e import Agent, start_agent, wait_for_agents

StartRelayd = Callable[..., Relayd]

HOST = "127.0.0.1"
OTHER_NETWORK = "127.0.1.1"  # loopback too, but another /24
BURST = 5
LOCK_CONFIG = f'[auth]\nfailure_burst = {BURST}\nfailure_interval = "60s"\n'
AGENT_KEY = "agent-key-for-lockout-tests-0123"
AGENT_KEY_CONFIG = f'[agents]\nkeys = ["{AGENT_KEY}"]\nallow_loopback_without_key = false\n'
HEALTH = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n\r\n"
LOCKED = {"error": "too many failed attempts; try again later"}
AGENT_LOCKED = {"error": "too many failed attempts"}
UNAUTHORIZED = (
    {"error": "missing Authorization header (a user token)"},
    {"error": "invalid token"},
)
INVALID_ADMIN_KEY = {"error": "invalid admin key"}
# The ways an /api/ask reaches relayd: its own wire path, or Hypercorn's.
WAYS = ["wire", "chunked", "after-health"]


def local(host: int) -> str:
    """Another client address in 127.0.0.0/24, the /24 of 127.0.0.1."""
    return f"127.0.0.{host}"


# -- raw HTTP ------------------------------------------------------------------------------


def request_bytes(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    *,
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.example"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None and chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + framed
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b"")


def authorization(value: str | None) -> list[tuple[str, str]]:
    return [] if value is None else [("Authorization", value)]


def ask_bytes(token: str | None, content: str, *, chunked: bool = False) -> bytes:
    """A ``POST /api/ask`` with ``Authorization: token`` (no header if None)."""
    body = json.dumps({"content": content}).encode()
    return request_bytes("POST", "/api/ask", authorization(token), body, chunked=chunked)


def is_wire_path(relayd: Relayd, connection: RawClient) -> bool:
    """Whether relayd's own loop has served every request on ``connection`` so far
    (from the debug log: the responses look the same on both paths)."""
    return served(relayd, connection) == (True, False)


class AskClient:
    """One keep-alive connection from ``address`` whose asks all go ``way``."""

    def __init__(self, relayd: Relayd, connection: RawClient, way: str) -> None:
        self.relayd = relayd
        self.connection = connection
        self.way = way

    @classmethod
    async def open(cls, relayd: Relayd, way: str, address: str = HOST) -> AskClient:
        stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=address)
        connection = RawClient(stream)
        if way == "after-health":  # not the first request: the connection is Hypercorn's
            await connection.send(HEALTH)
            health = await connection.response()
            assert (health.status, health.body) == (200, b"OK"), health
        return cls(relayd, connection, way)

    async def ask(self, token: str | None, content: str) -> Response:
        await self.connection.send(ask_bytes(token, content, chunked=self.way == "chunked"))
        response = await self.connection.response()
        assert is_wire_path(self.relayd, self.connection) == (self.way == "wire"), self.way
        return response

    async def aclose(self) -> None:
        await self.connection.aclose()


async def ask_once(
    relayd: Relayd, way: str, token: str | None, content: str, address: str = HOST
) -> Response:
    client = await AskClient.open(relayd, way, address)
    try:
        return await client.ask(token, content)
    finally:
        await client.aclose()


async def call(
    relayd: Relayd,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: Any = None,
    address: str = HOST,
) -> Response:
    """One request (a JSON ``body`` if given) on a connection of its own from ``address``."""
    raw = None if body is None else json.dumps(body).encode()
    stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=address)
    connection = RawClient(stream)
    try:
        await connection.send(request_bytes(method, target, headers, raw))
        return await connection.response()
    finally:
        await connection.aclose()


def assert_answered(response: Response, content: str) -> None:
    assert response.status == 200, (response.status_line, response.body)
    assert response.json()["content"] == "echo:" + content, response.body


def assert_unauthorized(
    response: Response, bodies: Sequence[dict[str, str]] = UNAUTHORIZED
) -> None:
    assert response.status == 401, (response.status_line, response.body)
    assert response.json() in bodies, response.body
    assert response.header(b"retry-after") is None


def assert_locked(response: Response, body: dict[str, str] = LOCKED) -> None:
    """429, the locked address's JSON error and a Retry-After within the interval."""
    assert response.status == 429, (response.status_line, response.body)
    assert json.loads(response.body) == body, response.body
    wait = response.header(b"retry-after")
    assert wait is not None, response.headers
    assert 1 <= int(wait) <= 60, wait


def failures_logged(relayd: Relayd) -> int:
    return relayd.log.count("authentication failed:")


# -- setting up (before any lockout: the admin key works then) -----------------------------


async def add_user(relayd: Relayd) -> tuple[str, str]:
    """A new user's id and token (the admin key from 127.0.0.1)."""
    response = await call(
        relayd, "POST", "/admin/users/add", [("Authorization", relayd.admin_key)], {}
    )
    assert response.status == 200, response.body
    document = response.json()
    return document["user_id"], document["token"]


async def start_echo(
    nursery: trio.Nursery, relayd: Relayd, *, key: str | None = None, address: str = HOST
) -> Agent:
    """An echo agent (from 127.0.0.1), once relayd lists it (asked from ``address``)."""
    url = relayd.agent_url if key is None else f"{relayd.agent_url}?key={key}"
    agent = await start_agent(nursery, url, echo_handler())
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=relayd.url, timeout=10, transport=transport) as http:
        await wait_for_agents(http, relayd, ids={agent.id})
    return agent


async def lock(relayd: Relayd, address: str = HOST) -> None:
    """Spend ``address``'s whole burst with missing credentials: 401s, then a 429."""
    client = await AskClient.open(relayd, "wire", address)
    for attempt in range(BURST):
        assert_unauthorized(await client.ask(None, f"no token {attempt}"))
    assert_locked(await client.ask(None, "locked now"))
    await client.aclose()


# -- 1. valid user tokens are served through a flood of failures from their address ----


FLOOD_CONNECTIONS = 3
FLOOD_PER_CONNECTION = 100
VALID_ASKS = 30
VALID_BEFORE_LOCK = 5


def bad_token(index: int) -> str | None:
    """No credentials, a wrong raw token, a wrong Bearer token, in turn."""
    return [None, f"wrong-{index}", f"Bearer wrong-{index}"][index % 3]


@pytest.mark.parametrize("way", WAYS)
async def test_valid_user_tokens_are_served_through_a_flood_from_the_same_address(
    relayd_factory: StartRelayd, way: str
) -> None:
    relayd = relayd_factory(config=LOCK_CONFIG, args=DEBUG)
    locked = trio.Event()  # the flood has seen its first 429
    resumed = trio.Event()  # the valid client asks again, from the locked address
    flood_done = trio.Event()
    statuses: list[list[int]] = [[] for _ in range(FLOOD_CONNECTIONS)]
    valid: list[tuple[Response, str, bool]] = []  # (response, content, during the flood)
    with trio.fail_after(60):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as agents:
            await start_echo(agents, relayd)

            async def flood(index: int) -> None:
                client = await AskClient.open(relayd, way)
                for number in range(FLOOD_PER_CONNECTION):
                    if number == FLOOD_PER_CONNECTION // 2:
                        await resumed.wait()  # the rest races the valid client's asks
                    response = await client.ask(bad_token(number), f"bad {index}.{number}")
                    statuses[index].append(response.status)
                    if response.status == 429:
                        assert_locked(response)
                        locked.set()
                    else:
                        assert_unauthorized(response)
                await client.aclose()

            async def asker() -> None:
                client = await AskClient.open(relayd, way)
                for number in range(VALID_ASKS):
                    if number == VALID_BEFORE_LOCK:
                        await locked.wait()
                        resumed.set()
                    content = f"valid {number}"
                    user_token = token if number % 2 else f"Bearer {token}"
                    response = await client.ask(user_token, content)
                    valid.append((response, content, not flood_done.is_set()))
                await client.aclose()

            async with trio.open_nursery() as clients:
                clients.start_soon(asker)
                async with trio.open_nursery() as flooding:
                    for index in range(FLOOD_CONNECTIONS):
                        flooding.start_soon(flood, index)
                flood_done.set()
            agents.cancel_scope.cancel()
    assert len(valid) == VALID_ASKS
    for response, content, _ in valid:
        assert_answered(response, content)
    during = sum(1 for _, _, flooding in valid[VALID_BEFORE_LOCK:] if flooding)
    print(f"{way}: {during} valid asks from the locked address answered during the flood")
    # Each connection saw 401s, then only 429s; the address failed exactly BURST times.
    for seen in statuses:
        assert len(seen) == FLOOD_PER_CONNECTION
        unauthorized = seen.count(401)
        assert seen == [401] * unauthorized + [429] * (len(seen) - unauthorized), seen
    assert sum(seen.count(401) for seen in statuses) == BURST, statuses
    # Valid requests spent nothing, and a 429 is not a failure counted.
    assert failures_logged(relayd) == BURST, relayd.log[-3000:]
    assert relayd.process.poll() is None


@pytest.mark.parametrize("way", WAYS)
async def test_a_valid_user_token_spends_nothing(relayd_factory: StartRelayd, way: str) -> None:
    """BURST - 1 failures, then many valid asks: the address can still fail once."""
    relayd = relayd_factory(config=LOCK_CONFIG, args=DEBUG)
    with trio.fail_after(30):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd)
            client = await AskClient.open(relayd, way)
            for number in range(BURST - 1):
                assert_unauthorized(await client.ask(bad_token(number), "bad"))
            for number in range(20):
                assert_answered(await client.ask(token, f"a {number}"), f"a {number}")
            assert_unauthorized(await client.ask("wrong", "the last failure allowed"))
            assert_locked(await client.ask("wrong", "locked"))
            for number in range(10):
                assert_answered(await client.ask(token, f"b {number}"), f"b {number}")
            assert_locked(await client.ask(None, "still locked"))
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert failures_logged(relayd) == BURST


@pytest.mark.parametrize("way", ["wire", "after-health"])
async def test_a_body_that_follows_its_head_from_a_locked_address(
    relayd_factory: StartRelayd, way: str
) -> None:
    """The credentials are checked on the head: a valid user token's request waits for
    its body and is answered, a locked address's bad request is refused with 429 and
    the connection lives on. Both paths read (and drop) the refused body first, for
    up to 2 s, so that the connection can carry the next request
    (relayd.front.ask_wire.AskConnection._refuse, relayd.ask.AskEndpoint._discard_body)."""
    relayd = relayd_factory(config=LOCK_CONFIG, args=DEBUG)
    with trio.fail_after(30):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd)
            await lock(relayd)
            client = await AskClient.open(relayd, way)
            connection = client.connection
            for number in range(3):
                refused = ask_bytes(bad_token(number), "refused")
                split = refused.index(b"\r\n\r\n") + 4
                await connection.send(refused[:split])
                await connection.send(refused[split:])  # read and dropped
                response = await connection.response()
                assert response.header(b"connection") is None
                assert is_wire_path(relayd, connection) == (way == "wire")
                assert_locked(response)
                content = f"late body {number}"
                valid = ask_bytes(token, content)
                split = valid.index(b"\r\n\r\n") + 4
                await connection.send(valid[:split])
                await connection.send(valid[split:])
                response = await connection.response()
                assert is_wire_path(relayd, connection) == (way == "wire")
                assert_answered(response, content)
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert failures_logged(relayd) == BURST


# -- 2. the admin key stays behind the lockout ---------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_a_locked_address_gets_429_for_the_admin_key_but_200_for_a_user_token(
    relayd_factory: StartRelayd, way: str
) -> None:
    relayd = relayd_factory(config=LOCK_CONFIG, args=DEBUG)
    key = relayd.admin_key
    with trio.fail_after(30):
        _, token = await add_user(relayd)
        deleted_id, deleted = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd)
            deleting = await call(
                relayd,
                "POST",
                "/admin/users/delete",
                [("Authorization", key)],
                {"user_id": deleted_id},
            )
            assert deleting.status == 200, deleting.body
            await lock(relayd)
            admin_calls: list[tuple[str, str, list[tuple[str, str]], Any]] = [
                ("GET", "/api/connections", [("Authorization", key)], None),
                ("GET", "/api/connections", [("Authorization", f"Bearer {key}")], None),
                ("GET", f"/api/connections?admin_key={quote(key)}", [], None),
                ("GET", "/api/connections", [("Authorization", "wrong-admin-key")], None),
                ("GET", "/api/connections?admin_key=wrong", [], None),
                ("GET", "/api/connections", [], None),
                ("GET", "/admin/users", [("Authorization", key)], None),
                ("POST", "/admin/users/add", [], {"admin_key": key}),
                ("POST", "/admin/users/add", [("Authorization", "wrong")], {"admin_key": key}),
                ("POST", "/admin/users/delete", [("Authorization", key)], {"user_id": "x"}),
                # A user token is not the admin key: an admin route is behind the lockout.
                ("GET", "/api/connections", [("Authorization", token)], None),
            ]
            for method, target, headers, body in admin_calls:
                response = await call(relayd, method, target, headers, body)
                try:
                    assert_locked(response)
                except AssertionError as error:
                    raise AssertionError(f"{method} {target} {headers} {body}: {error}") from None
            client = await AskClient.open(relayd, way)
            for refused in (key, f"Bearer {key}", "wrong", None, deleted, f"Bearer {deleted}"):
                assert_locked(await client.ask(refused, "refused"))
            for number in range(5):
                assert_answered(await client.ask(token, f"ok {number}"), f"ok {number}")
            await client.aclose()
            # What needs no credentials is served.
            health = await call(relayd, "GET", "/health")
            assert (health.status, health.body) == (200, b"OK")
            # The lockout is the address's: its neighbour (same /24, room left) is served.
            listing = await call(
                relayd, "GET", "/api/connections", [("Authorization", key)], address=local(2)
            )
            assert listing.status == 200, listing.body
            assert len(listing.json()["connections"]) == 1
            nursery.cancel_scope.cancel()
    # Only the BURST failures that locked the address were counted (and logged).
    assert failures_logged(relayd) == BURST, relayd.log[-3000:]
    assert relayd.process.poll() is None


# -- 3. agent keys stay behind the lockout ---------------------------------------------------


async def websocket_refusal(url: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> Response:
    """The HTTP refusal of a trio-websocket client's upgrade, as a Response."""
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=list(headers)):
            pass
    rejected = info.value
    return Response(
        b"HTTP/1.1 %d -" % rejected.status_code,
        [(name, value.strip()) for name, value in rejected.headers],
        rejected.body or b"",
    )


def upgrade_bytes(target: str) -> bytes:
    return request_bytes(
        "GET",
        target,
        [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )


async def upgrade_after_health(relayd: Relayd, target: str, address: str = HOST) -> Response:
    """An agent upgrade as a connection's second request: Hypercorn's ASGI path."""
    stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=address)
    connection = RawClient(stream)
    try:
        await connection.send(HEALTH)
        assert (await connection.response()).status == 200
        await connection.send(upgrade_bytes(target))
        return await connection.response()
    finally:
        await connection.aclose()


async def test_an_agent_key_from_a_locked_address_gets_429(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config=LOCK_CONFIG + AGENT_KEY_CONFIG, args=DEBUG)
    base = f"ws://{HOST}:{relayd.port}"
    good = f"{relayd.agent_url}?key={AGENT_KEY}"
    with trio.fail_after(30):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd, key=AGENT_KEY)
            # Before the lockout: a wrong key is 403, no key 401 (each spends one).
            assert (await websocket_refusal(f"{relayd.agent_url}?key=wrong")).status == 403
            assert (await websocket_refusal(relayd.agent_url)).status == 401
            assert_unauthorized(await ask_once(relayd, "wire", None, "no token"))
            assert_unauthorized(await ask_once(relayd, "wire", "wrong", "wrong token"))
            assert_unauthorized(await ask_once(relayd, "wire", None, "no token"))
            # Locked now (BURST failures): the right agent key is refused, every way it
            # can be presented, on the wire path (trio-websocket) and the ASGI path.
            refusals = [
                await websocket_refusal(good),
                await websocket_refusal(
                    relayd.agent_url, [(b"Authorization", f"Bearer {AGENT_KEY}".encode())]
                ),
                await websocket_refusal(f"{base}/agent/{AGENT_KEY}/client/register"),
                await websocket_refusal(f"{relayd.agent_url}?key=wrong"),
                await websocket_refusal(relayd.agent_url),
            ]
            for response in refusals:
                assert_locked(response, AGENT_LOCKED)
            through_asgi = await upgrade_after_health(relayd, f"/client/register?key={AGENT_KEY}")
            assert_locked(through_asgi, AGENT_LOCKED)
            # The agent connected before still serves the valid user token.
            assert_answered(await ask_once(relayd, "wire", token, "served"), "served")
            # From another address (same /24, room left) the key works.
            stream = await trio.open_tcp_stream(HOST, relayd.port, local_address=local(2))
            target = f"/client/register?key={AGENT_KEY}"
            websocket = await wrap_client_stream(nursery, stream, HOST, target)
            greeting = json.loads(await websocket.get_message())
            assert greeting["message"] == "Connection id", greeting
            await websocket.aclose()
            nursery.cancel_scope.cancel()
    assert failures_logged(relayd) == 3
    log = relayd.log
    assert log.count("agent refused: too many failed attempts") == len(refusals) + 1, log[-3000:]
    assert AGENT_KEY not in log
    assert relayd.process.poll() is None


# -- 4. failures spread over a /24 lock the /24 ----------------------------------------------

PREFIX_BURST = 8
PREFIX_CONFIG = (
    f"[auth]\nfailure_burst = {BURST}\nprefix_failure_burst = {PREFIX_BURST}\n"
    'failure_interval = "60s"\n' + AGENT_KEY_CONFIG
)


@pytest.mark.parametrize("way", ["wire", "after-health"])
async def test_failures_spread_over_a_24_lock_the_24_but_not_valid_user_tokens(
    relayd_factory: StartRelayd, way: str
) -> None:
    relayd = relayd_factory(config=PREFIX_CONFIG, args=DEBUG)
    key = relayd.admin_key
    fresh = local(50)  # never fails itself
    with trio.fail_after(30):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd, key=AGENT_KEY)
            # Two failures from each of four addresses: none near its own burst.
            hosts = [local(host) for host in range(2, 2 + PREFIX_BURST // 2)]
            for address in hosts:
                client = await AskClient.open(relayd, way, address)
                assert_unauthorized(await client.ask(None, "no token"))
                assert_unauthorized(await client.ask("wrong", "wrong token"))
                await client.aclose()
            # The /24 is locked: for an address that never failed too.
            client = await AskClient.open(relayd, way, fresh)
            for refused in (None, "wrong", key, f"Bearer {key}"):
                assert_locked(await client.ask(refused, "refused"))
            for number in range(5):
                assert_answered(await client.ask(token, f"fresh {number}"), f"fresh {number}")
            await client.aclose()
            for address in (fresh, HOST, hosts[0]):
                listing = await call(
                    relayd, "GET", "/api/connections", [("Authorization", key)], address=address
                )
                assert_locked(listing)
                assert_answered(await ask_once(relayd, way, token, address), address)
            refused = await websocket_refusal(f"{relayd.agent_url}?key={AGENT_KEY}")
            assert_locked(refused, AGENT_LOCKED)  # from 127.0.0.1, in the locked /24
            # Another /24 is not locked.
            listing = await call(
                relayd, "GET", "/api/connections", [("Authorization", key)], address=OTHER_NETWORK
            )
            assert listing.status == 200, listing.body
            assert len(listing.json()["connections"]) == 1
            assert_unauthorized(await ask_once(relayd, way, None, "elsewhere", OTHER_NETWORK))
            nursery.cancel_scope.cancel()
    assert failures_logged(relayd) == PREFIX_BURST + 1, relayd.log[-3000:]
    assert relayd.process.poll() is None


# -- 5. admin routes count each candidate key ---------------------------------------------

CANDIDATES_CONFIG = (
    f'[auth]\nfailure_burst = {BURST}\nprefix_failure_burst = 1000\nfailure_interval = "60s"\n'
)


async def remaining_failures(relayd: Relayd, address: str, burst: int = BURST) -> int:
    """Spend what ``address`` may still fail (missing tokens) and count it: the number of
    401s before the first 429 (bounded by ``burst`` + 1 asks)."""
    client = await AskClient.open(relayd, "wire", address)
    try:
        for count in range(burst + 1):
            response = await client.ask(None, "count")
            if response.status == 429:
                assert_locked(response)
                return count
            assert_unauthorized(response)
    finally:
        await client.aclose()
    raise AssertionError(f"{address} was not locked after {burst + 1} failures")


async def test_admin_routes_count_each_candidate_key(relayd_factory: StartRelayd) -> None:
    relayd = relayd_factory(config=CANDIDATES_CONFIG, args=DEBUG)
    key = relayd.admin_key
    wrong_header = [("Authorization", "wrong-header")]
    add_three = ("POST", "/admin/users/add?admin_key=wrong-query", wrong_header)
    with trio.fail_after(30):
        # Wrong candidates in the header and the query are two failures (the body is
        # not looked at once the header holds a credential): with a burst of 5, the
        # third such request finds the address locked.
        address = local(2)
        statuses = []
        for _ in range(3):
            response = await call(relayd, *add_three, {"admin_key": "wrong-body"}, address)
            statuses.append(response.status)
            if response.status == 429:
                assert_locked(response)
            else:
                assert_unauthorized(response, [INVALID_ADMIN_KEY])
        assert statuses[0] == 401 and statuses[1] in (401, 429) and statuses[2] == 429, statuses
        assert await remaining_failures(relayd, address) == 0
        # ...exactly two: three failures left after one such request.
        address = local(3)
        response = await call(relayd, *add_three, {"admin_key": "wrong-body"}, address)
        assert_unauthorized(response, [INVALID_ADMIN_KEY])
        assert await remaining_failures(relayd, address) == BURST - 2
        # The same on /admin/users/delete.
        address = local(4)
        response = await call(
            relayd,
            "POST",
            "/admin/users/delete?admin_key=wrong-query",
            wrong_header,
            {"admin_key": "wrong-body", "user_id": "nobody"},
            address,
        )
        assert_unauthorized(response, [INVALID_ADMIN_KEY])
        assert await remaining_failures(relayd, address) == BURST - 2
        # GET /api/connections: header and query, two candidates, two failures.
        address = local(5)
        target = "/api/connections?admin_key=wrong-query"
        response = await call(relayd, "GET", target, wrong_header, address=address)
        assert_unauthorized(response, [INVALID_ADMIN_KEY])
        assert await remaining_failures(relayd, address) == BURST - 2
        # A wrong candidate before the right one still counts; the right one passes.
        address = local(6)
        target = f"/api/connections?admin_key={quote(key)}"
        response = await call(relayd, "GET", target, wrong_header, address=address)
        assert response.status == 200, response.body
        assert await remaining_failures(relayd, address) == BURST - 1
        # The right key first: nothing after it is compared, nothing spent.
        address = local(7)
        target = "/api/connections?admin_key=wrong-query"
        response = await call(relayd, "GET", target, [("Authorization", key)], address=address)
        assert response.status == 200, response.body
        assert await remaining_failures(relayd, address) == BURST
        # A wrong header is refused before the body is read: the right key in the
        # body is never compared, and the header's failure spends the last attempt.
        address = local(8)
        client = await AskClient.open(relayd, "wire", address)
        for _ in range(BURST - 1):
            assert_unauthorized(await client.ask(None, "spend"))
        await client.aclose()
        response = await call(
            relayd, "POST", "/admin/users/add", wrong_header, {"admin_key": key}, address
        )
        assert_unauthorized(response, [INVALID_ADMIN_KEY])
        assert await remaining_failures(relayd, address) == 0
    assert relayd.process.poll() is None


# -- 6. a reload keeps the lockouts and applies the new limits -----------------------------


async def test_a_reload_keeps_a_lockout_and_applies_the_new_limits(
    relayd_factory: StartRelayd, tmp_path: Path
) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(LOCK_CONFIG)
    relayd = relayd_factory(config=None, args=["--config", str(config), *DEBUG])
    key = relayd.admin_key
    with trio.fail_after(40):
        _, token = await add_user(relayd)
        async with trio.open_nursery() as nursery:
            await start_echo(nursery, relayd)
            await lock(relayd)
            config.write_text(
                '[auth]\nfailure_burst = 6\nprefix_failure_burst = 8\nfailure_interval = "60s"\n'
            )
            relayd.signal(signal.SIGHUP)
            ready = await trio.to_thread.run_sync(relayd.wait_notification, "READY=1")
            assert "reload failed" not in ready, ready
            # Still locked, for all but the valid user token.
            assert_locked(await ask_once(relayd, "wire", None, "still locked"))
            assert_locked(await call(relayd, "GET", "/api/connections", [("Authorization", key)]))
            assert_answered(await ask_once(relayd, "wire", token, "served"), "served")
            # The new limits: 6 failures per address; the /24's bucket, which had spent 5
            # of 40, now holds at most 8.
            assert await remaining_failures(relayd, local(2), burst=6) == 6
            assert await remaining_failures(relayd, local(3), burst=6) == 2
            assert_locked(await ask_once(relayd, "wire", None, "the /24", local(4)))
            listing = await call(
                relayd, "GET", "/api/connections", [("Authorization", key)], address=OTHER_NETWORK
            )
            assert listing.status == 200, listing.body
            nursery.cancel_scope.cancel()
    assert failures_logged(relayd) == BURST + 8
    assert relayd.process.poll() is None
