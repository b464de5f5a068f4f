"""``POST /api/ask``: the relay's hot path.

Every client request passes here, so it skips Quart's request and response
machinery (a measured share of the relay's CPU; see docs/performance.md).
:meth:`AskEndpoint.answer` does the work for both ways a request arrives:
usually on the wire path (:mod:`relayd.front.ask_wire`, no Hypercorn at all),
otherwise through Hypercorn, with the endpoint called as a bare ASGI
application. Either way it keeps the API's contract: the body is JSON
whatever the Content-Type, every error is ``{"error": ...}`` with the status
of :data:`relayd.web.STATUS`, credentials go through the same
:class:`~relayd.web.Gate` as the Quart routes.

When the client disconnects, its request is cancelled at once (by the wire
path's connection task, or by the server loop in ``relayd.front.server``),
so an abandoned request frees its place in the queue and its socket without a
watcher task per request (which cost 15 % of the relay's CPU per request,
measured with ``relayd bench``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from relayd.asgi import Message, Receive, Scope, Send
from relayd.dispatch import Answer, Question
from relayd.errors import (
    BadRequest,
    PayloadTooLarge,
    RelayError,
    RequestTimeout,
    Unprocessable,
    body_late,
    retry_after_header,
)
from relayd.idempotency import Recorded, body_hash, key_problem
from relayd.state import RelayState
from relayd.users import User
from relayd.web import Caller, Gate, error_body, optional_string, parse_json_object, status_of

__all__ = [
    "AskEndpoint",
    "Asked",
    "Caller",
    "ClientGone",
    "HttpReply",
    "JsonEndpoint",
    "StreamSink",
    "accepts_event_stream",
    "sse_event",
]

log = logging.getLogger("relayd.api")

_JSON = (b"content-type", b"application/json")
# How long a refusal waits for the body it came before (see _discard_body).
DISCARD_WAIT = 2.0


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An answer to ``/api/ask``: status, JSON body, headers beyond the usual."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


BodySource = bytes | Callable[[], Awaitable[bytes]]


@dataclass(slots=True)
class Asked:
    """Who asks, for the log line of a failure."""

    user: User | None
    user_id: str
    conversation_id: str = "-"


class JsonEndpoint:
    """A route that takes a JSON question and answers with an agent's answer:
    ``/api/ask`` (:class:`AskEndpoint`) and ``/v1/chat/completions``
    (:class:`relayd.openai_api.ChatCompletionsEndpoint`).

    :meth:`answer` serves both the wire path (:mod:`relayd.front.ask_wire`) and,
    called as an ASGI application, Hypercorn's. A subclass says how a
    question is read and answered (:meth:`respond`) and what an error looks
    like (:meth:`error_body`).
    """

    path = "/"

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self._gate = Gate(state)

    def error_body(self, error: RelayError, status: int) -> bytes:
        return error_body(error.message)

    async def respond(
        self,
        document: dict[str, Any],
        asked: Asked,
        *,
        event_stream: bool,
        sink: StreamSink | None,
    ) -> HttpReply | None:
        """Answer the question in ``document``: a :class:`HttpReply`, or None once
        it was streamed through ``sink``. Raises RelayError before the first
        byte of a stream; after it, ends the stream with an error itself."""
        raise NotImplementedError

    async def ask_streaming(
        self, question: Question, stream: AnswerStream, asked: Asked
    ) -> Answer | None:
        """Ask with the answer's pieces going to ``stream``: the answer, or None
        if it failed after the stream began (then the stream ended with the
        error, which is logged). Before that, a failure is raised as usual."""
        try:
            return await self._state.dispatcher.ask(question, stream.piece)
        except RelayError as error:
            if not stream.started:
                raise
            self.failure(error, asked.user_id, asked.conversation_id)  # logged
            await stream.fail(error)
            return None

    @property
    def max_body(self) -> int:
        return self._state.config.server.max_body

    @property
    def body_timeout(self) -> float:
        """How long a request body may stop arriving before the request fails (408)."""
        return self._state.config.server.idle_timeout

    @property
    def body_deadline(self) -> float:
        """How long, from its head, a request body may take to arrive whole (408)."""
        return self._state.config.server.body_timeout

    def late(self) -> RequestTimeout:
        return RequestTimeout(body_late(self.body_deadline))

    def client_address(self, peer: str, forwarded_for: tuple[bytes, ...]) -> str:
        """The client's address: ``peer``, or the one a trusted proxy forwarded."""
        if not forwarded_for:
            return peer
        return self._state.proxies.client(peer, forwarded_for)

    def caller(self, authorization: str | None, address: str) -> Caller:
        """Check the credentials; raises RelayError (401, 429)."""
        return self._gate.user(authorization, address, self.path)

    def stalled(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request body stopped arriving for server.idle_timeout ({self.body_timeout:g} s)"
        )

    def failure(
        self, error: RelayError, user_id: str = "-", conversation_id: str = "-"
    ) -> HttpReply:
        """The answer to a request that failed with ``error``, logged."""
        status = status_of(error)
        log.info(
            "request failed: status=%d reason=%s user=%s conversation=%s",
            status,
            error.message,
            user_id,
            conversation_id,
        )
        extra = []
        if error.retry_after is not None:
            extra.append((b"retry-after", retry_after_header(error.retry_after).encode()))
        return HttpReply(status, self.error_body(error, status), extra)

    async def answer(
        self,
        authorization: str | None,
        address: str,
        body: BodySource,
        *,
        caller: Caller | None = None,
        event_stream: bool = False,
        sink: StreamSink | None = None,
        idempotency_key: str | None = None,
    ) -> HttpReply | None:
        """Check the credentials (unless ``caller`` says they passed already),
        read ``body`` (bytes, or a reader called once the credentials pass), ask
        an agent and say what to answer.

        A question with ``"stream": true`` (or ``event_stream``: the client's
        ``Accept`` names ``text/event-stream``) is answered through ``sink`` as
        server-sent events, and None is returned once it is; errors before the
        first byte are still a :class:`HttpReply` with their status. With an
        ``idempotency_key``, a retry gets the first answer (relayd.idempotency).

        Raises :class:`ClientGone` when the reader finds the client gone.
        """
        asked = Asked(None, "-")
        # False in the finally below: cancelled, or ClientGone (the client went away)
        settled = False
        try:
            asked.user, asked.user_id = caller or self.caller(authorization, address)
            if idempotency_key is not None and (problem := key_problem(idempotency_key)):
                raise BadRequest(problem)
            raw = body if isinstance(body, bytes) else await body()
            document = parse_json_object(raw)
            if idempotency_key is None:
                reply = await self.respond(document, asked, event_stream=event_stream, sink=sink)
            else:
                reply = await self._once(
                    idempotency_key, raw, document, asked, event_stream=event_stream, sink=sink
                )
            settled = True
        except RelayError as error:
            settled = True
            return self.failure(error, asked.user_id, asked.conversation_id)
        finally:
            if not settled:
                log.debug("client went away, request abandoned: user=%s", asked.user_id)
        return reply

    async def _once(
        self,
        key: str,
        raw: bytes,
        document: dict[str, Any],
        asked: Asked,
        *,
        event_stream: bool,
        sink: StreamSink | None,
    ) -> HttpReply | None:
        """:meth:`respond`, or the answer an earlier request with ``key`` got."""
        store = self._state.idempotency
        digest = body_hash(raw)
        while True:
            earlier = store.get(asked.user_id, key, trio.current_time())
            if earlier is None:
                break
            if earlier.body_hash != digest:
                raise Unprocessable("this Idempotency-Key was used with a different request body")
            await earlier.done.wait()  # the first request, still running; its deadline
            if earlier.recorded is not None:
                log.info("answer replayed for Idempotency-Key: user=%s", asked.user_id)
                return await _replay(earlier.recorded, sink)
            # The first one failed or was abandoned: this one runs the question.
        entry = store.start(asked.user_id, key, digest, trio.current_time())
        recording = _RecordingSink(sink) if sink is not None else None
        recorded: Recorded | None = None
        try:
            reply = await self.respond(document, asked, event_stream=event_stream, sink=recording)
            if reply is None:
                if recording is not None and recording.complete:
                    recorded = Recorded(200, (), bytes(recording.data), streamed=True)
            elif reply.status == 200:
                recorded = Recorded(200, tuple(reply.headers), reply.body, streamed=False)
            return reply
        finally:
            store.finish(entry, recorded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application (HTTP scopes only)."""
        if scope["method"] != "POST":
            error = BadRequest(f"method {scope['method']} not allowed on {self.path}")
            body = self.error_body(error, 405)
            await _respond(send, HttpReply(405, body, [(b"allow", b"POST")]))
            return
        client = scope.get("client")
        authorization = None
        declared: int | None = None
        event_stream = False
        idempotency_key: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == b"accept":
                event_stream |= accepts_event_stream(value)
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
        body_wanted = False

        def read_body() -> Awaitable[bytes]:
            nonlocal body_wanted
            body_wanted = True
            return self._read_body(receive, declared)

        try:
            reply = await self.answer(
                authorization,
                client[0] if client else "unix",
                read_body,
                event_stream=event_stream,
                sink=_AsgiSink(send),
                idempotency_key=idempotency_key,
            )
        except ClientGone:
            return
        if reply is None:
            return  # streamed
        if not body_wanted:  # refused before its body: read it, to keep the connection
            await self._discard_body(receive, declared)
        await _respond(send, reply)

    async def _read_body(self, receive: Receive, declared: int | None) -> bytes:
        limit = self.max_body
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body larger than server.max_body ({limit} bytes)")
        chunks = []
        size = 0
        deadline = trio.current_time() + self.body_deadline
        while True:
            message: Message | None = None
            with trio.move_on_at(min(deadline, trio.current_time() + self.body_timeout)):
                message = await receive()
            if message is None:
                raise self.late() if trio.current_time() >= deadline else self.stalled()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body larger than server.max_body ({limit} bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _discard_body(self, receive: Receive, declared: int | None) -> None:
        """Read and drop a body that a refusal (401, 429) came before.

        Hypercorn keeps a connection alive only if the request was read to its
        end when the response ends; otherwise it closes it, and a keep-alive
        client that has already sent its next request sees the connection drop
        without an answer. So the body is read first, chunked or of a declared
        length, up to ``server.max_body`` and for at most :data:`DISCARD_WAIT`;
        a body declared larger is left. If it was not read to its end, the
        answer says ``Connection: close`` (relayd.front.server) and the
        connection closes after it.
        """
        if declared is not None and declared > self.max_body:
            return
        with trio.move_on_after(DISCARD_WAIT), contextlib.suppress(ClientGone, RelayError):
            await self._read_body(receive, declared)


class AskEndpoint(JsonEndpoint):
    """``POST /api/ask``: the seed's question, answered whole or streamed."""

    path = "/api/ask"

    async def respond(
        self,
        document: dict[str, Any],
        asked: Asked,
        *,
        event_stream: bool,
        sink: StreamSink | None,
    ) -> HttpReply | None:
        question = self._question(document, asked.user_id, is_admin=asked.user is None)
        asked.conversation_id = question.conversation_id or "-"
        if sink is None or not _wants_stream(document, event_stream):
            answer = await self._state.dispatcher.ask(question)
            return HttpReply(200, json.dumps(_answer_document(answer)).encode(), [])
        streamer = _EventStream(sink)
        streamed = await self.ask_streaming(question, streamer, asked)
        if streamed is not None:
            document = _answer_document(streamed)
            await streamer.finish(streamed.content, document, whole=not streamed.streamed)
        return None

    def _question(self, document: dict[str, object], user_id: str, *, is_admin: bool) -> Question:
        content = document.get("content")
        if not isinstance(content, str) or not content:
            raise BadRequest("content must be a non-empty string")
        limit = self._state.config.requests.max_content
        # A str of n characters encodes to at most 4n bytes: encode only when it may matter.
        if len(content) * 4 > limit and len(content.encode("utf-8", "surrogatepass")) > limit:
            raise PayloadTooLarge(f"content is larger than requests.max_content ({limit} bytes)")
        return Question(
            content=content,
            user_id=user_id,
            conversation_id=optional_string(document, "conversation_id"),
            parent_id=optional_string(document, "parent_id"),
            is_admin=is_admin,
            model=optional_string(document, "model"),
        )


def _answer_document(answer: Answer) -> dict[str, str]:
    return {
        "id": answer.id,
        "response_id": answer.response_id,
        "conversation_id": answer.conversation_id,
        "content": answer.content,
        "error": "",
    }


async def _respond(send: Send, reply: HttpReply) -> None:
    headers = [_JSON, (b"content-length", str(len(reply.body)).encode()), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


# -- streamed answers (server-sent events) ---------------------------------------------


class StreamSink(Protocol):
    """Where a streamed answer goes: the wire path's socket, or Hypercorn's ASGI send."""

    async def start(self) -> bool:
        """Send the ``200`` head of a ``text/event-stream``; False if the client is gone."""

    async def write(self, data: bytes) -> bool:
        """Send some of the stream; False if the client is gone."""

    async def end(self, last: bytes = b"") -> None:
        """Send ``last`` and end the stream (the response is complete), in one go."""


def accepts_event_stream(accept: bytes) -> bool:
    """Whether an ``Accept`` header asks for ``text/event-stream``."""
    return b"text/event-stream" in accept.lower()


def _wants_stream(document: dict[str, object], event_stream: bool) -> bool:
    stream = document.get("stream")
    if stream is None:
        return event_stream
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    return stream


def sse_event(kind: str, document: object) -> bytes:
    """One server-sent event: ``event: KIND`` and its JSON ``data``, one line each."""
    return b"event: " + kind.encode("ascii") + b"\ndata: " + json.dumps(document).encode() + b"\n\n"


class AnswerStream:
    """An answer streamed through a :class:`StreamSink`: the head goes out with
    the first piece, so that an error before it keeps its status. Subclasses
    say how a piece, the end and an error look (:mod:`relayd.ask`'s events,
    OpenAI's chunks)."""

    __slots__ = ("_sink", "started")

    def __init__(self, sink: StreamSink) -> None:
        self._sink = sink
        self.started = False

    def opening(self) -> bytes:
        """What goes out before the first piece (nothing, by default)."""
        return b""

    def piece_bytes(self, text: str) -> bytes:
        raise NotImplementedError

    def error_bytes(self, error: RelayError) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            if not await self._sink.start():
                raise ClientGone()
            data = self.opening() + data
        if not await self._sink.write(data):
            raise ClientGone()

    async def piece(self, text: str) -> None:
        await self.send(self.piece_bytes(text))

    async def end(self, closing: bytes) -> None:
        """The last bytes and the end of the stream in one write: a client that
        stops reading at the last event (OpenAI's SDK at [DONE]) still finds
        the response complete, and can reuse the connection."""
        if not self.started:
            await self.send(b"")
        await self._sink.end(closing)

    async def fail(self, error: RelayError) -> None:
        """End a stream that has begun with an error (never a silent cut)."""
        with contextlib.suppress(ClientGone):
            await self.end(self.error_bytes(error))


class _EventStream(AnswerStream):
    """An ``/api/ask`` answer as server-sent events: ``delta`` for each piece,
    then ``done`` (the non-streaming answer's JSON) or ``error``."""

    __slots__ = ()

    def piece_bytes(self, text: str) -> bytes:
        return sse_event("delta", {"content": text})

    def error_bytes(self, error: RelayError) -> bytes:
        return sse_event("error", {"error": error.message})

    async def finish(self, content: str, document: dict[str, str], *, whole: bool) -> None:
        """The ``done`` event; ``whole``: the answer came in one piece (a v1 agent's),
        which goes out as one ``delta`` first."""
        if whole:
            await self.piece(content)
        await self.end(sse_event("done", document))


_EVENT_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
]


class _AsgiSink:
    """A stream through Hypercorn: no Content-Length, so h11 sends it chunked."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def start(self) -> bool:
        await self._send(
            {"type": "http.response.start", "status": 200, "headers": _EVENT_STREAM_HEADERS}
        )
        return True

    async def write(self, data: bytes) -> bool:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})
        return True

    async def end(self, last: bytes = b"") -> None:
        await self._send({"type": "http.response.body", "body": last, "more_body": False})


class _RecordingSink:
    """A sink that keeps what it passes on, for Idempotency-Key replays."""

    __slots__ = ("_sink", "complete", "data")

    def __init__(self, sink: StreamSink) -> None:
        self._sink = sink
        self.data = bytearray()
        self.complete = False  # end() was reached: the stream is whole

    async def start(self) -> bool:
        return await self._sink.start()

    async def write(self, data: bytes) -> bool:
        self.data += data
        return await self._sink.write(data)

    async def end(self, last: bytes = b"") -> None:
        self.data += last
        self.complete = True
        await self._sink.end(last)


async def _replay(recorded: Recorded, sink: StreamSink | None) -> HttpReply | None:
    """The answer a first request got, again."""
    if not recorded.streamed:
        return HttpReply(recorded.status, recorded.body, list(recorded.headers))
    if sink is None:
        raise BadRequest("this Idempotency-Key's answer was streamed")
    if not await sink.start():
        raise ClientGone()
    await sink.end(recorded.body)
    return None
