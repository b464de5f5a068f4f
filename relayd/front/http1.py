"""HTTP/1.1 for ``POST /api/ask`` on the wire path, without I/O.

Every client request is a ``POST /api/ask``, and relayd serves a connection
that starts with one on its own loop (:mod:`relayd.front.ask_wire`) rather than
through Hypercorn, whose per-request machinery (h11's state machine, a stream
object, ASGI message dicts, a queue) was about half of the relay's CPU per
request. Like :mod:`relayd.front.agent_upgrade`, this module need only be right
about what it accepts: a request head it does not recognise as plain and
well-formed raises :class:`NotPlainAsk`, and the connection goes to Hypercorn
with every byte unread, to be answered exactly as it always was.

Plain means: the request line is exactly ``POST /api/ask HTTP/1.1``; every
header line is ``token: value`` with no control characters and no folding;
exactly one ``Host``; exactly one ``Content-Length`` (digits only) within
``server.max_body``; no ``Transfer-Encoding`` and no ``Upgrade``; ``Expect``,
if present, is ``100-continue``; the head is at most :data:`MAX_HEAD` bytes.

Sans-I/O: importing this module loads neither Trio nor Hypercorn
(tests/test_http1.py checks).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

__all__ = [
    "ASK_REQUEST_LINE",
    "CHAT_REQUEST_LINE",
    "CONTINUE",
    "MAX_HEAD",
    "REQUEST_LINES",
    "AskHead",
    "HttpDate",
    "NotPlainAsk",
    "chunk",
    "event_stream_head",
    "may_be_ask",
    "parse_ask_head",
    "response_bytes",
    "says_close",
]

# Longest request head read for a Takeover to decide on (h11's and Hypercorn's
# limit on an incomplete request).
MAX_HEAD = 16 * 1024
ASK_REQUEST_LINE = b"POST /api/ask HTTP/1.1\r\n"
CHAT_REQUEST_LINE = b"POST /v1/chat/completions HTTP/1.1\r\n"
# The request lines served on the wire path, and the route each one is.
REQUEST_LINES = {
    ASK_REQUEST_LINE: "/api/ask",
    CHAT_REQUEST_LINE: "/v1/chat/completions",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Digits of the largest Content-Length parsed here (server.max_body is at most 1 GiB).
_MAX_LENGTH_DIGITS = 18
# Control characters other than horizontal tab: never in a field value (RFC 9110, 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DECLINED = frozenset((b"transfer-encoding", b"upgrade"))
_BARE_LF = re.compile(rb"(?<!\r)\n")


class NotPlainAsk(Exception):
    """A request for Hypercorn to parse and answer."""


@dataclass(frozen=True, slots=True)
class AskHead:
    """A plain ``POST /api/ask`` request head."""

    authorization: str | None  # the last Authorization header, as ASGI's last one wins
    body_start: int  # offset of the body in the buffer parsed
    body_length: int
    keep_alive: bool  # False when the client sent ``Connection: close``
    expects_continue: bool  # ``Expect: 100-continue``
    event_stream: bool = False  # ``Accept`` names ``text/event-stream``
    path: str = "/api/ask"  # which of REQUEST_LINES
    forwarded_for: tuple[bytes, ...] = ()  # X-Forwarded-For values, in order
    idempotency_key: str | None = None  # the last Idempotency-Key header

    @property
    def end(self) -> int:
        """Offset just past the body: where the next request starts."""
        return self.body_start + self.body_length


def may_be_ask(first_bytes: bytes) -> bool:
    """Whether a connection's first bytes are worth reading the whole head for."""
    return first_bytes.startswith(_ALL_LINES)


_ALL_LINES = tuple(REQUEST_LINES)


def _request_line(buffer: bytes | bytearray) -> bytes | None:
    """The one of :data:`REQUEST_LINES` that ``buffer`` starts with; None if it may
    still become one (too short to tell); NotPlainAsk if it cannot."""
    for line in _ALL_LINES:
        if buffer.startswith(line):
            return line
    if any(line.startswith(bytes(buffer)) for line in _ALL_LINES):
        return None
    raise NotPlainAsk


def says_close(connection: bytes) -> bool:
    """Whether a ``Connection`` header's value holds the ``close`` option."""
    return b"close" in (token.strip().lower() for token in connection.split(b","))


def parse_ask_head(buffer: bytes | bytearray, max_body: int) -> AskHead | None:
    """The request head at the start of ``buffer``, or None if it is not complete yet.

    Raises :class:`NotPlainAsk` as soon as the bytes show that the request is
    not a plain ``POST /api/ask`` (see the module docstring), including a
    declared body over ``max_body``: Hypercorn's path answers that with its
    401 or 413, in the order the API documents.
    """
    request_line = _request_line(buffer)
    if request_line is None:
        return None
    prefix = len(request_line)
    end = buffer.find(b"\r\n\r\n", prefix - 2)
    # A bare LF can never be plain, and h11 would end the head at one (LF LF):
    # hand it over now rather than wait for a CRLF CRLF that may never come.
    if _BARE_LF.search(buffer, prefix, end + 4 if end >= 0 else len(buffer)):
        raise NotPlainAsk
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise NotPlainAsk
        return None
    if end + 4 > MAX_HEAD:
        raise NotPlainAsk
    authorization: str | None = None
    length: int | None = None
    hosts = 0
    keep_alive = True
    expects_continue = False
    event_stream = False
    forwarded_for: list[bytes] = []
    idempotency_key: str | None = None
    for line in bytes(buffer[prefix:end]).split(b"\r\n") if end >= prefix else ():
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise NotPlainAsk  # includes obsolete line folding (a line starting with a space)
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise NotPlainAsk
        name = name.lower()
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                raise NotPlainAsk
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            keep_alive &= not says_close(value)
        elif name == b"accept":
            event_stream |= b"text/event-stream" in value.lower()
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"idempotency-key":
            idempotency_key = value.decode("latin-1")
        elif name == b"expect":
            if value.lower() != b"100-continue":
                raise NotPlainAsk
            expects_continue = True
        elif name in _DECLINED:
            raise NotPlainAsk
    if hosts != 1 or length is None or length > max_body:
        raise NotPlainAsk
    return AskHead(
        authorization,
        end + 4,
        length,
        keep_alive,
        expects_continue,
        event_stream,
        REQUEST_LINES[request_line],
        tuple(forwarded_for),
        idempotency_key,
    )


class HttpDate:
    """The ``Date`` header's value, formatted once a second rather than per response."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")
    for status in HTTPStatus
}


def event_stream_head(date: bytes, *, close: bool = False) -> bytes:
    """The head of a ``200`` server-sent-event stream, sent in chunks."""
    return b"".join(
        (
            _STATUS_LINES[200],
            b"content-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\n"
            b"x-accel-buffering: no\r\n"
            b"transfer-encoding: chunked\r\n"
            b"date: ",
            date,
            b"\r\n",
            b"connection: close\r\n" if close else b"",
            b"\r\n",
        )
    )


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body; b"" gives the last chunk."""
    if not data:
        return b"0\r\n\r\n"
    return b"%x\r\n" % len(data) + data + b"\r\n"


def response_bytes(
    status: int,
    body: bytes,
    date: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    close: bool = False,
) -> bytes:
    """A whole JSON response: status line, headers and ``body``."""
    parts = [
        _STATUS_LINES[status],
        b"content-type: application/json\r\ncontent-length: ",
        str(len(body)).encode("ascii"),
        b"\r\ndate: ",
        date,
        b"\r\n",
    ]
    for name, value in headers or ():
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)
