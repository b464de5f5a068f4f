"""Every phase of a client connection has a total deadline: a real relayd, raw sockets.

A slowloris client sends a byte every :data:`GAP` seconds, well inside the silence
limit (``server.idle_timeout``), so only a deadline on the whole phase can end it:

- a request head (new connection, or idle between keep-alive requests) must be
  complete within ``server.idle_timeout`` of when the connection became idle, on
  every path: relayd's ``/api/ask`` wire path, its agent upgrade path and
  Hypercorn's, and across a hand-back from the wire path to Hypercorn;
- a body must arrive whole within ``server.body_timeout`` of its head (408, the
  connection closed): on the wire path, on Hypercorn's ``/api/ask`` and on Quart's
  routes;
- a body after a refusal (401, 429) is read and dropped for at most
  :data:`relayd.ask.DISCARD_WAIT`, then the connection is closed.

The timeouts are chosen so that the old behaviour fails the bounds: a head handed
between loops used to get twice ``idle_timeout`` (2 x :data:`IDLE` is past
:data:`IDLE` + :data:`TOLERANCE`), and a trickled body or refused body used to hold
the socket for as long as the client kept trickling.

Each test checks two moments. The client sees the connection end (``recv`` returns
b"" or the connection is reset) within the phase's deadline plus
:data:`TOLERANCE`. And relayd lets go of the socket: the client keeps trickling
after that, and a send is refused (the peer's socket is gone) within the deadline,
plus relayd's bounded lingering close on Hypercorn's path (:data:`LINGER`), plus
two gaps of the trickle (the byte that draws the reset, then the send that sees it).

These are real-time tests (relayd is a subprocess): each phase is timed with
``time.monotonic()`` from a moment no later than the server's own start of that
phase (before the connect, or before the bytes that start it are sent), so the
lower bound is exact and the upper bound allows :data:`TOLERANCE` for scheduling.
relayd runs at debug level, where its log says which loop served a connection.
Every wait is bounded by ``trio.fail_after``; every socket is on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from relayd.ask import DISCARD_WAIT
from relayd.front import server as front_server
from tests.raw_http import Response
from tests.support import Relayd
from tests.test_hostile import RawAgent

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
IDLE = 2.0  # server.idle_timeout: the silence limit, and the head's deadline
BODY = 4.0  # server.body_timeout: the body's deadline
GAP = 0.3  # between two bytes of a trickling client: far inside IDLE
TOLERANCE = 1.0  # how late relayd may close a connection past its deadline
CROWD = 50  # trickling connections at once in the last test
CROWD_TOLERANCE = 1.5  # TOLERANCE with CROWD trickling connections at once
# After Hypercorn answers before a request's body is whole, relayd shuts its side of
# the connection and reads and drops what still comes for this long (bounded), then
# closes the socket (a lingering close); 0 in a relayd that closes at once.
LINGER: float = getattr(front_server, "LINGER_TIME", 0.0)
assert GAP < IDLE / 4 and DISCARD_WAIT < BODY

SERVER = f'[server]\nlog_level = "debug"\nidle_timeout = "{IDLE:g}s"\nbody_timeout = "{BODY:g}s"\n'
# Enough failed authentications from 127.0.0.1 that every refusal is a 401.
CONFIG = SERVER + "[auth]\nfailure_burst = 1000\nprefix_failure_burst = 1000\n"
# One failure locks 127.0.0.1 out: the next refusal is a 429.
THROTTLING_CONFIG = SERVER + '[auth]\nfailure_burst = 1\nfailure_interval = "60s"\n'

LATE = {"error": f"the request body did not arrive within server.body_timeout ({BODY:g} s)"}
INVALID_TOKEN = {"error": "invalid token"}
NO_AGENT = {"error": "no agent connected"}
HEALTH = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n\r\n"
# Trickled header lines: never finished (no blank line) before any deadline here.
SLOW_HEADER = b"X-Slow: " + b"a" * 200
# A trickled body (for a Content-Length of len(BODY_BYTES), within server.max_body),
# far longer than any deadline here at one byte per GAP.
BODY_BYTES = b"x" * 1000
ASK = json.dumps({"content": "hello"}).encode()


# -- raw HTTP ----------------------------------------------------------------------------


def ask_head(authorization: str, *, length: int | None = len(BODY_BYTES)) -> bytes:
    """The head of a ``POST /api/ask``: with a Content-Length, or chunked if ``length``
    is None (which the wire path leaves to Hypercorn)."""
    if length is None:
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        framing = b"Content-Length: %d\r\n" % length
    return (
        b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: " + authorization.encode() + b"\r\n" + framing + b"\r\n"
    )


def chunk_header(size: int = len(BODY_BYTES)) -> bytes:
    """The start of one chunk of ``size`` bytes: trickling its data then feeds
    Hypercorn a byte at a time (h11 passes on part of a chunk as it comes)."""
    return b"%x\r\n" % size


def parse_responses(raw: bytes, *, partial: bool = False) -> list[Response]:
    """The whole responses in ``raw`` (framed by Content-Length, as relayd sends
    them); fails on bytes that are not one, unless ``partial`` (then they are left)."""
    responses = []
    while raw:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        if not separator and partial:
            break
        assert separator, f"an incomplete response head: {head!r}"
        status_line, *lines = head.split(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 "), head
        headers = []
        for line in lines:
            name, colon, value = line.partition(b":")
            assert colon and name, line
            headers.append((name, value.strip()))
        response = Response(status_line, headers, b"")
        length = response.header(b"content-length")
        assert length is not None, head
        if len(rest) < int(length) and partial:
            break
        assert len(rest) >= int(length), (head, rest)
        response.body, raw = rest[: int(length)], rest[int(length) :]
        responses.append(response)
    return responses


def local_address(stream: trio.SocketStream) -> str:
    """The client's end as relayd logs it (``127.0.0.1:PORT``)."""
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def connect(relayd: Relayd) -> trio.SocketStream:
    return await trio.open_tcp_stream(HOST, relayd.port)


async def exchange(relayd: Relayd, request: bytes) -> tuple[Response, str, float]:
    """One request on a new connection: ``(response, local address, seconds taken)``."""
    stream = await connect(relayd)
    local = local_address(stream)
    begun = time.monotonic()
    await stream.send_all(request)
    received = b""
    while not parse_responses(received, partial=True):
        data = await stream.receive_some(65536)
        assert data, received
        received += data
    elapsed = time.monotonic() - begun
    await stream.aclose()
    return parse_responses(received)[0], local, elapsed


def loops(relayd: Relayd, local: str) -> tuple[bool, bool]:
    """``(taken by the wire path, handed back to Hypercorn)`` for the connection from
    ``local``, from relayd's debug log."""
    log = relayd.log
    remote = f"remote={local}\n"
    return (
        f"connection served on the wire path: {remote}" in log,
        f"connection handed to Hypercorn: {remote}" in log,
    )


WIRE_PATH = (True, False)
HANDED_BACK = (True, True)
HYPERCORN = (False, False)  # meaningful: assert_still_serving sees the wire path logged


@dataclass
class Held:
    """What a trickling client saw: everything the server sent (with when), when the
    server ended the connection for the client (``closed_at``: EOF or a reset; None
    if it did not within the wait) and when it let go of its socket (``gone_at``: a
    send refused), how many bytes of the trickle went out, and from which address."""

    local: str
    trickle_length: int
    received: bytes = b""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    closed_at: float | None = None
    gone_at: float | None = None
    sent: int = 0

    @property
    def responses(self) -> list[Response]:
        return parse_responses(self.received)

    @property
    def first_byte_at(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    def assert_closed_between(self, start: float, deadline: float, tolerance: float) -> float:
        """The connection ended ``deadline`` to ``deadline + tolerance`` after
        ``start``, while the client was still trickling, and relayd let go of the
        socket soon after; returns when it ended, after ``start``."""
        assert self.closed_at is not None, (
            f"still open {wait_for(deadline, tolerance):.1f} s after the phase began "
            f"(deadline {deadline:g} s); {self.sent} bytes trickled; received {self.received!r}"
        )
        elapsed = self.closed_at - start
        assert deadline <= elapsed <= deadline + tolerance, (elapsed, deadline, self.received)
        assert self.sent < self.trickle_length, "the trickle ended before the server closed"
        assert self.gone_at is not None, (
            f"relayd still took the client's bytes {wait_for(deadline, tolerance):.1f} s "
            f"after the phase began (deadline {deadline:g} s; the client saw the connection "
            f"end after {elapsed:.2f} s); {self.sent} bytes trickled"
        )
        held_for = self.gone_at - start
        assert held_for <= deadline + LINGER + tolerance + 2 * GAP, (held_for, elapsed, deadline)
        return elapsed


def wait_for(deadline: float, tolerance: float) -> float:
    """How long :func:`hold` waits for a phase with ``deadline``: past its allowed
    end (and relayd's letting go of the socket), so a connection left open shows."""
    return deadline + LINGER + tolerance + 2 * GAP + 1


async def hold(
    stream: trio.SocketStream,
    trickle: bytes,
    *,
    start: float,
    deadline: float,
    tolerance: float = TOLERANCE,
    delay: float = 0.0,
) -> Held:
    """Send ``trickle`` one byte every :data:`GAP` (after ``delay``) while reading
    all the server sends, until the server refuses a send (its socket is gone) or
    ``wait_for(deadline, tolerance)`` seconds after ``start`` (monotonic). The
    stream is closed afterwards."""
    held = Held(local_address(stream), len(trickle))
    trickle_over = trio.Event()

    async def trickling() -> None:
        try:
            await trio.sleep(delay)
            for byte in trickle:
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    held.gone_at = time.monotonic()
                    return
                held.sent += 1
                await trio.sleep(GAP)
        finally:
            trickle_over.set()

    until = start + wait_for(deadline, tolerance)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickling)
        with trio.move_on_at(trio.current_time() + (until - time.monotonic())):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset: closed too
                    data = b""
                now = time.monotonic()
                if not data:
                    held.closed_at = now
                    break
                held.received += data
                held.chunks.append((now, data))
            await trickle_over.wait()
        nursery.cancel_scope.cancel()
    await stream.aclose()
    return held


async def assert_still_serving(relayd: Relayd, *, ask_status: int = 503) -> None:
    """relayd is alive; a new client's ``GET /health`` and plain ``POST /api/ask``
    (on the wire path: no agent, 503) are answered at once; no error was logged."""
    assert relayd.process.poll() is None, f"relayd exited:\n{relayd.log}"
    with trio.fail_after(10):
        health, _, health_took = await exchange(relayd, HEALTH)
        asked, local, ask_took = await exchange(
            relayd, ask_head(relayd.admin_key, length=len(ASK)) + ASK
        )
    assert (health.status, health.body) == (200, b"OK"), health
    assert health_took < 1, health_took
    assert asked.status == ask_status, asked
    if ask_status == 503:
        assert asked.json() == NO_AGENT
    assert ask_took < 1, ask_took
    assert loops(relayd, local) == WIRE_PATH, "relayd's debug log no longer names the loops"
    log = relayd.log
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


# -- 1-4: the request head ----------------------------------------------------------------


async def test_a_trickled_ask_head_is_cut_at_idle_timeout_from_the_connect(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """The server loop reads the head (its request line is an ask's, so it waits for
    the whole head) until the deadline, then hands the partial head to the wire path:
    which must not start the clock again (it did: 2 x idle_timeout)."""
    relayd = relayd_factory(config=CONFIG)
    with trio.fail_after(30):
        started = time.monotonic()
        stream = await connect(relayd)
        # The whole request line at once: the server loop then reads the head for
        # the wire path (may_be_ask), and the takeover gets it.
        await stream.send_all(b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n")
        held = await hold(stream, SLOW_HEADER, start=started, deadline=IDLE)
    held.assert_closed_between(started, IDLE, TOLERANCE)
    assert held.received == b""
    assert loops(relayd, held.local) == WIRE_PATH
    await assert_still_serving(relayd)


@pytest.mark.parametrize("first", ["byte-by-byte", "request-line"])
async def test_a_trickled_head_on_hypercorns_path_is_cut_at_idle_timeout(
    relayd_factory: Callable[..., Relayd], first: str
) -> None:
    relayd = relayd_factory(config=CONFIG)
    request_line = b"GET /health HTTP/1.1\r\n"
    trickle = b"Host: relay.example\r\n" + SLOW_HEADER
    with trio.fail_after(30):
        started = time.monotonic()
        stream = await connect(relayd)
        if first == "request-line":
            await stream.send_all(request_line)
        else:
            trickle = request_line + trickle
        held = await hold(stream, trickle, start=started, deadline=IDLE)
    held.assert_closed_between(started, IDLE, TOLERANCE)
    assert held.received == b""
    assert loops(relayd, held.local) == HYPERCORN
    await assert_still_serving(relayd)


async def test_a_trickled_agent_upgrade_head_is_cut_at_idle_timeout(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=CONFIG)
    headers = (
        b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    with trio.fail_after(30):
        started = time.monotonic()
        stream = await connect(relayd)
        # The agent path's prefix at once: the server loop reads the head for relayd's
        # agent wire path (may_be_agent_upgrade).
        await stream.send_all(b"GET /client/register HTTP/1.1\r\n")
        held = await hold(stream, headers + SLOW_HEADER, start=started, deadline=IDLE)
    held.assert_closed_between(started, IDLE, TOLERANCE)
    assert held.received == b""
    await assert_still_serving(relayd)
    # An agent that does not dawdle is still upgraded.
    with trio.fail_after(10):
        agent = await RawAgent.connect(relayd)
        assert agent.agent_id
        await agent.aclose()


@pytest.mark.parametrize("second", ["ask", "health"])
async def test_the_next_head_on_a_keep_alive_ask_connection_is_cut_at_idle_timeout(
    relayd_factory: Callable[..., Relayd], second: str
) -> None:
    """After an answered ``/api/ask`` the connection is idle: the next head must be
    complete within idle_timeout of the answer. The client stays silent for most of
    that, then trickles: a plain ask stays on the wire path; a ``GET /health`` is
    handed to Hypercorn at its first byte, and must keep the deadline (the hand-back
    restarted it: the connection was closed idle_timeout after that first byte)."""
    relayd = relayd_factory(config=CONFIG)
    first = ask_head(relayd.admin_key, length=len(ASK)) + ASK
    if second == "ask":
        trickle = ask_head(relayd.admin_key)[:-2] + SLOW_HEADER
    else:
        trickle = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n" + SLOW_HEADER
    silent = IDLE * 0.75  # past TOLERANCE: a clock restarted at the first byte shows
    assert TOLERANCE < silent < IDLE - GAP
    with trio.fail_after(30):
        stream = await connect(relayd)
        started = time.monotonic()  # before the answer, which starts the idle time
        await stream.send_all(first)
        held = await hold(stream, trickle, start=started, deadline=IDLE, delay=silent)
    (answered,) = held.responses
    assert answered.status == 503, answered  # no agent: answered at once
    assert answered.json() == NO_AGENT
    assert held.first_byte_at is not None and held.first_byte_at - started < 0.5
    assert held.sent >= 1, "the trickle never started"
    held.assert_closed_between(started, IDLE, TOLERANCE)
    assert loops(relayd, held.local) == (WIRE_PATH if second == "ask" else HANDED_BACK)
    await assert_still_serving(relayd)


# -- 5-7: the body ------------------------------------------------------------------------


async def test_a_trickled_body_on_the_wire_path_gets_408_at_body_timeout(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=CONFIG)
    with trio.fail_after(30):
        stream = await connect(relayd)
        started = time.monotonic()
        await stream.send_all(ask_head(relayd.admin_key))
        held = await hold(stream, BODY_BYTES, start=started, deadline=BODY)
    held.assert_closed_between(started, BODY, TOLERANCE)
    (late,) = held.responses
    assert late.status == 408, late
    assert late.json() == LATE
    assert late.header(b"connection") == b"close"
    assert held.first_byte_at is not None and held.first_byte_at - started >= BODY
    assert loops(relayd, held.local) == WIRE_PATH
    await assert_still_serving(relayd)
    assert "request failed: status=408" in relayd.log


@pytest.mark.parametrize("way", ["chunked", "after-health"])
async def test_a_trickled_body_on_hypercorns_ask_gets_408_at_body_timeout(
    relayd_factory: Callable[..., Relayd], way: str
) -> None:
    """Hypercorn's ``/api/ask``: a chunked body (the wire path leaves it to Hypercorn),
    or a body with a Content-Length after a ``GET /health`` on the same connection."""
    relayd = relayd_factory(config=CONFIG)
    if way == "chunked":
        opening = ask_head(relayd.admin_key, length=None) + chunk_header()
    else:
        opening = HEALTH + ask_head(relayd.admin_key)
    with trio.fail_after(30):
        stream = await connect(relayd)
        started = time.monotonic()
        await stream.send_all(opening)
        held = await hold(stream, BODY_BYTES, start=started, deadline=BODY)
    held.assert_closed_between(started, BODY, TOLERANCE)
    *before, late = held.responses
    if way == "after-health":
        assert [(response.status, response.body) for response in before] == [(200, b"OK")]
    else:
        assert before == []
    assert late.status == 408, late
    assert late.json() == LATE
    assert held.chunks[-1][0] - started >= BODY
    assert loops(relayd, held.local) == HYPERCORN
    await assert_still_serving(relayd)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_trickled_body_on_a_quart_route_gets_408_at_body_timeout(
    relayd_factory: Callable[..., Relayd], framing: str
) -> None:
    """``POST /admin/users/add`` (Quart: BODY_TIMEOUT is server.body_timeout), with the
    right admin key: 408, and no user is added."""
    relayd = relayd_factory(config=CONFIG)
    bearer = f"Authorization: Bearer {relayd.admin_key}\r\n".encode()
    if framing == "chunked":
        framed = b"Transfer-Encoding: chunked\r\n\r\n" + chunk_header()
    else:
        framed = b"Content-Length: %d\r\n\r\n" % len(BODY_BYTES)
    opening = b"POST /admin/users/add HTTP/1.1\r\nHost: relay.example\r\n" + bearer + framed
    with trio.fail_after(30):
        stream = await connect(relayd)
        started = time.monotonic()
        await stream.send_all(opening)
        held = await hold(stream, BODY_BYTES, start=started, deadline=BODY)
    held.assert_closed_between(started, BODY, TOLERANCE)
    (late,) = held.responses
    assert late.status == 408, late
    assert late.json() == LATE
    assert held.first_byte_at is not None and held.first_byte_at - started >= BODY
    await assert_still_serving(relayd)
    with trio.fail_after(10):
        users, _, _ = await exchange(
            relayd, b"GET /admin/users HTTP/1.1\r\nHost: relay.example\r\n" + bearer + b"\r\n"
        )
    assert users.status == 200, users
    assert users.json() == {"users": []}


# -- 8-10: a body after a refusal -----------------------------------------------------------


async def lock_out(relayd: Relayd) -> None:
    """Spend 127.0.0.1's only failed authentication (THROTTLING_CONFIG): a 401."""
    with trio.fail_after(10):
        refused, _, _ = await exchange(relayd, ask_head("bad-token", length=len(ASK)) + ASK)
    assert refused.status == 401, refused


async def refuse_and_hold(
    relayd: Relayd, opening: bytes, *, answered_within: float
) -> tuple[Held, float]:
    """Send ``opening`` (ending with a refused head), then trickle the body; the
    refusal must come within ``answered_within`` seconds. ``(held, started)``."""
    with trio.fail_after(30):
        stream = await connect(relayd)
        started = time.monotonic()
        await stream.send_all(opening)
        held = await hold(stream, BODY_BYTES, start=started, deadline=DISCARD_WAIT)
    assert held.chunks, held
    assert held.chunks[-1][0] - started < answered_within, (held.chunks, started)
    return held, started


async def test_a_refused_body_trickled_on_the_wire_path_is_dropped_for_2_s_then_closed(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """The security review's case: 401 for a bad token before a large declared body,
    then a byte every GAP held the socket for as long as the client went on. The body
    is read for DISCARD_WAIT; it is not whole, so the 401 says Connection: close and
    the connection ends with it."""
    relayd = relayd_factory(config=CONFIG)
    held, started = await refuse_and_hold(
        relayd, ask_head("bad-token"), answered_within=DISCARD_WAIT + TOLERANCE
    )
    held.assert_closed_between(started, DISCARD_WAIT, TOLERANCE)
    (refused,) = held.responses  # nothing more when the connection closes
    assert refused.status == 401, refused
    assert refused.header(b"connection") == b"close"
    assert refused.json() == INVALID_TOKEN
    assert loops(relayd, held.local) == WIRE_PATH
    await assert_still_serving(relayd)


async def test_a_throttled_body_trickled_on_the_wire_path_is_dropped_for_2_s_then_closed(
    relayd_factory: Callable[..., Relayd],
) -> None:
    relayd = relayd_factory(config=THROTTLING_CONFIG)
    await lock_out(relayd)
    held, started = await refuse_and_hold(
        relayd, ask_head("bad-token"), answered_within=DISCARD_WAIT + TOLERANCE
    )
    held.assert_closed_between(started, DISCARD_WAIT, TOLERANCE)
    (throttled,) = held.responses
    assert throttled.status == 429, throttled
    assert throttled.header(b"connection") == b"close"
    assert throttled.json()["error"]
    retry_after = throttled.header(b"retry-after")
    assert retry_after is not None and 0 < int(retry_after) <= 60
    assert loops(relayd, held.local) == WIRE_PATH
    # The admin key from a locked-out address gets 429 too.
    await assert_still_serving(relayd, ask_status=429)


@pytest.mark.parametrize(
    ("refusal", "framing"),
    [("401", "content-length"), ("429", "content-length"), ("401", "chunked")],
)
async def test_a_refused_body_trickled_on_hypercorns_path_is_dropped_for_2_s_then_closed(
    relayd_factory: Callable[..., Relayd], refusal: str, framing: str
) -> None:
    """Hypercorn's ``/api/ask`` (after a ``GET /health``) reads a refused body,
    chunked or of a declared length, for up to DISCARD_WAIT before it answers;
    the body is not whole, so the answer says Connection: close and the
    connection ends with it."""
    relayd = relayd_factory(config=THROTTLING_CONFIG if refusal == "429" else CONFIG)
    if refusal == "429":
        await lock_out(relayd)
    if framing == "chunked":
        opening = HEALTH + ask_head("bad-token", length=None) + chunk_header()
    else:
        opening = HEALTH + ask_head("bad-token")
    held, started = await refuse_and_hold(relayd, opening, answered_within=DISCARD_WAIT + TOLERANCE)
    held.assert_closed_between(started, DISCARD_WAIT, TOLERANCE)
    health, refused = held.responses
    assert (health.status, health.body) == (200, b"OK")
    assert refused.status == int(refusal), refused
    assert refused.header(b"connection") == b"close"
    if refusal == "401":
        assert refused.json() == INVALID_TOKEN
    else:
        assert refused.header(b"retry-after") is not None
    assert loops(relayd, held.local) == HYPERCORN
    await assert_still_serving(relayd, ask_status=429 if refusal == "429" else 503)


# -- many at once --------------------------------------------------------------------------


async def test_fifty_trickled_refused_bodies_are_all_closed_and_others_are_served(
    relayd_factory: Callable[..., Relayd],
) -> None:
    """CROWD connections refused (401) on the wire path, each trickling its body: each
    gets its 401, with Connection: close, and is closed DISCARD_WAIT after its head;
    meanwhile a new client's ``GET /health`` and ``/api/ask`` are answered at once."""
    relayd = relayd_factory(config=CONFIG)
    results: list[tuple[Held, float]] = []
    trickling = 0
    all_trickling = trio.Event()

    async def trickler() -> None:
        nonlocal trickling
        stream = await connect(relayd)
        started = time.monotonic()
        await stream.send_all(ask_head("bad-token"))
        trickling += 1
        if trickling == CROWD:
            all_trickling.set()
        held = await hold(
            stream, BODY_BYTES, start=started, deadline=DISCARD_WAIT, tolerance=CROWD_TOLERANCE
        )
        results.append((held, started))

    fresh: list[tuple[Response, float]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(CROWD):
                nursery.start_soon(trickler)
            await all_trickling.wait()
            # All of them are refused and trickling: a new client is served at once.
            for request in (HEALTH, ask_head(relayd.admin_key, length=len(ASK)) + ASK):
                response, _, took = await exchange(relayd, request)
                fresh.append((response, took))
            done_meanwhile = len(results)
    assert [response.status for response, _ in fresh] == [200, 503], fresh
    assert max(took for _, took in fresh) < 0.5, fresh
    assert done_meanwhile == 0, "trickling connections ended before the new client was served"
    assert len(results) == CROWD
    for held, started in results:
        held.assert_closed_between(started, DISCARD_WAIT, CROWD_TOLERANCE)
        (answer,) = held.responses
        assert answer.status == 401, answer
        assert answer.header(b"connection") == b"close"
        assert loops(relayd, held.local) == WIRE_PATH
    await assert_still_serving(relayd)
