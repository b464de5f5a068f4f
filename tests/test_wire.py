"""WireTransport (relayd/front/websocket_wire.py): an agent's WebSocket straight over a stream.

The relay's end is a :class:`WireTransport` over one half of a stream pair; the
agent's end (:class:`Agent`) is a wsproto client ``Connection`` over the other
half, which masks what it sends and parses what the relay sends. Frames a
well-behaved client cannot produce (unmasked, invalid UTF-8, reserved bits) are
written by hand with :func:`client_frame`; :func:`server_frames` splits the
relay's bytes into raw frames where the exact framing matters (wsproto's parser
stops at a close frame).

The simple-frame codec (what agents send, parsed without wsproto) is checked
against wsproto's own client and server at the end.

The transport has two ways to move bytes, so most tests run over both
(the ``kind`` fixture):

* ``memory``: ``trio.testing.memory_stream_pair`` (unbounded buffers), where
  the transport uses the stream's own ``receive_some`` / ``send_all``;
* ``socket``: a ``trio.socket.socketpair`` in this process, where the transport
  reads and writes the descriptor directly (the daemon's path).

``lockstep`` (``trio.testing.lockstep_stream_pair``) makes every write wait for
the other side to read: a peer that reads slowly, a byte at a time, or never.
Every test runs in virtual time (``autojump_clock``), so the close wait and the
write deadline take no real time and are asserted exactly; a test that would
deadlock fails (see the ``connect`` fixture) instead of hanging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from relayd.front.sockets import WRITE_TIMEOUT, WriteLimits, read_some
from relayd.front.websocket_wire import (
    CLOSE_WAIT,
    FrameError,
    NotSimpleFrame,
    WireTransport,
    parse_simple_frame,
    text_frame,
)

ACCEPT = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
MAX_MESSAGE = 16
# More than a socket pair's buffers hold: a write of it blocks until the agent reads.
HUGE = 8 * 2**20

CONTINUATION, TEXT, CLOSE, PING = 0x0, 0x1, 0x8, 0x9  # frame opcodes

Stream = trio.abc.HalfCloseableStream
Received = str | bytes | None


# -- the agent's end -------------------------------------------------------------------


class Agent:
    """The agent's end: a wsproto client over the other half of the stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)

    async def send(self, *events: Event) -> None:
        """Encode ``events`` and write them in one chunk."""
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def events(self) -> list[Event]:
        """The relay's next events (reading until there is at least one; [] at EOF)."""
        while True:
            events = list(self.ws.events())
            if events:
                return events
            data = await self.stream.receive_some()
            if not data:
                return []
            self.ws.receive_data(bytes(data))

    async def read_all(self, *, chunk: int | None = None) -> bytes:
        """What the relay writes until it closes its end, or for a second of virtual time
        (the clock moves only once every task waits: the relay has nothing more to send)."""
        data = b""
        with trio.move_on_after(1):
            while piece := await self.stream.receive_some(chunk):
                data += piece
        return data

    async def frames(self) -> list[tuple[int, bytes]]:
        return server_frames(await self.read_all())


class Connect(Protocol):
    def __call__(
        self, kind: str, *, max_message: int = MAX_MESSAGE
    ) -> tuple[WireTransport, Agent, Stream]: ...


async def watchdog() -> None:
    await trio.sleep(10 * WRITE_TIMEOUT)
    raise AssertionError("the test deadlocked")


def open_pair(kind: str) -> tuple[Stream, Stream]:
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    if kind == "lockstep":
        return trio.testing.lockstep_stream_pair()
    assert kind == "socket"
    relay_socket, agent_socket = trio.socket.socketpair()
    return trio.SocketStream(relay_socket), trio.SocketStream(agent_socket)


@pytest.fixture
async def connect(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[Connect]:
    """``connect(kind)``: a transport, its agent, and the relay's half of the stream.

    Also a watchdog: a test still running after ten write deadlines of virtual
    time has deadlocked (the clock jumps when every task is blocked, so that is
    at once), and fails instead of hanging.
    """
    nursery.start_soon(watchdog)
    streams: list[Stream] = []

    def connect(
        kind: str, *, max_message: int = MAX_MESSAGE
    ) -> tuple[WireTransport, Agent, Stream]:
        relay_stream, agent_stream = open_pair(kind)
        streams.extend((relay_stream, agent_stream))
        transport = WireTransport(relay_stream, ACCEPT, WriteLimits(), max_message)
        return transport, Agent(agent_stream), relay_stream

    yield connect
    for stream in streams:
        await trio.aclose_forcefully(stream)


@pytest.fixture(params=["memory", "socket"])
def kind(request: pytest.FixtureRequest) -> str:
    """The stream under the transport: trio's memory streams, or a socket pair."""
    return str(request.param)


# -- frames ----------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One client frame (masked), built by hand; ``payload`` under 126 bytes."""
    assert len(payload) < 126
    mask = b"\x37\xfa\x21\x3d"
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([first, 0x80 | len(payload)]) + mask + masked


def unmasked_frame(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of each frame in ``data`` (server frames: unmasked, final)."""
    frames = []
    while data:
        assert data[0] & 0xF0 == 0x80, "a final frame with no reserved bits"
        assert not data[1] & 0x80, "a server frame is not masked"
        length, offset = data[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(data[2:4]), 4
        elif length == 127:
            length, offset = int.from_bytes(data[2:10]), 10
        assert len(data) >= offset + length, "a whole frame"
        frames.append((data[0] & 0x0F, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2) + reason.encode()


# -- time and tasks --------------------------------------------------------------------


async def timed(call: Awaitable[object]) -> float:
    """How long (virtual seconds) ``call`` took."""
    start = trio.current_time()
    await call
    return trio.current_time() - start


async def close_answered(
    transport: WireTransport, agent: Agent, before_reply: bytes
) -> tuple[CloseConnection, float]:
    """Close ``transport`` (code 4000); the agent sends ``before_reply``, then
    answers the close frame. The agent's view of that frame, and how long
    (virtual seconds) the close took."""
    elapsed: list[float] = []

    async def close() -> None:
        elapsed.append(await timed(transport.close(4000, "going away")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close)
        [event] = await agent.events()
        assert isinstance(event, CloseConnection)
        await agent.send_raw(before_reply)
        await agent.send(event.response())
    return event, elapsed[0]


async def drained(relay_stream: Stream, agent: Agent) -> bytes:
    """What the relay wrote and the agent has not read yet (closes the relay's stream)."""
    await relay_stream.aclose()
    return await agent.read_all()


# -- accept ----------------------------------------------------------------------------


async def test_accept_sends_exactly_the_accept_bytes(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    assert await transport.accept() is True
    assert await drained(relay_stream, agent) == ACCEPT


async def test_accept_is_false_when_the_agent_is_gone(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.stream.aclose()
    assert await transport.accept() is False
    assert await transport.receive() is None


async def test_accept_gives_up_by_the_write_deadline(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, _, _ = connect("lockstep")  # the agent never reads
    assert await timed(transport.accept()) == WRITE_TIMEOUT
    assert await transport.receive() is None


# -- receive ---------------------------------------------------------------------------


async def test_receives_text_as_str_and_binary_as_bytes(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(TextMessage(data="h\u00e9llo"))
    message = await transport.receive()
    assert type(message) is str
    assert message == "h\u00e9llo"
    await agent.send(BytesMessage(data=b"\x00\xffbin"))
    message = await transport.receive()
    assert type(message) is bytes
    assert message == b"\x00\xffbin"
    await agent.send(TextMessage(data=""))
    assert await transport.receive() == ""


async def test_reassembles_a_fragmented_message(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(
        TextMessage(data="frag", message_finished=False),
        TextMessage(data="men", message_finished=False),
        TextMessage(data="ted \u2603", message_finished=True),
        BytesMessage(data=b"\x01\x02", message_finished=False),
        BytesMessage(data=b"\x03", message_finished=True),
    )
    assert await transport.receive() == "fragmented \u2603"
    message = await transport.receive()
    assert type(message) is bytes
    assert message == b"\x01\x02\x03"


async def test_a_ping_between_fragments_is_answered(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(
        TextMessage(data="one ", message_finished=False),
        Ping(payload=b"mid"),
        TextMessage(data="message", message_finished=True),
    )
    assert await transport.receive() == "one message"
    assert await agent.events() == [Pong(payload=b"mid")]


async def test_frames_in_one_chunk_are_returned_one_per_call(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(
        TextMessage(data="first"),
        BytesMessage(data=b"second"),
        Ping(payload=b"p"),
        TextMessage(data="third"),
        TextMessage(data="fourth"),
    )
    await agent.stream.send_eof()  # right after: nothing more to read
    received = [await transport.receive() for _ in range(5)]
    assert received == ["first", b"second", "third", "fourth", None]
    assert await agent.events() == [Pong(payload=b"p")]


@pytest.mark.parametrize("pair", ["lockstep", "socket"])
async def test_bytes_trickled_one_at_a_time(
    pair: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(pair, max_message=64)
    data = b"".join(
        agent.ws.send(event)
        for event in [
            TextMessage(data="\u00e9t\u00e9 \u2603 ", message_finished=False),
            TextMessage(data="\U0001f600!"),
            BytesMessage(data=bytes(range(40))),
            TextMessage(data="x" * 64),
        ]
    )
    received: list[Received] = []

    async def receive_all() -> None:
        for _ in range(3):
            received.append(await transport.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_all)
        for i in range(len(data)):
            await agent.send_raw(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
    assert received == ["\u00e9t\u00e9 \u2603 \U0001f600!", bytes(range(40)), "x" * 64]


async def test_a_ping_is_answered_and_receive_keeps_waiting(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    received: list[Received] = []

    async def receive_one() -> None:
        received.append(await transport.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_one)
        await agent.send(Ping(payload=b"are you there"))
        assert await agent.events() == [Pong(payload=b"are you there")]
        await agent.send(Pong(payload=b"unsolicited"), Ping(payload=b""))
        assert await agent.events() == [Pong(payload=b"")]
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        await agent.send(TextMessage(data="a real message"))
    assert received == ["a real message"]


async def test_the_agents_close_is_answered_and_ends_receive(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    await agent.send(CloseConnection(code=4001, reason="bye"))
    assert await transport.receive() is None
    assert transport.close_code == 4001
    assert await agent.events() == [CloseConnection(code=4001, reason="bye")]
    assert agent.ws.state is ConnectionState.CLOSED
    # The transport is done: no second close frame from close(), nothing from send().
    assert await timed(transport.close(1000, "closing")) == 0
    await transport.send("late")
    assert transport.send_nowait("later") is None
    assert await transport.receive() is None
    assert await drained(relay_stream, agent) == b""


async def test_a_close_without_a_code_is_answered_without_one(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send_raw(client_frame(CLOSE, b""))
    assert await transport.receive() is None
    assert transport.close_code == 1005  # "no status received"
    assert await agent.frames() == [(CLOSE, b"")]


@pytest.mark.parametrize(
    "partial", [b"", b"\x81", client_frame(TEXT, b"cut short")[:-3]], ids=["none", "1", "most"]
)
async def test_eof_ends_receive(
    partial: bytes, kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    if partial:
        await agent.send_raw(partial)
    await agent.stream.send_eof()
    assert await transport.receive() is None
    assert transport.close_code is None
    assert await transport.receive() is None


# -- failing the connection ------------------------------------------------------------


async def assert_fails_with(transport: WireTransport, agent: Agent, code: int) -> None:
    """receive() returns None, and the relay sent a close frame with ``code`` and nothing
    else; the agent did not close."""
    assert await transport.receive() is None
    assert transport.close_code is None
    frames = await agent.frames()
    assert [opcode for opcode, _ in frames] == [CLOSE]
    assert int.from_bytes(frames[0][1][:2]) == code


@pytest.mark.parametrize(
    "events",
    [
        [TextMessage(data="x" * (MAX_MESSAGE + 1))],
        [BytesMessage(data=b"x" * (MAX_MESSAGE + 1))],
        [TextMessage(data="x" * 10, message_finished=False), TextMessage(data="x" * 7)],
        [BytesMessage(data=b"x" * 10, message_finished=False), BytesMessage(data=b"x" * 7)],
        [TextMessage(data="x" * 6, message_finished=False)] * 3,
        [TextMessage(data="\u2603" * (MAX_MESSAGE + 1))],
    ],
    ids=["text", "binary", "text-fragments", "binary-fragments", "unfinished", "chars"],
)
async def test_a_message_over_max_message_closes_with_1009(
    events: list[Event], kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(*events)
    await assert_fails_with(transport, agent, 1009)


@pytest.mark.parametrize(
    "events",
    [
        [TextMessage(data="x" * MAX_MESSAGE)],
        [TextMessage(data="\u00e9" * MAX_MESSAGE)],  # 16 characters, 32 bytes
        [TextMessage(data="\U0001f600" * MAX_MESSAGE)],  # 16 characters, 64 bytes
        [BytesMessage(data=b"x" * MAX_MESSAGE)],
        [TextMessage(data="x" * 10, message_finished=False), TextMessage(data="x" * 6)],
    ],
    ids=["ascii", "two-byte-chars", "four-byte-chars", "binary", "fragments"],
)
async def test_a_message_of_max_message_is_received(
    events: list[Event], kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(*events)
    message = await transport.receive()
    assert message is not None
    assert len(message) == MAX_MESSAGE


async def test_the_size_limit_is_per_message(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send(
        TextMessage(data="a" * 10, message_finished=False),
        TextMessage(data="a" * 6),
        TextMessage(data="b" * MAX_MESSAGE),
        BytesMessage(data=b"c" * 8, message_finished=False),
        BytesMessage(data=b"c" * 8),
        TextMessage(data="d" * MAX_MESSAGE),
    )
    received = [await transport.receive() for _ in range(4)]
    assert received == ["a" * 16, "b" * 16, b"c" * 16, "d" * 16]


async def test_invalid_utf8_closes_with_1007(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send_raw(client_frame(TEXT, b"ok \xff\xfe"))
    await assert_fails_with(transport, agent, 1007)


async def test_utf8_split_across_fragments_is_checked_whole(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    snowman = "\u2603".encode()
    await agent.send_raw(
        client_frame(TEXT, b"a" + snowman[:1], fin=False) + client_frame(CONTINUATION, snowman[1:])
    )
    assert await transport.receive() == "a\u2603"
    await agent.send_raw(
        client_frame(TEXT, snowman[:2], fin=False) + client_frame(CONTINUATION, b"b")
    )
    await assert_fails_with(transport, agent, 1007)


@pytest.mark.parametrize(
    "frame",
    [
        unmasked_frame(TEXT, b"not masked"),
        client_frame(0x3, b"reserved opcode"),
        client_frame(TEXT, b"rsv1 without an extension", rsv1=True),
        client_frame(CONTINUATION, b"continuation of nothing"),
        client_frame(PING, b"fragmented ping", fin=False),
        client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"new message mid-message"),
        client_frame(CLOSE, close_payload(999)),
        client_frame(CLOSE, b"\x03"),
    ],
    ids=[
        "unmasked",
        "reserved-opcode",
        "rsv1",
        "lone-continuation",
        "fragmented-control",
        "interleaved-data",
        "bad-close-code",
        "short-close",
    ],
)
async def test_a_protocol_error_closes_with_1002(
    frame: bytes, kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.send_raw(frame)
    await assert_fails_with(transport, agent, 1002)


# -- send ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello", "", "\u00fcnic\u00f8de \u2603 \U0001f600", "z" * 70_000],
    ids=["ascii", "empty", "unicode", "long"],
)
async def test_send_delivers_one_text_message(
    text: str, kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    await transport.send(text)
    data = await drained(relay_stream, agent)
    assert server_frames(data) == [(TEXT, text.encode())]
    agent.ws.receive_data(data)
    assert list(agent.ws.events()) == [TextMessage(data=text)]


async def test_send_nowait_keeps_the_order_frames_were_started_in(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    started = [transport.send_nowait(text) for text in ("first", "second", "third")]
    for rest in reversed(started):  # finished in the opposite order
        if rest is not None:
            await rest
    frames = server_frames(await drained(relay_stream, agent))
    assert frames == [(TEXT, b"first"), (TEXT, b"second"), (TEXT, b"third")]


async def test_send_nowait_returns_what_remains_for_a_slow_agent(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect("socket")
    rest = transport.send_nowait("h" * HUGE)
    assert rest is not None
    later = transport.send_nowait("after")  # queued behind the rest of the first
    assert later is not None

    async def finish(rest: Awaitable[None]) -> None:
        await rest

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish, later)
        nursery.start_soon(finish, rest)
        data = await agent.read_all(chunk=2**16)
    assert server_frames(data) == [(TEXT, b"h" * HUGE), (TEXT, b"after")]


async def test_send_after_close_is_silent_but_a_checkpoint(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    await agent.stream.send_eof()  # the transport reads EOF: closed
    assert await transport.receive() is None
    with trio.testing.assert_checkpoints():
        await transport.send("nobody hears this")
    assert transport.send_nowait("nor this") is None
    assert await drained(relay_stream, agent) == b""


@pytest.mark.parametrize("pair", ["lockstep", "socket"])
async def test_send_to_an_agent_that_never_reads_gives_up_by_the_write_deadline(
    pair: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, _, _ = connect(pair)
    assert await timed(transport.send("x" * HUGE)) == WRITE_TIMEOUT
    # The transport now reports closed: no more waiting on this agent.
    assert await transport.receive() is None
    with trio.testing.assert_checkpoints():
        assert await timed(transport.send("again")) == 0
    assert transport.send_nowait("and again") is None
    assert await timed(transport.close(1000, "bye")) == 0


@pytest.mark.parametrize("pair", ["lockstep", "socket"])
async def test_a_write_timeout_ends_a_pending_receive(
    pair: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    """The session's task waits in receive() while a request's send times out."""
    transport, _, _ = connect(pair)
    received: list[Received] = ["not yet"]

    async def receive_one() -> None:
        received[0] = await transport.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_one)
        await trio.testing.wait_all_tasks_blocked()
        assert await timed(transport.send("x" * HUGE)) == WRITE_TIMEOUT
    assert received == [None]


@pytest.mark.parametrize("pair", ["lockstep", "socket"])
async def test_concurrent_senders_write_whole_frames(
    pair: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(pair, max_message=HUGE)
    texts = ["a" * 300_000, "b" * 300, "c" * 700_000, "d"]
    expected = sum(len(Connection(ConnectionType.SERVER).send(TextMessage(text))) for text in texts)
    data = b""
    async with trio.open_nursery() as nursery:
        for text in texts:
            nursery.start_soon(transport.send, text)
        while len(data) < expected:
            data += await agent.stream.receive_some(4096)  # a slow reader
    assert sorted(server_frames(data)) == sorted((TEXT, text.encode()) for text in texts)


async def test_no_frame_is_written_after_the_close_reply(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 6455, 5.5.1: nothing after a close frame, even from a send that was
    already waiting for the socket when the agent's close frame arrived."""
    transport, agent, _ = connect("lockstep")
    received: list[Received] = ["not yet"]

    async def receive_one() -> None:
        received[0] = await transport.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_one)
        # The pong's write waits for the agent to read: a send queues behind it.
        await agent.send(Ping(payload=b"p"), CloseConnection(code=4000, reason="bye"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(transport.send, "late")
        await trio.testing.wait_all_tasks_blocked()
        opcodes = [opcode for opcode, _ in await agent.frames()]
    assert received == [None]
    assert opcodes.count(CLOSE) == 1
    assert opcodes[-1] == CLOSE, f"frames written: {opcodes}"


# -- close -----------------------------------------------------------------------------


async def test_close_returns_once_the_agent_replies(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    # A message still in flight before the agent's reply is discarded.
    event, elapsed = await close_answered(transport, agent, client_frame(TEXT, b"in flight"))
    assert (event.code, event.reason) == (4000, "going away")
    assert elapsed == 0
    assert agent.ws.state is ConnectionState.CLOSED
    assert await transport.receive() is None


async def test_close_after_part_of_a_frame_was_read(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    """Bytes already read but not parsed (half a frame) are parsed before what
    follows them: the agent's close reply still ends the closing handshake."""
    transport, agent, _ = connect(kind)
    frame = client_frame(TEXT, b"half now, half later")
    await agent.send_raw(frame[:9])
    with trio.CancelScope() as reading:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.receive)
            await trio.testing.wait_all_tasks_blocked()
            reading.cancel()
    _, elapsed = await close_answered(transport, agent, frame[9:])
    assert elapsed == 0


async def test_close_gives_up_after_close_wait(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    assert await timed(transport.close(1001, "shutting down")) == CLOSE_WAIT
    frames = server_frames(await drained(relay_stream, agent))
    assert frames == [(CLOSE, close_payload(1001, "shutting down"))]


async def test_close_returns_at_once_on_eof(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.stream.send_eof()
    assert await timed(transport.close(1000, "done")) == 0
    assert await agent.frames() == [(CLOSE, close_payload(1000, "done"))]


async def test_close_when_the_agent_is_gone(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, _ = connect(kind)
    await agent.stream.aclose()
    assert await timed(transport.close(1000, "done")) == 0
    assert await transport.receive() is None


async def test_close_twice_is_harmless(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    assert await timed(transport.close(4002, "first")) == CLOSE_WAIT
    assert await timed(transport.close(4003, "second")) == 0
    frames = server_frames(await drained(relay_stream, agent))
    assert frames == [(CLOSE, close_payload(4002, "first"))]


async def test_close_after_the_agents_close_sends_nothing_more(
    kind: str, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    transport, agent, relay_stream = connect(kind)
    await agent.send(CloseConnection(code=1000, reason=""))
    assert await transport.receive() is None
    assert await timed(transport.close(4000, "late")) == 0
    frames = server_frames(await drained(relay_stream, agent))
    assert frames == [(CLOSE, close_payload(1000))]


# -- the simple-frame codec (relayd.front.websocket_wire.parse_simple_frame, text_frame) ---------


def client_text_frame(text: str) -> bytes:
    """What a real WebSocket client sends for ``text``: one masked frame."""
    return Connection(ConnectionType.CLIENT).send(TextMessage(data=text))


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=70_000))
@settings(max_examples=60, deadline=None)
def test_a_simple_frame_parses_to_what_the_client_sent(text: str) -> None:
    frame = client_text_frame(text)
    buffer = bytearray(frame + b"\x81")  # and the start of the next frame
    assert parse_simple_frame(buffer, 1 << 20) == (text, len(frame))
    for cut in (0, 1, len(frame) // 2, len(frame) - 1):
        assert parse_simple_frame(bytearray(frame[:cut]), 1 << 20) is None


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_break_the_simple_frame_parser(data: bytes) -> None:
    try:
        parsed = parse_simple_frame(bytearray(data), 1 << 20)
    except (NotSimpleFrame, FrameError):
        return
    if parsed is not None:
        text, used = parsed
        ws = Connection(ConnectionType.SERVER)
        ws.receive_data(data[:used])
        events = list(ws.events())
        assert [type(event) for event in events] == [TextMessage]
        assert events[0].data == text


@pytest.mark.parametrize(
    "frame",
    [
        bytes((0x82, 0x80)) + b"mask",  # binary
        bytes((0x01, 0x80)) + b"mask",  # a first fragment
        bytes((0x89, 0x80)) + b"mask",  # ping
        bytes((0x88, 0x80)) + b"mask",  # close
        bytes((0xC1, 0x80)) + b"mask",  # a reserved bit
        bytes((0x81, 0x00)),  # unmasked
        bytes((0x81, 0xFE, 0x00, 0x05)) + b"mask" + b"hello",  # length not minimal
    ],
    ids=["binary", "fragment", "ping", "close", "rsv", "unmasked", "long-length"],
)
def test_frames_that_are_not_simple_go_to_wsproto(frame: bytes) -> None:
    with pytest.raises(NotSimpleFrame):
        parse_simple_frame(bytearray(frame), 1 << 20)


def test_simple_frame_limits() -> None:
    with pytest.raises(FrameError) as too_big:
        parse_simple_frame(bytearray(client_text_frame("x" * 11)), 10)
    assert too_big.value.code == 1009
    assert parse_simple_frame(bytearray(client_text_frame("é" * 10)), 10) is not None
    bad = bytearray((0x81, 0x82)) + b"\x00\x00\x00\x00" + b"\xff\xfe"  # mask of zeros
    with pytest.raises(FrameError) as not_utf8:
        parse_simple_frame(bad, 10)
    assert not_utf8.value.code == 1007


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=70_000))
@settings(max_examples=60, deadline=None)
def test_text_frame_is_what_a_client_reads(text: str) -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(text_frame(text))
    events = list(client.events())
    assert [type(event) for event in events] == [TextMessage]
    assert events[0].data == text


# -- read_some after a read that took everything -----------------------------------------


async def test_a_drained_read_waits_for_data_and_still_gets_what_was_there() -> None:
    relay_socket, agent_socket = trio.socket.socketpair()
    relay, agent = trio.SocketStream(relay_socket), trio.SocketStream(agent_socket)
    with trio.fail_after(5):
        # Data already there: the wait ends at once and the read takes it.
        await agent.send_all(b"pong")
        assert await read_some(relay, 1024, drained=True) == b"pong"
        # Nothing there yet: it waits for the peer instead of failing a read.
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.05)
                await agent.send_all(b"reply")

            nursery.start_soon(later)
            assert await read_some(relay, 1024, drained=True) == b"reply"
        # The peer gone: the end of the stream, as without the hint.
        await agent.aclose()
        assert await read_some(relay, 1024, drained=True) == b""
    await relay.aclose()
    assert await read_some(relay, 1024, drained=True) == b""  # closed under us
