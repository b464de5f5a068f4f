"""``POST /api/ask`` clients served straight over their socket, without Hypercorn.

Through Hypercorn, each request passed h11's state machine, a stream object,
ASGI message dicts and an app task with its queue: together about half of
relayd's CPU per request, on the path of every request (``relayd bench``
profiles: docs/performance.md). A connection whose
first request is a plain ``POST /api/ask`` (:func:`relayd.front.http1.parse_ask_head`)
is served here instead: its task reads and parses requests, and each answer
is worked out by :meth:`relayd.ask.AskEndpoint.answer`, the same code as on
Hypercorn's path, in a task of its own.

That second task lets the connection's task keep reading while an agent
works, so that a client who disconnects has its request cancelled at once
(as ``relayd.front.server`` does for Hypercorn's connections), and its
place in the queue freed. A request that arrives before the previous answer
(HTTP pipelining) waits for it; answers go out in order.

What Hypercorn did and this does too: keep-alive, with the idle allowance of
``server.idle_timeout`` between requests (a request head must be complete
within it); ``Connection: close``; ``Expect: 100-continue`` (curl sends it for
larger bodies); a ``Date`` header; ``Connection: close`` on every answer once
shutdown has begun; bounded writes (:class:`~relayd.front.sockets.WriteLimits`).
A request body that stops arriving for ``server.idle_timeout`` is answered
408 and the connection closed (as AskEndpoint does on Hypercorn's path).

The first request on the connection that is not a plain ``POST /api/ask``
(another route, a chunked body, a body over ``server.max_body``, anything
unusual) hands the connection back to Hypercorn with every byte unread, and
Hypercorn serves it from then on, exactly as it would have from the start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Mapping
from typing import Literal

import trio

from relayd.ask import DISCARD_WAIT, Caller, ClientGone, HttpReply, JsonEndpoint
from relayd.errors import RelayError
from relayd.front.http1 import (
    CONTINUE,
    AskHead,
    HttpDate,
    NotPlainAsk,
    chunk,
    event_stream_head,
    may_be_ask,
    parse_ask_head,
    response_bytes,
)
from relayd.front.sockets import RECEIVE_SIZE, ConnectionTerms, HandBack, read_some
from relayd.web import error_body

__all__ = ["AskConnection", "AskWire"]

log = logging.getLogger("relayd.api")


class AskWire:
    """The :class:`~relayd.front.sockets.Takeover` for ``/api/ask`` clients."""

    def __init__(self, endpoints: Mapping[str, JsonEndpoint]) -> None:
        self._endpoints = endpoints  # by route (see relayd.front.http1.REQUEST_LINES)
        self._endpoint = next(iter(endpoints.values()))  # they share max_body
        self._date = HttpDate()

    def might_serve(self, first_bytes: bytes) -> bool:
        return may_be_ask(first_bytes)

    def server_for(
        self,
        head: bytes,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        terms: ConnectionTerms,
    ) -> Awaitable[HandBack | None] | None:
        try:
            parse_ask_head(head, self._endpoint.max_body)
        except NotPlainAsk:
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection served on the wire path: remote=%s", _remote(client))
        return AskConnection(self._endpoints, stream, client, terms, self._date).run(head)


class AskConnection:
    """One client's keep-alive connection, from its first ``POST /api/ask``."""

    __slots__ = (
        "_address",
        "_answered",
        "_client",
        "_date",
        "_drained",
        "_endpoint",
        "_endpoints",
        "_idle_since",
        "_inbox",
        "_over",
        "_peer",
        "_read_scope",
        "_request_scope",
        "_stream",
        "_terms",
    )

    def __init__(
        self,
        endpoints: Mapping[str, JsonEndpoint] | JsonEndpoint,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        terms: ConnectionTerms,
        date: HttpDate,
    ) -> None:
        if not isinstance(endpoints, Mapping):  # one route (the unit tests)
            endpoints = {"/api/ask": endpoints}
        self._endpoints: Mapping[str, JsonEndpoint] = endpoints
        # The route of the request under way (they share max_body and the timeouts).
        self._endpoint: JsonEndpoint = endpoints["/api/ask"]
        self._stream = stream
        self._client = client
        self._peer = client[0] if client else "unix"
        self._address = self._peer  # the request's client (see client_address)
        self._terms = terms
        self._date = date
        self._inbox = bytearray()  # read and not yet served
        self._drained = False  # the last read took all there was (see read_some)
        self._idle_since = terms.idle_since
        self._read_scope: trio.CancelScope | None = None  # while the connection's task reads
        self._request_scope: trio.CancelScope | None = None  # while a request is answered
        self._answered: trio.Event | None = None  # a pipelined request waits on this
        self._over = False  # no more requests on this connection

    async def run(self, head: bytes) -> HandBack | None:
        """Serve requests until the connection ends (None) or has one for
        Hypercorn (the bytes not served)."""
        self._inbox += head
        async with trio.open_nursery() as nursery:
            return await self._serve(nursery)

    async def _serve(self, nursery: trio.Nursery) -> HandBack | None:
        while not self._over:
            head = await self._next_head()
            if head is None:
                return None
            if not isinstance(head, AskHead):
                log.debug("connection handed to Hypercorn: remote=%s", _remote(self._client))
                return HandBack(head, self._idle_since)
            self._endpoint = self._endpoints[head.path]
            self._address = self._endpoint.client_address(self._peer, head.forwarded_for)
            caller: Caller | None = None
            if len(self._inbox) < head.end:
                # The body is still on its way: check the credentials first, as
                # Hypercorn's path does, so that a failure is counted even if the
                # body never comes, and a refused body is only dropped.
                try:
                    caller = self._endpoint.caller(head.authorization, self._address)
                except RelayError as error:
                    await self._refuse(head, self._endpoint.failure(error))
                    continue
            arrival = await self._receive_body(head, self._endpoint.body_deadline)
            if arrival in ("stalled", "late"):
                endpoint = self._endpoint
                timeout = endpoint.stalled() if arrival == "stalled" else endpoint.late()
                reply = endpoint.failure(timeout, caller.log_id if caller else "-")
                await self._write(self._response(reply, close=True))
            if arrival != "whole":
                return None
            body = bytes(self._inbox[head.body_start : head.end])
            del self._inbox[: head.end]
            self._request_scope = trio.CancelScope()
            nursery.start_soon(self._answer, head, body, caller, self._request_scope)
            await self._watch()
        return None

    async def _next_head(self) -> AskHead | bytes | None:
        """The next request's head; the bytes to hand to Hypercorn if it is not
        a plain ``POST /api/ask``; None if the client left or stayed idle too long."""
        while True:
            try:
                head = parse_ask_head(self._inbox, self._endpoint.max_body)
            except NotPlainAsk:
                return bytes(self._inbox)
            if head is not None:
                return head
            life = self._terms.life
            if not self._inbox:  # nothing of a next request yet: SIGTERM may close it
                life.idle(self._end_idle_read)
            try:
                data = await self._read(self._idle_since + self._terms.keep_alive_timeout)
            finally:
                life.busy(self._end_idle_read)
            if not data:
                return None
            self._inbox += data

    async def _receive_body(
        self, head: AskHead, allowance: float
    ) -> Literal["whole", "gone", "stalled", "late"]:
        """Read until the inbox holds the whole body: "gone" if the client left
        first, "stalled" if the body stopped arriving for ``server.idle_timeout``,
        "late" if it was not whole within ``allowance`` seconds from now."""
        deadline = trio.current_time() + allowance
        waiting = len(self._inbox) < head.end
        if waiting and head.expects_continue and not await self._write(CONTINUE):
            return "gone"
        while len(self._inbox) < head.end:
            now = trio.current_time()
            data = await self._read(min(deadline, now + self._endpoint.body_timeout))
            if data is None:
                return "late" if trio.current_time() >= deadline else "stalled"
            if not data:
                return "gone"
            self._inbox += data
        return "whole"

    async def _refuse(self, head: AskHead, reply: HttpReply) -> None:
        """Answer a request refused before its body has all come.

        The body is read and dropped first, for at most
        :data:`~relayd.ask.DISCARD_WAIT` in all (as on Hypercorn's path): if it
        comes, the answer keeps the connection; if not, the answer says
        ``Connection: close`` and the connection ends (an answer that promised
        keep-alive before the connection ended under it left the client
        sending its next request into a closed socket). A client that waits
        for 100 Continue, or that asked to close, is answered at once with
        ``Connection: close``; then, unless it waits for 100 Continue, its body
        is read and dropped for the same allowance (a lingering close, so that
        a client writing its body before reading sees the answer, not a reset).
        """
        at_once = head.expects_continue or not head.keep_alive or self._terms.stopping()
        whole = not at_once and await self._receive_body(head, DISCARD_WAIT) == "whole"
        whole = whole and not self._terms.stopping()  # SIGTERM came while it waited
        written = await self._write(self._response(reply, close=not whole))
        if written and whole:
            del self._inbox[: head.end]
            self._idle_since = trio.current_time()
            return
        if written and at_once and not head.expects_continue:
            await self._receive_body(head, DISCARD_WAIT)
        self._over = True

    async def _watch(self) -> None:
        """Read while the request is answered: a client that goes away has its
        request cancelled; a request sent before the answer waits for it."""
        if not self._inbox:  # else the next request is here already: no need to read
            try:
                data = await self._read(math.inf)  # the answer sets the idle deadline, or cancels
            finally:
                self._terms.life.busy(self._end_idle_read)
            if data is None:  # closed after the answer, or idle too long since
                self._over = True
                return
            if not data:
                self._over = True
                if self._request_scope is not None:
                    self._request_scope.cancel()
                return
            self._inbox += data
        if self._request_scope is not None:
            self._answered = trio.Event()
            await self._answered.wait()
            self._answered = None

    async def _answer(
        self, head: AskHead, body: bytes, caller: Caller | None, scope: trio.CancelScope
    ) -> None:
        reply: HttpReply | None = None
        sink = _WireSink(self, close=not head.keep_alive or self._terms.stopping())
        with scope:
            try:
                reply = await self._endpoint.answer(
                    head.authorization,
                    self._address,
                    body,
                    caller=caller,
                    event_stream=head.event_stream,
                    sink=sink,
                    idempotency_key=head.idempotency_key,
                )
            except ClientGone:
                sink.ok = False
            except Exception:  # isolation boundary: one request
                log.exception("unhandled error on POST /api/ask")
                if sink.started:  # the head went out: the stream can only be cut
                    sink.ok = False
                else:
                    reply = HttpReply(500, error_body("internal error; see the relayd log"), [])
                self._over = True
        if reply is None and not sink.started:  # cancelled: the client has gone
            return
        if reply is None:  # streamed through the sink
            close = sink.close or not sink.ok
            written = sink.ok
        else:
            close = self._over or not head.keep_alive or self._terms.stopping()
            written = await self._write(self._response(reply, close=close))
        self._request_scope = None
        self._idle_since = trio.current_time()
        if close or not written:
            self._over = True
            if self._read_scope is not None:
                self._read_scope.cancel()
        elif self._read_scope is not None:
            self._read_scope.deadline = self._idle_since + self._terms.keep_alive_timeout
            # Idle now, its read still going: closed at SIGTERM (see Lifecycle).
            self._terms.life.idle(self._end_idle_read)
        if self._answered is not None:
            self._answered.set()

    def _end_idle_read(self) -> None:
        """At SIGTERM: with no request under way or arriving, the connection ends."""
        if not self._inbox and self._request_scope is None and self._read_scope is not None:
            self._over = True
            self._read_scope.cancel()

    def _response(self, reply: HttpReply, *, close: bool) -> bytes:
        date = self._date.now()
        return response_bytes(reply.status, reply.body, date, reply.headers, close=close)

    async def _write(self, data: bytes) -> bool:
        # One writer at a time: the connection's task writes only while no
        # request is answered.
        return await self._terms.writes.write(self._stream, data)

    async def _read(self, deadline: float) -> bytes | None:
        """The client's next bytes: b"" once it has gone, None if the wait was
        cut short (the deadline passed, or the connection is over)."""
        data = b""
        with trio.CancelScope(deadline=deadline) as scope:
            self._read_scope = scope
            try:
                data = await read_some(self._stream, RECEIVE_SIZE, drained=self._drained)
            finally:
                self._read_scope = None
        if scope.cancelled_caught:
            return None
        self._drained = 0 < len(data) < RECEIVE_SIZE
        return data


def _remote(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix"


class _WireSink:
    """A streamed answer on the wire path: the head, then chunks (see relayd.ask)."""

    __slots__ = ("_connection", "close", "ok", "started")

    def __init__(self, connection: AskConnection, *, close: bool) -> None:
        self._connection = connection
        self.close = close  # decided when the head goes out: it says so
        self.started = False
        self.ok = True  # every write went through

    async def start(self) -> bool:
        self.started = True
        connection = self._connection
        self.close = self.close or connection._terms.stopping()
        head = event_stream_head(connection._date.now(), close=self.close)
        return await self._put(head)

    async def write(self, data: bytes) -> bool:
        return await self._put(chunk(data))

    async def end(self, last: bytes = b"") -> None:
        await self._put((chunk(last) if last else b"") + chunk(b""))

    async def _put(self, data: bytes) -> bool:
        self.ok = self.ok and await self._connection._write(data)
        return self.ok
