"""AskConnection and AskWire (relayd/front/ask_wire.py): ``/api/ask`` clients on the wire path.

The connection is served over one half of ``trio.testing.memory_stream_pair``
(where ``read_some`` and the writes use the stream's own methods); the test is
the client on the other half. The endpoint is a fake (:class:`FakeEndpoint`)
whose answers the test controls: held until released, raising, recording
every call and whether it was cancelled.

Everything runs in virtual time (``autojump_clock``): timeouts are asserted
exactly and take no real time, and every wait is bounded by ``trio.fail_after``
so that a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest
import trio
import trio.testing

from relayd.ask import DISCARD_WAIT, AskEndpoint, Caller, HttpReply
from relayd.errors import Unauthorized
from relayd.front.ask_wire import AskConnection, AskWire
from relayd.front.http1 import CONTINUE, HttpDate
from relayd.front.sockets import WRITE_TIMEOUT, ConnectionTerms, WriteLimits
from tests.raw_http import RawClient, Response

KEEP_ALIVE = 10.0  # the connection's keep_alive_timeout (virtual seconds)
# The endpoint's body_timeout: relayd uses server.idle_timeout for both; the tests
# tell them apart.
BODY_TIMEOUT = 6.0
# server.body_timeout: the whole body must arrive within this (virtual seconds)
BODY_DEADLINE = 30.0
MAX_BODY = 1024
CLIENT = ("203.0.113.7", 40000)
# Long enough for any test here in virtual time: only a deadlock reaches it.
LIMIT = 10 * KEEP_ALIVE
DATE = re.compile(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")
INTERNAL_ERROR = b'{"error": "internal error; see the relayd log"}'
HEALTH = b"GET /health HTTP/1.1\r\nHost: relay.example\r\n\r\n"

Stream = trio.abc.HalfCloseableStream


# -- the fake endpoint -------------------------------------------------------------------


@dataclass
class Call:
    authorization: str | None
    address: str
    body: bytes
    caller: Caller | None = None
    cancelled: bool = False
    finished: bool = False


class FakeEndpoint:
    """Stands in for :class:`relayd.ask.AskEndpoint`.

    Answers ``HttpReply(200, {"n": <call index>, "body": ..., "authorization": ...},
    [(b"x-call", <index>)])`` unless ``replies`` holds the reply to give; a call
    whose index is in ``holds`` waits for that event first; ``error`` is raised
    instead of answering. A stalled body is refused with AskEndpoint's own 408.
    The credential "bad" is refused with a 401 by :meth:`caller` (the check made
    before a body that has not arrived yet), and every check is recorded.
    """

    max_body = MAX_BODY
    body_timeout = BODY_TIMEOUT
    body_deadline = BODY_DEADLINE
    # The real 408s and the log line (they use nothing of the endpoint but the timeouts).
    stalled = AskEndpoint.stalled
    late = AskEndpoint.late
    failure = AskEndpoint.failure
    error_body = AskEndpoint.error_body

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.replies: dict[int, HttpReply] = {}
        self.holds: dict[int, trio.Event] = {}
        self.error: Exception | None = None
        self.called = trio.Event()  # set, and replaced, at every call
        self.checked: list[str | None] = []  # the credentials caller() saw

    def client_address(self, peer: str, forwarded_for: tuple[bytes, ...]) -> str:
        return peer  # no trusted proxies here

    def caller(self, authorization: str | None, address: str) -> Caller:
        self.checked.append(authorization)
        if authorization == "bad":
            raise Unauthorized("invalid token")
        return Caller(None, f"user-{authorization}")

    async def answer(
        self,
        authorization: str | None,
        address: str,
        body: bytes,
        *,
        caller: Caller | None = None,
        event_stream: bool = False,
        sink: object = None,
        idempotency_key: str | None = None,
    ) -> HttpReply:
        assert isinstance(body, bytes)  # the wire path reads the body first
        index = len(self.calls)
        call = Call(authorization, address, body, caller)
        self.calls.append(call)
        self.called.set()
        self.called = trio.Event()
        try:
            if index in self.holds:
                await self.holds[index].wait()
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            call.cancelled = True
            raise
        call.finished = True
        if self.error is not None:
            raise self.error
        if index in self.replies:
            return self.replies[index]
        document = {"n": index, "body": body.decode(), "authorization": authorization}
        return HttpReply(200, json.dumps(document).encode(), [(b"x-call", str(index).encode())])

    def hold(self, index: int) -> trio.Event:
        """Make call ``index`` wait for the returned event."""
        self.holds[index] = trio.Event()
        return self.holds[index]

    async def wait_for_calls(self, count: int) -> None:
        while len(self.calls) < count:
            await self.called.wait()


# -- the client's end --------------------------------------------------------------------


# -- requests ----------------------------------------------------------------------------


def ask(
    body: bytes = b'{"content": "hello"}',
    *,
    authorization: bytes | None = b"token",
    extra: bytes = b"",
    length: int | None = None,
) -> bytes:
    """A plain ``POST /api/ask`` with ``body`` (``extra``: more header lines, each ending
    in CRLF; ``length``: declare another Content-Length)."""
    declared = len(body) if length is None else length
    lines = b"POST /api/ask HTTP/1.1\r\nHost: relay.example\r\n"
    if authorization is not None:
        lines += b"Authorization: " + authorization + b"\r\n"
    lines += b"Content-Length: %d\r\n" % declared + extra + b"\r\n"
    return lines + body


def head_of(request: bytes) -> bytes:
    return request[: request.index(b"\r\n\r\n") + 4]


# -- running a connection ----------------------------------------------------------------

NOT_YET = b"<still running>"


@dataclass
class Served:
    """An AskConnection.run in the test's nursery."""

    result: bytes | None = NOT_YET  # the bytes handed back to Hypercorn, if any
    handed_idle_since: float | None = None  # and since when the connection was idle
    ended_at: float = -1.0
    done: trio.Event = field(default_factory=trio.Event)

    async def wait(self) -> bytes | None:
        with trio.fail_after(LIMIT):
            await self.done.wait()
        return self.result


@dataclass
class Setup:
    nursery: trio.Nursery
    endpoint: FakeEndpoint
    server: Stream
    client: RawClient
    stopping: list[bool]

    def terms(self, keep_alive: float = KEEP_ALIVE) -> ConnectionTerms:
        return ConnectionTerms(
            WriteLimits(),
            keep_alive_timeout=keep_alive,
            stopping=self.is_stopping,
            idle_since=trio.current_time(),
        )

    def is_stopping(self) -> bool:
        return self.stopping[0]

    def connection(
        self, *, keep_alive: float = KEEP_ALIVE, client: tuple[str, int] | None = CLIENT
    ) -> AskConnection:
        endpoint = cast(AskEndpoint, self.endpoint)
        return AskConnection(endpoint, self.server, client, self.terms(keep_alive), HttpDate())

    def start(self, head: bytes, connection: AskConnection | None = None) -> Served:
        """Run ``connection`` (a new one by default) from ``head``, in the background."""
        connection = connection or self.connection()
        served = Served()

        async def run() -> None:
            handback = await connection.run(head)
            served.result = None if handback is None else handback.data
            served.handed_idle_since = None if handback is None else handback.idle_since
            served.ended_at = trio.current_time()
            served.done.set()

        self.nursery.start_soon(run)
        return served

    async def written_after_end(self) -> bytes:
        """What the server wrote that the client has not read, once its run is over
        (the server closes its end, as GuardedTCPServer does)."""
        await self.server.aclose()
        with trio.fail_after(LIMIT):
            return await self.client.rest()


@pytest.fixture
async def setup(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[Setup]:
    server, client = trio.testing.memory_stream_pair()
    yield Setup(nursery, FakeEndpoint(), server, RawClient(client), [False])
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


async def ends_when_the_client_leaves(setup: Setup, served: Served) -> None:
    """The client closes its side; the connection ends without handing anything back."""
    await setup.client.stream.send_eof()
    assert await served.wait() is None


async def one_answered(setup: Setup) -> Served:
    """A connection started with one request, and its answer read."""
    served = setup.start(ask(b"one"))
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, b"one")
    return served


def assert_answer(response: Response, index: int, body: bytes, *, close: bool = False) -> None:
    """``response`` is the fake endpoint's default answer to call ``index``."""
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert all(name == name.lower() for name, _ in response.headers), response.headers
    document = response.json()
    assert document == {"n": index, "body": body.decode(), "authorization": "token"}
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"content-length") == str(len(response.body)).encode()
    assert response.header(b"x-call") == str(index).encode()
    date = response.header(b"date")
    assert date is not None and DATE.fullmatch(date), date
    assert response.header(b"connection") == (b"close" if close else None)


# -- keep-alive --------------------------------------------------------------------------


async def test_two_requests_on_one_connection_are_answered_in_order(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    setup.endpoint.replies[1] = HttpReply(
        503, b'{"error": "no agent connected"}', [(b"retry-after", b"5")]
    )
    first, second = b'{"content": "one"}', b'{"content": "two"}'
    served = setup.start(ask(first))
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, first)
        await setup.client.send(ask(second, authorization=b"Bearer other"))
        response = await setup.client.response()
    assert response.status_line == b"HTTP/1.1 503 Service Unavailable"
    assert response.body == b'{"error": "no agent connected"}'
    assert sorted(response.names) == [b"content-length", b"content-type", b"date", b"retry-after"]
    assert response.header(b"content-length") == b"31"
    assert response.header(b"retry-after") == b"5"
    assert [(c.authorization, c.address, c.body) for c in setup.endpoint.calls] == [
        ("token", CLIENT[0], first),
        ("Bearer other", CLIENT[0], second),
    ]
    assert not served.done.is_set()  # still alive for a third


async def test_pipelined_requests_are_answered_in_order_one_after_another(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    bodies = [b'{"content": "%d"}' % n for n in range(3)]
    release = setup.endpoint.hold(0)
    served = setup.start(b"".join(ask(body) for body in bodies))  # one write
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        assert await setup.client.silent_for(1)  # every task has run: nothing more happens
        assert len(setup.endpoint.calls) == 1  # the second waits for the first answer
        release.set()
        responses = [await setup.client.response() for _ in bodies]
    for index, (response, body) in enumerate(zip(responses, bodies, strict=True)):
        assert_answer(response, index, body)
    assert [call.body for call in setup.endpoint.calls] == bodies
    assert await setup.client.silent_for(1)
    assert not served.done.is_set()


async def test_pipelined_requests_sent_after_the_first_wait_for_its_answer(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = setup.endpoint.hold(0)
    setup.start(ask(b"first"))
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        await setup.client.send(ask(b"second") + ask(b"third"))
        assert await setup.client.silent_for(1)
        assert len(setup.endpoint.calls) == 1
        release.set()
        for index, body in enumerate([b"first", b"second", b"third"]):
            assert_answer(await setup.client.response(), index, body)


async def test_a_request_split_into_many_writes_is_served(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    request = ask(b'{"content": "in pieces"}')
    served = setup.start(request[:5])
    with trio.fail_after(LIMIT):
        for byte in request[5:]:
            await setup.client.send(bytes([byte]))
        assert_answer(await setup.client.response(), 0, b'{"content": "in pieces"}')
    assert not served.done.is_set()


# -- hand-back to Hypercorn --------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(HEALTH, id="get-health"),
        pytest.param(HEALTH + ask(b"after"), id="get-health-then-an-ask"),
        pytest.param(b"GET /api/ask HTTP/1.1\r\nHost: x\r\n\r\n", id="get-ask"),
        pytest.param(ask(b"x" * (MAX_BODY + 1)), id="body-over-max-body"),
        pytest.param(
            ask(b"5\r\nhello\r\n0\r\n\r\n", extra=b"Transfer-Encoding: chunked\r\n"), id="chunked"
        ),
        pytest.param(ask(b"{}", extra=b"Expect: something\r\n"), id="unknown-expect"),
        pytest.param(b"G", id="one-byte"),
    ],
)
async def test_the_first_request_not_plain_hands_back_exactly_the_unread_bytes(
    setup: Setup, autojump_clock: trio.testing.MockClock, other: bytes
) -> None:
    served = setup.start(ask(b"first"))
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, b"first")
        await setup.client.send(other)
    assert await served.wait() == other
    assert len(setup.endpoint.calls) == 1
    assert await setup.client.silent_for(1)  # Hypercorn answers it, not the wire path


async def test_a_pipelined_request_not_plain_is_handed_back_after_the_answers(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    rest = HEALTH + ask(b"third") + b"POST /api/ask HTTP/1.1\r\nHo"
    served = setup.start(ask(b"first") + ask(b"second") + rest)
    assert await served.wait() == rest
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, b"first")
        assert_answer(await setup.client.response(), 1, b"second")
    assert await setup.client.silent_for(1)
    assert [call.body for call in setup.endpoint.calls] == [b"first", b"second"]


async def test_a_request_arriving_during_an_answer_is_handed_back_after_it(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = setup.endpoint.hold(0)
    served = setup.start(ask(b"first"))
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        await setup.client.send(HEALTH)
        assert await setup.client.silent_for(1)
        assert not served.done.is_set()  # not before the answer is out
        release.set()
        assert_answer(await setup.client.response(), 0, b"first")
    assert await served.wait() == HEALTH


# -- AskWire -----------------------------------------------------------------------------


def test_wants_the_ask_request_line() -> None:
    wire = AskWire({"/api/ask": cast(AskEndpoint, FakeEndpoint())})
    assert wire.might_serve(b"POST /api/ask HTTP/1.1\r\nHost: x\r\n")
    assert not wire.might_serve(b"POST /api/ask")  # the request line is not complete
    assert not wire.might_serve(HEALTH)
    assert not wire.might_serve(b"GET /client/register HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "head",
    [
        HEALTH,
        b"GET /client/register HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        ask(b"x" * (MAX_BODY + 1)),
        ask(b"{}", extra=b"Transfer-Encoding: chunked\r\n"),
        head_of(ask(b"{}", extra=b"Upgrade: h2c\r\n")),
        b"POST /api/ask HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # no Host
    ],
)
async def test_claim_leaves_a_request_that_is_not_plain(
    setup: Setup, autojump_clock: trio.testing.MockClock, head: bytes
) -> None:
    wire = AskWire({"/api/ask": cast(AskEndpoint, setup.endpoint)})
    assert (
        wire.server_for(head, cast(trio.SocketStream, setup.server), CLIENT, setup.terms()) is None
    )


@pytest.mark.parametrize(
    "head",
    [ask(b"{}"), head_of(ask(b"{}")), b"POST /api/ask HTTP/1.1\r\nHost: x\r\n"],
    ids=["whole", "head-only", "incomplete"],
)
async def test_claim_takes_a_plain_request(
    setup: Setup, autojump_clock: trio.testing.MockClock, head: bytes
) -> None:
    wire = AskWire({"/api/ask": cast(AskEndpoint, setup.endpoint)})
    served = wire.server_for(head, cast(trio.SocketStream, setup.server), CLIENT, setup.terms())
    assert inspect.iscoroutine(served)
    served.close()
    assert setup.endpoint.calls == []


async def test_a_claimed_connection_is_served(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    wire = AskWire({"/api/ask": cast(AskEndpoint, setup.endpoint)})
    request = ask(b"claimed", extra=b"Connection: close\r\n")
    served = wire.server_for(request, cast(trio.SocketStream, setup.server), None, setup.terms())
    assert served is not None
    with trio.fail_after(LIMIT):
        assert await served is None
        assert_answer(await setup.client.response(), 0, b"claimed", close=True)
    assert setup.endpoint.calls[0].address == "unix"  # no client address: a Unix socket


# -- closing -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"close", b"keep-alive, Close"])
async def test_connection_close_is_answered_and_ends_the_connection(
    setup: Setup, autojump_clock: trio.testing.MockClock, value: bytes
) -> None:
    request = ask(b"last", extra=b"Connection: " + value + b"\r\n")
    served = setup.start(request + ask(b"never served"))
    assert await served.wait() is None
    rest = await setup.written_after_end()
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.count(b"HTTP/1.1") == 1
    assert b"\r\nconnection: close\r\n" in rest
    assert [call.body for call in setup.endpoint.calls] == [b"last"]


async def test_shutdown_answers_with_connection_close(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = setup.start(ask(b"before"))
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, b"before")
        setup.stopping[0] = True
        await setup.client.send(ask(b"during") + ask(b"never served"))
        assert_answer(await setup.client.response(), 1, b"during", close=True)
    assert await served.wait() is None
    assert await setup.written_after_end() == b""
    assert len(setup.endpoint.calls) == 2


# -- timeouts ----------------------------------------------------------------------------


async def test_an_idle_connection_closes_after_keep_alive_timeout(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = await one_answered(setup)
    answered_at = trio.current_time()
    await trio.sleep(KEEP_ALIVE - 0.01)
    assert not served.done.is_set()  # not before
    assert await served.wait() is None
    assert served.ended_at - answered_at == pytest.approx(KEEP_ALIVE)
    assert await setup.written_after_end() == b""


async def test_the_idle_time_counts_from_the_answer_not_the_request(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    release = setup.endpoint.hold(0)
    served = setup.start(ask(b"slow"))
    with trio.fail_after(LIMIT):
        await trio.sleep(3 * KEEP_ALIVE)  # an answer may take longer than the idle allowance
        assert not served.done.is_set()
        release.set()
        assert_answer(await setup.client.response(), 0, b"slow")
    answered_at = trio.current_time()
    assert await served.wait() is None
    assert served.ended_at - answered_at == pytest.approx(KEEP_ALIVE)


async def test_a_request_just_before_the_idle_timeout_is_served(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = await one_answered(setup)
    with trio.fail_after(LIMIT):
        await trio.sleep(KEEP_ALIVE - 0.1)
        await setup.client.send(ask(b"two"))
        assert_answer(await setup.client.response(), 1, b"two")
        answered_at = trio.current_time()
    assert await served.wait() is None  # then idle again, for a whole allowance
    assert served.ended_at - answered_at == pytest.approx(KEEP_ALIVE)


async def test_an_incomplete_head_closes_after_the_timeout(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    started = trio.current_time()
    served = setup.start(b"POST /api/ask HTTP/1.1\r\nHost: x\r\n")
    assert await served.wait() is None
    assert served.ended_at - started == pytest.approx(KEEP_ALIVE)
    assert setup.endpoint.calls == []
    assert await setup.written_after_end() == b""


async def test_a_head_trickling_in_must_still_be_complete_within_the_timeout(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.current_time()
    served = setup.start(b"POST /api/ask HTTP/1.1\r\n")
    with trio.fail_after(LIMIT):
        for _ in range(3):
            await trio.sleep(KEEP_ALIVE / 4)
            await setup.client.send(b"X-Slow: a\r\n")
    assert await served.wait() is None
    assert served.ended_at - started == pytest.approx(KEEP_ALIVE)
    assert setup.endpoint.calls == []


async def test_a_next_head_must_be_complete_within_the_idle_allowance(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = await one_answered(setup)
    answered_at = trio.current_time()
    await trio.sleep(KEEP_ALIVE / 2)
    await setup.client.send(head_of(ask(b"two"))[:-2])  # all but the blank line
    assert await served.wait() is None
    assert served.ended_at - answered_at == pytest.approx(KEEP_ALIVE)
    assert len(setup.endpoint.calls) == 1


async def test_a_stalled_body_is_answered_408_after_body_timeout_of_silence(
    setup: Setup, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd.api")
    body = b'{"content": "stalled"}'
    served = setup.start(ask(body)[:-15])
    await trio.sleep(BODY_TIMEOUT * 0.8)
    await setup.client.send(ask(body)[-15:-10])  # five more bytes: the wait starts again
    last_byte_at = trio.current_time()
    assert await served.wait() is None
    assert served.ended_at - last_byte_at == pytest.approx(BODY_TIMEOUT)
    assert setup.endpoint.calls == []
    with trio.fail_after(LIMIT):
        response = await setup.client.response()
    assert response.status_line == b"HTTP/1.1 408 Request Timeout"
    assert response.json() == {
        "error": "the request body stopped arriving for server.idle_timeout (6 s)"
    }
    assert response.header(b"connection") == b"close"
    assert await setup.written_after_end() == b""
    assert [r.getMessage() for r in caplog.records if r.name == "relayd.api"] == [
        "request failed: status=408 reason=the request body stopped arriving for "
        "server.idle_timeout (6 s) user=user-token conversation=-"
    ]
    assert setup.endpoint.checked == ["token"]  # checked before the body, logged with it


async def test_credentials_are_checked_before_a_body_still_on_its_way(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """As on Hypercorn's path: the check is made once, and its caller passed on."""
    body = b'{"content": "late"}'
    served = setup.start(ask(body)[:-4])
    with trio.fail_after(LIMIT):
        await trio.testing.wait_all_tasks_blocked()
        assert setup.endpoint.checked == ["token"]
        assert setup.endpoint.calls == []
        await setup.client.send(ask(body)[-4:])
        assert_answer(await setup.client.response(), 0, body)
    assert setup.endpoint.checked == ["token"]
    assert setup.endpoint.calls[0].caller == (None, "user-token")
    await ends_when_the_client_leaves(setup, served)


async def test_a_whole_request_is_checked_by_its_answer_alone(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = setup.start(ask(b"whole"))
    with trio.fail_after(LIMIT):
        assert_answer(await setup.client.response(), 0, b"whole")
    assert setup.endpoint.checked == []
    assert setup.endpoint.calls[0].caller is None
    await ends_when_the_client_leaves(setup, served)


async def test_a_refused_body_that_comes_is_dropped_and_the_connection_kept(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """The credentials fail on the head; the body is read and dropped before the
    answer, which then keeps the connection (as on Hypercorn's path)."""
    refused = ask(b'{"content": "never asked"}', authorization=b"bad")
    served = setup.start(refused[:-5])
    with trio.fail_after(LIMIT):
        await trio.testing.wait_all_tasks_blocked()
        assert setup.endpoint.checked == ["bad"]  # refused on its head
        assert await setup.client.silent_for(DISCARD_WAIT * 0.5)  # no answer before the body
        await setup.client.send(refused[-5:] + ask(b"next"))
        response = await setup.client.response()
        assert response.status == 401
        assert response.json() == {"error": "invalid token"}
        assert response.header(b"connection") is None
        assert_answer(await setup.client.response(), 0, b"next")
    assert setup.endpoint.checked == ["bad"]
    assert [call.body for call in setup.endpoint.calls] == [b"next"]
    await ends_when_the_client_leaves(setup, served)


async def test_the_idle_time_after_a_refusal_counts_from_the_end_of_its_body(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    refused = ask(b'{"content": "slow"}', authorization=b"bad")
    served = setup.start(refused[:-5])
    with trio.fail_after(LIMIT):
        await trio.sleep(DISCARD_WAIT * 0.8)
        await setup.client.send(refused[-5:])  # the refused body ends now
        assert (await setup.client.response()).status == 401
        await trio.sleep(KEEP_ALIVE * 0.8)  # past KEEP_ALIVE since the refused head
        await setup.client.send(ask(b"next"))
        assert_answer(await setup.client.response(), 0, b"next")
    await ends_when_the_client_leaves(setup, served)


@pytest.mark.parametrize(
    "extra", [b"Expect: 100-continue\r\n", b"Connection: close\r\n"], ids=["expect", "close"]
)
async def test_a_refusal_before_the_body_closes_when_the_body_may_never_come(
    setup: Setup, autojump_clock: trio.testing.MockClock, extra: bytes
) -> None:
    """A client waiting for 100 Continue need not send its body after a refusal."""
    served = setup.start(head_of(ask(b"{}", authorization=b"bad", extra=extra)))
    assert await served.wait() is None
    with trio.fail_after(LIMIT):
        response = await setup.client.response()
    assert response.status == 401
    assert response.header(b"connection") == b"close"
    assert setup.endpoint.calls == []
    assert await setup.written_after_end() == b""


async def test_a_refused_body_that_does_not_come_is_answered_with_close(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """No 408 for a body nobody asked for: after the discard allowance the refusal
    goes out with Connection: close and the connection ends."""
    started_at = trio.current_time()
    served = setup.start(ask(b'{"content": "x"}', authorization=b"bad")[:-3])
    with trio.fail_after(LIMIT):
        response = await setup.client.response()
    assert response.status == 401
    assert response.header(b"connection") == b"close"
    assert trio.current_time() - started_at == pytest.approx(DISCARD_WAIT)
    assert await served.wait() is None
    assert served.ended_at - started_at == pytest.approx(DISCARD_WAIT)
    assert await setup.written_after_end() == b""


async def test_a_stalled_body_on_a_later_request_is_answered_408(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = await one_answered(setup)
    with trio.fail_after(LIMIT):
        await setup.client.send(ask(b"two, never whole")[:-1])
        sent_at = trio.current_time()
        response = await setup.client.response()
    assert response.status == 408
    assert response.header(b"connection") == b"close"
    assert await served.wait() is None
    assert served.ended_at - sent_at == pytest.approx(BODY_TIMEOUT)
    assert len(setup.endpoint.calls) == 1


async def test_a_body_trickling_in_with_short_gaps_is_served_within_the_body_deadline(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    body = b'{"content": "trickle"}'
    request = ask(body)
    body_start = len(request) - len(body)
    served = setup.start(request[:body_start])
    gap = BODY_DEADLINE / (len(body) + 1)
    assert gap < BODY_TIMEOUT
    with trio.fail_after(LIMIT):
        for byte in body:
            await trio.sleep(gap)
            assert not served.done.is_set()
            await setup.client.send(bytes([byte]))
        assert_answer(await setup.client.response(), 0, body)
    assert not served.done.is_set()


async def test_a_body_trickling_in_below_the_silence_limit_gets_408_at_the_body_deadline(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """Each gap is within the silence limit, but the whole body takes too long:
    one total deadline for the body, however it is sent (no slowloris)."""
    body = b'{"content": "' + b"x" * 200 + b'"}'
    request = ask(body)
    served = setup.start(head_of(request))
    started = trio.current_time()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for byte in body:
                    await trio.sleep(BODY_TIMEOUT * 0.9)
                    await setup.client.send(bytes([byte]))

            nursery.start_soon(trickle)
            response = await setup.client.response()
            nursery.cancel_scope.cancel()
    assert response.status == 408
    assert response.json() == {
        "error": f"the request body did not arrive within server.body_timeout ({BODY_DEADLINE:g} s)"
    }
    assert response.header(b"connection") == b"close"
    assert trio.current_time() - started == pytest.approx(BODY_DEADLINE)
    assert await served.wait() is None
    assert setup.endpoint.calls == []


async def test_a_refused_body_trickling_in_is_cut_off_at_the_discard_deadline(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """The security review's case: a refusal (401, 429) before a large declared
    body, then a byte every few seconds, held the socket for good. Now the body is
    read for DISCARD_WAIT from the head, then the refusal goes out with
    Connection: close and the connection ends."""
    request = ask(b"x" * 1000, authorization=b"bad")
    started_at = trio.current_time()
    served = setup.start(head_of(request))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for byte in b"x" * 1000:
                    await trio.sleep(DISCARD_WAIT / 10)
                    await setup.client.send(bytes([byte]))

            nursery.start_soon(trickle)
            response = await setup.client.response()
            assert await served.wait() is None
            nursery.cancel_scope.cancel()
    assert response.status == 401
    assert response.header(b"connection") == b"close"
    assert served.ended_at - started_at == pytest.approx(DISCARD_WAIT)


async def test_a_head_trickling_in_gets_one_deadline_from_when_the_connection_opened(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """The server loop read part of the head before handing the connection over:
    the head's deadline still counts from the connection's start, not twice."""
    opened = trio.current_time()
    terms = setup.terms()
    await trio.sleep(KEEP_ALIVE * 0.6)  # the server loop read for this long
    request = ask(b"{}")
    connection = AskConnection(
        cast(AskEndpoint, setup.endpoint), setup.server, CLIENT, terms, HttpDate()
    )
    served = setup.start(request[:30], connection)
    with trio.fail_after(LIMIT):
        for byte in request[30:-10]:
            await trio.sleep(0.1)
            if served.done.is_set():
                break
            await setup.client.send(bytes([byte]))
        assert await served.wait() is None
    assert served.ended_at - opened == pytest.approx(KEEP_ALIVE)
    assert setup.endpoint.calls == []


async def test_a_hand_back_keeps_the_idle_time_of_the_connection(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """A request for Hypercorn whose head starts arriving while the connection
    is idle keeps the deadline counted from the start of that idle time."""
    served = await one_answered(setup)
    answered_at = trio.current_time()
    with trio.fail_after(LIMIT):
        await trio.sleep(KEEP_ALIVE * 0.5)
        await setup.client.send(b"GET /health HTTP/1.1\r\n")
        assert await served.wait() == b"GET /health HTTP/1.1\r\n"
    assert served.handed_idle_since == pytest.approx(answered_at, abs=0.01)


# -- Expect: 100-continue ----------------------------------------------------------------


async def test_expect_100_continue_gets_continue_before_the_body(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    body = b'{"content": "big"}'
    request = ask(body, extra=b"Expect: 100-continue\r\n")
    setup.start(head_of(request))
    with trio.fail_after(LIMIT):
        assert await setup.client.read_exactly(len(CONTINUE)) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert await setup.client.silent_for(1)
        assert setup.endpoint.calls == []
        await setup.client.send(body)
        assert_answer(await setup.client.response(), 0, body)
        # Only when it waits: the next request's body comes with its head.
        await setup.client.send(ask(b"with it", extra=b"Expect: 100-continue\r\n"))
        assert_answer(await setup.client.response(), 1, b"with it")


async def test_expect_100_continue_with_part_of_the_body_gets_continue(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    body = b'{"content": "partly"}'
    request = ask(body, extra=b"EXPECT: 100-Continue\r\n")
    setup.start(request[:-5])
    with trio.fail_after(LIMIT):
        assert await setup.client.read_exactly(len(CONTINUE)) == CONTINUE
        await setup.client.send(request[-5:])
        assert_answer(await setup.client.response(), 0, body)


async def test_no_continue_when_the_body_came_with_the_head(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    request = ask(b"all here", extra=b"Expect: 100-continue\r\nConnection: close\r\n")
    served = setup.start(request)
    assert await served.wait() is None
    rest = await setup.written_after_end()
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"100 Continue" not in rest


async def test_no_continue_for_an_empty_body(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = setup.start(ask(b"", extra=b"Expect: 100-continue\r\nConnection: close\r\n"))
    assert await served.wait() is None
    rest = await setup.written_after_end()
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert setup.endpoint.calls[0].body == b""


# -- a client that goes away -------------------------------------------------------------


async def test_a_client_that_leaves_during_its_answer_has_it_cancelled(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    setup.endpoint.hold(0)  # never released
    served = setup.start(ask(b"abandoned"))
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        await setup.client.stream.send_eof()  # the client's side closes
    assert await served.wait() is None
    (call,) = setup.endpoint.calls
    assert call.cancelled and not call.finished
    assert await setup.written_after_end() == b""


async def test_a_client_that_closes_entirely_has_its_answer_cancelled(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    setup.endpoint.hold(0)
    served = setup.start(ask(b"abandoned"))
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        await setup.client.stream.aclose()
    assert await served.wait() is None
    assert setup.endpoint.calls[0].cancelled


async def test_a_client_that_leaves_mid_body_ends_the_connection(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    started = trio.current_time()
    served = setup.start(ask(b'{"content": "cut"}')[:-3])
    with trio.fail_after(LIMIT):
        await ends_when_the_client_leaves(setup, served)
    assert served.ended_at == started  # at once, not at the timeout
    assert setup.endpoint.calls == []


async def test_a_client_that_leaves_after_its_answer_ends_the_connection(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    served = await one_answered(setup)
    with trio.fail_after(LIMIT):
        answered_at = trio.current_time()
        await ends_when_the_client_leaves(setup, served)
    assert served.ended_at == answered_at  # at once
    assert not setup.endpoint.calls[0].cancelled


# -- an answer that fails ----------------------------------------------------------------


async def test_an_answer_that_raises_gives_500_and_closes(
    setup: Setup, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    setup.endpoint.error = RuntimeError("the endpoint broke")
    caplog.set_level(logging.ERROR, logger="relayd.api")
    served = setup.start(ask(b"boom") + ask(b"never served"))
    assert await served.wait() is None
    with trio.fail_after(LIMIT):
        response = await setup.client.response()
    assert response.status_line == b"HTTP/1.1 500 Internal Server Error"
    assert response.body == INTERNAL_ERROR
    assert response.json() == {"error": "internal error; see the relayd log"}
    assert response.header(b"connection") == b"close"
    assert response.header(b"content-type") == b"application/json"
    assert await setup.written_after_end() == b""
    assert len(setup.endpoint.calls) == 1
    records = [r for r in caplog.records if r.name == "relayd.api"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "unhandled error on POST /api/ask")
    ]
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


async def test_a_cancelled_answer_is_not_logged_as_an_error(
    setup: Setup, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    setup.endpoint.hold(0)
    served = setup.start(ask(b"abandoned"))
    with trio.fail_after(LIMIT):
        await setup.endpoint.wait_for_calls(1)
        await ends_when_the_client_leaves(setup, served)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- a client that does not read ---------------------------------------------------------


async def test_a_client_that_never_reads_loses_the_connection_by_the_write_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, client = trio.testing.lockstep_stream_pair()  # a write waits for a read
    endpoint = FakeEndpoint()
    terms = ConnectionTerms(
        WriteLimits(), keep_alive_timeout=KEEP_ALIVE, stopping=lambda: False, idle_since=0.0
    )
    connection = AskConnection(cast(AskEndpoint, endpoint), server, CLIENT, terms, HttpDate())
    started = trio.current_time()
    with trio.fail_after(LIMIT):
        assert await connection.run(ask(b"unread")) is None
    assert trio.current_time() - started == pytest.approx(WRITE_TIMEOUT)
    assert len(endpoint.calls) == 1
    await trio.aclose_forcefully(client)
