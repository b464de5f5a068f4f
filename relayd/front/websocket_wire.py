"""An agent's WebSocket straight over its socket: wsproto frames, no ASGI.

Served through Hypercorn, every agent costs a second task (Hypercorn's reader
beside the app), a message queue, and on every frame Hypercorn's stream and
ASGI message layers plus a hop between the two tasks. relayd holds thousands
of mostly idle agents and pings each of them every heartbeat interval, so this
is where the relay's memory and idle CPU go. Here the session's own task reads
the socket and parses frames with wsproto, and writers write to the socket
directly (one at a time).

Its cost is measured by ``relayd bench`` (idle-10000, stream-32): see
docs/performance.md.

What Hypercorn did for agent sockets and this transport does too: answer
WebSocket pings, complete the closing handshake, refuse a message over
``agents.max_message`` with 1009, fail the connection on a framing or UTF-8
error (1002/1007), and bound every write (:class:`~relayd.front.sockets.WriteLimits`).
It declines compression (permessage-deflate is optional for both sides; the
protocol's frames are small). Frames are read only when the session asks for
the next one, so an agent that floods is held back by TCP flow control rather
than by a queue.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from relayd.front.sockets import RECEIVE_SIZE, WriteLimits, read_some, write_now
from relayd.sync import LeanLock

__all__ = ["WireTransport"]

# After our close frame, how long to wait for the agent's before dropping the socket.
CLOSE_WAIT = 2.0


class FrameError(Exception):
    """A frame that fails the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class NotSimpleFrame(Exception):
    """A frame for wsproto to parse."""


def simple_pong(buffer: bytearray) -> int | None:
    """The length of a whole, masked, unfragmented pong frame at the start of
    ``buffer`` (its payload, at most 125 bytes, is not needed); None otherwise."""
    if len(buffer) < 6 or buffer[0] != 0x8A or not buffer[1] & 0x80:
        return None
    length = buffer[1] & 0x7F
    if length > 125 or len(buffer) < 6 + length:
        return None
    return 6 + length


def parse_simple_frame(buffer: bytearray, max_message: int) -> tuple[str, int] | None:
    """A simple frame at the start of ``buffer``: ``(text, bytes used)``, or None
    if it is not complete yet.

    Simple: a whole text message in one masked frame (what agents send, pongs
    and replies alike). Parsed here in a few operations instead of wsproto's
    general frame machinery, which was a large share of an idle agent's cost per
    pong. Raises :class:`NotSimpleFrame` for anything else (control frames,
    fragments, binary, reserved bits, an unmasked frame, a length not encoded
    minimally), which wsproto then parses with every check of RFC 6455, and
    :class:`FrameError` for a message over ``max_message`` characters (1009) or
    text that is not UTF-8 (1007).
    """
    if len(buffer) < 2:
        return None
    if buffer[0] != 0x81 or buffer[1] < 0x80:  # FIN + text, no RSV; masked
        raise NotSimpleFrame
    length = buffer[1] & 0x7F
    start = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length = int.from_bytes(buffer[2:4], "big")
        start = 4
        if length < 126:
            raise NotSimpleFrame
    elif length == 127:
        if len(buffer) < 10:
            return None
        length = int.from_bytes(buffer[2:10], "big")
        start = 10
        if length < 65536 or length >= 1 << 63:
            raise NotSimpleFrame
    if length > 4 * max_message:  # more than max_message characters, whatever they are
        raise FrameError(CloseReason.MESSAGE_TOO_BIG, "message too big")
    end = start + 4 + length
    if len(buffer) < end:
        return None
    mask = bytes(buffer[start : start + 4]) * (length // 4 + 1)
    payload = int.from_bytes(buffer[start + 4 : end], "little") ^ int.from_bytes(
        mask[:length], "little"
    )
    try:
        text = payload.to_bytes(length, "little").decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CloseReason.INVALID_FRAME_PAYLOAD_DATA, "invalid UTF-8") from None
    if len(text) > max_message:
        # Counted in characters, as for fragmented messages; the session then
        # applies the limit in bytes (and says so in the log).
        raise FrameError(CloseReason.MESSAGE_TOO_BIG, "message too big")
    return text, end


# A server's ping with no payload (RFC 6455, 5.5.2): FIN + opcode 0x9, length 0.
PING_FRAME = b"\x89\x00"


def text_frame(text: str) -> bytes:
    """A server's (unmasked) frame carrying ``text`` as one message."""
    payload = text.encode("utf-8")
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


class WireTransport:
    """The session's :class:`~relayd.agents.session.Transport` over a trio stream.

    On a socket (always, in the daemon) frames are read and written with
    plain non-blocking system calls on its descriptor: a frame the socket
    takes at once is written without a trip through the scheduler, and a
    read that waited needs no second one. Only what the socket cannot take
    now goes through the stream's own, bounded ``send_all``. Any other stream
    (tests) uses the stream's methods throughout.
    """

    __slots__ = (
        "_accept",
        "_backlog",
        "_closed",
        "_drained",
        "_gone",
        "_inbox",
        "_lock",
        "_max_message",
        "_parts",
        "_size",
        "_stream",
        "_writes",
        "_ws",
        "close_code",
        "code_unknown",
        "failure",
        "on_pong",
    )

    def __init__(
        self, stream: trio.abc.Stream, accept: bytes, writes: WriteLimits, max_message: int
    ) -> None:
        self._stream = stream
        self._accept = accept  # the 101 response, sent by accept()
        self._writes = writes
        self._max_message = max_message
        self._ws = Connection(ConnectionType.SERVER)
        # Bytes read and not yet parsed, while every frame has been simple; None
        # once wsproto has taken over the connection's incoming side.
        self._inbox: bytearray | None = bytearray()
        self._drained = False  # the last read took all there was (see read_some)
        self._lock = LeanLock()  # held while the stream's send_all writes the backlog
        self._backlog = b""  # bytes that must go out before any later frame
        self._closed = False  # no more frames either way
        self._gone = False  # the socket is unusable: reset, or a write cut short
        self._parts: list[str | bytes] = []  # a fragmented message so far
        self._size = 0
        self.close_code: int | None = None  # the agent's, if it sent a close frame
        self.failure: tuple[int, str] | None = None  # ours, if we failed the connection
        self.on_pong: Callable[[], None] | None = None  # a v2 session's heartbeat
        self.code_unknown = False  # wsproto always knows how the agent closed

    async def accept(self) -> bool:
        if await self._write(self._accept):
            return True
        self._closed = True
        return False

    async def receive(self) -> str | bytes | None:
        while not self._closed:
            if self._inbox is not None:
                try:
                    text = self._take_simple_frame()
                except FrameError as error:
                    await self._fail(error.code, error.reason)
                    return None
                if text is not None:
                    return text
            if self._inbox is None:
                for event in self._ws.events():
                    if isinstance(event, Message):
                        message = await self._collect(event)
                        if message is not None:
                            return message
                    elif isinstance(event, Ping):
                        await self._send_event(event.response())
                    elif isinstance(event, Pong):
                        if self.on_pong is not None:
                            self.on_pong()
                    elif isinstance(event, CloseConnection):
                        await self._closed_by_agent(event)
                        return None
                    if self._closed:
                        return None
            data = await self._read()
            if not data:
                self._closed = True
                return None
            if self._inbox is not None:
                self._inbox += data
            else:
                self._ws.receive_data(data)
        return None

    def _take_simple_frame(self) -> str | None:
        """The next message from the inbox if it is a simple frame, else None.

        On a frame that is not simple (see :func:`parse_simple_frame`) the
        inbox goes to wsproto, which handles the connection from then on.
        """
        assert self._inbox is not None
        while (used := simple_pong(self._inbox)) is not None:
            # v2 agents answer every heartbeat ping: without this, the first pong
            # handed the connection to wsproto for good, which then cost about
            # 40 % of the relay's CPU per streamed delta (relayd bench, stream-32).
            del self._inbox[:used]
            if self.on_pong is not None:
                self.on_pong()
        try:
            parsed = parse_simple_frame(self._inbox, self._max_message)
        except NotSimpleFrame:
            self._hand_to_wsproto()
            return None
        if parsed is None:
            return None
        text, used = parsed
        del self._inbox[:used]
        return text

    def _hand_to_wsproto(self) -> None:
        """From now on wsproto parses what the agent sends, the inbox first."""
        if self._inbox is not None:
            self._ws.receive_data(bytes(self._inbox))
            self._inbox = None

    async def send(self, text: str) -> None:
        if self._closed or self._gone:
            # A caller that only sends must still yield to the scheduler.
            await trio.lowlevel.checkpoint()
            return
        rest = self.send_nowait(text)
        if rest is None:
            # Written at once. Not a full checkpoint: a request's sender parks for
            # the reply right after, and a trip through the scheduler here would be
            # on every request's path.
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await rest

    def send_nowait(self, text: str) -> Awaitable[None] | None:
        if self._closed or self._gone:
            return None
        return self._put(text_frame(text))

    def ping_nowait(self) -> Awaitable[None] | None:
        """A WebSocket ping, written now if the socket takes it (see send_nowait)."""
        if self._closed or self._gone:
            return None
        return self._put(PING_FRAME)

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if not await self._send_event(CloseConnection(code=code, reason=reason)):
            return
        # Wait (briefly) for the agent's close frame, so that it reads ours before
        # the socket goes: closing with unread data would reset the connection.
        # wsproto follows the closing handshake, from any bytes not parsed yet.
        self._hand_to_wsproto()
        with trio.move_on_after(CLOSE_WAIT):
            while self._ws.state is not ConnectionState.CLOSED:
                data = await self._read()
                if not data:
                    break
                self._ws.receive_data(data)
                for _ in self._ws.events():
                    pass

    # -- frames ------------------------------------------------------------------------

    async def _collect(self, event: Message[Any]) -> str | bytes | None:
        """Add a frame to the message being assembled; the message once it is whole."""
        self._size += len(event.data)
        if self._size > self._max_message:
            await self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")
            return None
        if event.message_finished and not self._parts:
            self._size = 0
            data = event.data
            return data if isinstance(event, TextMessage) else bytes(data)
        self._parts.append(event.data if isinstance(event, TextMessage) else bytes(event.data))
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, BytesMessage):
            return b"".join(part for part in parts if isinstance(part, bytes))
        return "".join(part for part in parts if isinstance(part, str))

    async def _closed_by_agent(self, event: CloseConnection) -> None:
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self.close_code = event.code
            await self._send_event(event.response())
        else:  # wsproto failed the connection: a framing or encoding error
            await self._fail(event.code, event.reason or "protocol error")
        self._closed = True

    async def _fail(self, code: int, reason: str) -> None:
        self.failure = (code, reason)
        self._closed = True
        await self._send_event(CloseConnection(code=code, reason=reason[:120]))

    async def _send_event(self, event: Event) -> bool:
        """Send a control frame (or a message); False if the connection is gone."""
        try:
            data = self._ws.send(event)
        except LocalProtocolError:  # the connection is already closing
            await trio.lowlevel.checkpoint()
            return False
        return await self._write(data)

    # -- bytes -------------------------------------------------------------------------

    async def _write(self, data: bytes) -> bool:
        rest = self._put(data)
        if rest is None:
            await trio.lowlevel.checkpoint()
        else:
            await rest
        return not self._gone

    def _put(self, data: bytes) -> Awaitable[None] | None:
        """Write ``data`` now if the socket takes all of it; else what finishes it."""
        if not self._backlog and not self._lock.locked:
            written = self._write_now(data)
            if written is None or written == len(data):
                return None
            data = data[written:]
        self._backlog += data
        return self._flush()

    def _write_now(self, data: bytes) -> int | None:
        written = write_now(self._stream, data)
        if written is None:  # the reader will see the end
            self._gone = True
        return written

    async def _flush(self) -> None:
        async with self._lock:
            if not self._backlog:
                return
            data, self._backlog = self._backlog, b""
            if not await self._writes.write(self._stream, data):
                self._gone = True

    async def _read(self) -> bytes:
        """The next bytes from the agent; b"" once it has gone."""
        data = await read_some(self._stream, RECEIVE_SIZE, drained=self._drained)
        self._drained = 0 < len(data) < RECEIVE_SIZE
        return data
