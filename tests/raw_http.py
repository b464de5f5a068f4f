"""A raw HTTP/1.1 client for tests that must see exactly what relayd writes.

It works over any trio stream (a loopback socket, or one half of a memory
stream pair) and reads responses framed by Content-Length, as relayd always
sends them. Header names are kept as sent, so a test can check their case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["RawClient", "Response"]

RECEIVE_SIZE = 65536


@dataclass
class Response:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, values stripped
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    @property
    def reason(self) -> bytes:
        """The reason phrase: relayd's wire path sends one, Hypercorn (h11) none."""
        return self.status_line.split(b" ", 2)[2]

    def header(self, name: bytes) -> bytes | None:
        """The one value of header ``name`` (lower case), or None."""
        values = [value for key, value in self.headers if key.lower() == name]
        assert len(values) <= 1, self.headers
        return values[0] if values else None

    @property
    def names(self) -> set[bytes]:
        """The header names, lower-cased."""
        return {name.lower() for name, _ in self.headers}

    def json(self) -> Any:
        assert self.header(b"content-type") == b"application/json", self.headers
        return json.loads(self.body)


class RawClient:
    """One client connection: raw bytes out, parsed responses in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""
        # The client's own address, as relayd logs it (``127.0.0.1:PORT``), on a socket.
        self.local: str | None = None
        if isinstance(stream, trio.SocketStream):
            host, port = stream.socket.getsockname()[:2]
            self.local = f"{host}:{port}"

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise AssertionError(f"the connection ended; unparsed: {self.buffer!r}")
        self.buffer += data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def response(self) -> Response:
        """The next response."""
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 "), head
        headers = []
        for line in lines:
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), line
            headers.append((name, value.strip()))
        response = Response(status_line, headers, b"")
        length = response.header(b"content-length")
        assert length is not None, head
        response.body = await self.read_exactly(int(length))
        return response

    async def rest(self) -> bytes:
        """Everything until the server closes the connection (a reset counts as
        closing); the caller bounds the wait."""
        data, self.buffer = self.buffer, b""
        while True:
            try:
                piece = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                return data
            if not piece:
                return data
            data += piece

    async def silent_for(self, seconds: float) -> bool:
        """Whether the server sends nothing more (nor closes) for ``seconds``."""
        with trio.move_on_after(seconds):
            self.buffer += await self.stream.receive_some(RECEIVE_SIZE)
            return False
        return not self.buffer

    async def aclose(self) -> None:
        await self.stream.aclose()
