"""A minimal keep-alive HTTP/1.1 client over a Trio TCP stream.

The bench's load generator must not be the bottleneck, and httpx spends more
CPU per request than the relay route it measures. This client does only what
the bench needs: one connection per client, requests with a ``Content-Length``
body, responses with a ``Content-Length`` body (what relayd sends for every
response it makes). No chunked bodies, no redirects. TLS with ``ssl_context``
(relay-32-tls: :mod:`relayd.bench.tls` says how). It reads and
writes the socket with relayd's own non-blocking calls
(:func:`~relayd.front.sockets.read_some`, :func:`~relayd.front.sockets.write_now`):
after a request the answer cannot be there yet, so it waits for it instead of
trying a read that fails, a system call and an exception saved per request on
the bench's side of the machine.

Contract: :meth:`HttpClient.request` returns a :class:`Response` or raises
:class:`HttpError` (a malformed or unsupported answer), ``OSError`` or
``trio.BrokenResourceError`` (the connection failed). After any exception the
connection is closed and the next request opens a new one. A request on a
reused connection that the server had already closed (EOF before a single byte
of the answer) is retried once on a fresh connection, as browsers do.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trio

from relayd.bench.tls import TlsSocketStream, open_tls_stream
from relayd.front.sockets import read_some, write_now

__all__ = ["HttpClient", "HttpError", "Response", "StaleConnection", "parse_head"]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_RECEIVE_SIZE = 65536


class HttpError(Exception):
    """The server's answer is not HTTP/1.1 this client understands."""


class StaleConnection(Exception):
    """EOF before any byte of the answer, on a connection used before."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


def parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """``(status, reason, headers)`` of a response head (without the blank line).

    Raises HttpError for anything that is not an HTTP/1.x status line and headers.
    """
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(f"malformed header line: {line[:80]!r}")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return int(code), reason.decode("latin-1"), headers


class HttpClient:
    """One keep-alive connection to ``host:port``; one request at a time.

    Owns its stream: :meth:`aclose` (or ``async with``) closes it. With
    ``ssl_context`` the connection speaks TLS (a :class:`TlsSocketStream`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        host_header = f"{host}:{port}"
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._common = f"Host: {host_header}\r\n{extra}".encode("latin-1")
        self._stream: trio.SocketStream | TlsSocketStream | None = None
        self._buffer = bytearray()
        self._used = False  # the open connection has carried a complete exchange
        self.connections = 0  # how many times a connection was opened

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        self._buffer.clear()
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request does)."""
        if self._stream is None:
            if self.ssl_context is None:
                self._stream = await trio.open_tcp_stream(self.host, self.port)
            else:
                self._stream = await open_tls_stream(self.host, self.port, self.ssl_context)
            self._used = False
            self.connections += 1

    @property
    def tls_session(self) -> str | None:
        """The open connection's TLS version and cipher (None: not TLS, or not open)."""
        stream = self._stream
        return stream.session if isinstance(stream, TlsSocketStream) else None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request and read its whole answer. See the module docstring."""
        head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._common
        if headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode(
                "latin-1"
            )
        if body or method not in ("GET", "HEAD"):
            head += b"Content-Length: %d\r\n" % len(body)
        message = head + b"\r\n" + body
        try:
            try:
                return await self._exchange(message, method)
            except StaleConnection:
                # The server closed the idle connection: a fresh one cannot be stale.
                await self.aclose()
                return await self._exchange(message, method)
        except BaseException:
            await self.aclose()
            raise

    @staticmethod
    async def _send(
        stream: trio.SocketStream | TlsSocketStream, message: bytes, reused: bool
    ) -> None:
        """Write ``message`` (one system call when the socket takes it all); a
        reused connection the server has closed raises :class:`StaleConnection`."""
        try:
            written = write_now(stream, message)
            if written is None:
                raise trio.BrokenResourceError("connection closed")
            if written < len(message):
                await stream.send_all(message[written:])
        except (trio.BrokenResourceError, OSError):
            if reused:
                raise StaleConnection() from None
            raise

    async def _exchange(self, message: bytes, method: str) -> Response:
        await self.connect()
        stream = self._stream
        assert stream is not None
        reused = self._used
        await self._send(stream, message, reused)
        buffer = self._buffer
        # The answer cannot be there yet: wait for it rather than try a read first.
        drained = True
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise HttpError(f"response head larger than {MAX_HEAD} bytes")
            chunk = await read_some(stream, _RECEIVE_SIZE, drained=drained)
            drained = len(chunk) < _RECEIVE_SIZE
            if not chunk:
                if reused and not buffer:
                    raise StaleConnection()
                raise trio.BrokenResourceError("connection closed before the response head")
            buffer += chunk
        status, reason, headers = parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        if 100 <= status < 200:
            raise HttpError(f"informational responses are not supported ({status})")
        if method == "HEAD" or status in (204, 304):
            length = 0
        elif "transfer-encoding" in headers:
            raise HttpError("chunked responses are not supported")
        else:
            text = headers.get("content-length")
            if text is None or not text.isdigit():
                raise HttpError(f"response without a valid Content-Length: {text!r}")
            length = int(text)
            if length > MAX_BODY:
                raise HttpError(f"response body larger than {MAX_BODY} bytes")
        while len(buffer) < length:
            chunk = await read_some(stream, _RECEIVE_SIZE, drained=drained)
            drained = len(chunk) < _RECEIVE_SIZE
            if not chunk:
                raise trio.BrokenResourceError("connection closed in the middle of the body")
            buffer += chunk
        body = bytes(buffer[:length])
        del buffer[:length]
        self._used = True
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return Response(status, reason, headers, body)
