"""stream-32's ceiling: a bare forwarding loop between v2 agents and HTTP clients.

``python -m relayd.bench.bareloop --listen fd://N`` takes the same agents as
relayd (a WebSocket upgrade offering ``relayd.v2`` on ``/client/register``,
``hello`` answered with ``welcome``) and the same streamed questions
(``POST /api/ask``, any body, keep-alive), and does the least a relay can:
no authentication, no dispatch (the first free agent), no JSON parsing. A
question's body goes to the agent inside a ``request`` frame; then the
client's task copies the agent's frames to the client's socket: every text
frame becomes one chunk holding one server-sent event (``delta``, or
``done`` for the frame that starts ``{"type":"done"``, which ends the
answer), and what one read from the agent brought goes out in one write.
That is framing and nothing else: what a Trio task forwarding a stream costs
on this machine.

Like :mod:`relayd.bench.baseline` it says ``READY=1`` to ``$NOTIFY_SOCKET`` once
listening and stops on SIGTERM or SIGINT. It never pings its agents.
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import socket
import sys
from dataclasses import dataclass, field
from functools import partial

import trio
from wsproto.utilities import generate_accept_token

from relayd.bench.frames import (
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    SUBPROTOCOL,
    FrameError,
    parse_frame,
    server_frame,
)
from relayd.front.sockets import read_some, write_now
from relayd.systemd import Notifier

__all__ = ["main"]

RECEIVE_SIZE = 65536
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
_EVENT_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_DELTA = b"event: delta\ndata: "
_DONE = b"event: done\ndata: "
_ERROR = b"event: error\ndata: "
_LAST_CHUNK = b"0\r\n\r\n"


@dataclass(eq=False)
class BareAgent:
    stream: trio.SocketStream
    inbox: bytearray
    gone: trio.Event = field(default_factory=trio.Event)


@dataclass
class Pool:
    """Free agents, first come first served."""

    send: trio.MemorySendChannel[BareAgent]
    receive: trio.MemoryReceiveChannel[BareAgent]
    ids: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def new(cls) -> Pool:
        send, receive = trio.open_memory_channel[BareAgent](math.inf)
        return cls(send, receive)


def _event_chunk(prefix: bytes, payload: bytes) -> bytes:
    return b"%x\r\n" % (len(prefix) + len(payload) + 2) + prefix + payload + b"\n\n\r\n"


async def _write(stream: trio.SocketStream, data: bytes) -> bool:
    written = write_now(stream, data)
    if written is None:
        return False
    if written < len(data):
        try:
            await stream.send_all(data[written:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return True


async def _read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next request head (without its blank line), taken out of ``buffer``;
    None when the connection ends first."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            return None
        data = await read_some(stream, RECEIVE_SIZE)
        if not data:
            return None
        buffer += data
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    return head


def _headers(head: bytes) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def handle(pool: Pool, stream: trio.SocketStream) -> None:
    buffer = bytearray()
    head = await _read_head(stream, buffer)
    if head is None:
        return
    if head.startswith(b"GET "):
        await _agent(pool, stream, head, buffer)
    else:
        await _client(pool, stream, head, buffer)


async def _agent(pool: Pool, stream: trio.SocketStream, head: bytes, buffer: bytearray) -> None:
    headers = _headers(head)
    key = headers.get(b"sec-websocket-key")
    offered = [token.strip() for token in headers.get(b"sec-websocket-protocol", b"").split(b",")]
    if key is None or SUBPROTOCOL not in offered:
        await _write(stream, b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        return
    accept = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: " + SUBPROTOCOL + b"\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )
    if not await _write(stream, accept):
        return
    while (parsed := parse_frame(buffer)) is None:  # the hello (not read: any will do)
        data = await read_some(stream, RECEIVE_SIZE)
        if not data:
            return
        buffer += data
    del buffer[: parsed[2]]
    welcome = b'{"type":"welcome","agent_id":"bare-%d","heartbeat":15}' % next(pool.ids)
    if not await _write(stream, server_frame(welcome)):
        return
    agent = BareAgent(stream, buffer)
    pool.send.send_nowait(agent)
    await agent.gone.wait()  # the clients' tasks use the socket; it closes on return


async def _client(pool: Pool, stream: trio.SocketStream, head: bytes, buffer: bytearray) -> None:
    numbers = itertools.count()
    while True:
        headers = _headers(head)
        length_text = headers.get(b"content-length", b"0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY:
            await _write(stream, b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
            return
        length = int(length_text)
        while len(buffer) < length:
            data = await read_some(stream, RECEIVE_SIZE)
            if not data:
                return
            buffer += data
        body = bytes(buffer[:length])
        del buffer[:length]
        agent = await pool.receive.receive()
        request = b'{"type":"request","id":"%d","kind":"ask","body":' % next(numbers)
        if not await _write(agent.stream, server_frame(request + body + b"}")):
            agent.gone.set()
            return
        answered, written = await forward(agent, stream)
        if answered:
            pool.send.send_nowait(agent)
        else:
            agent.gone.set()
        if not written or b"close" in headers.get(b"connection", b"").lower():
            return
        next_head = await _read_head(stream, buffer)
        if next_head is None:
            return
        head = next_head


async def forward(agent: BareAgent, client: trio.SocketStream) -> tuple[bool, bool]:
    """Copy ``agent``'s frames to ``client`` as events until its ``done``:
    (the agent answered, the client took it all)."""
    inbox = agent.inbox
    out: list[bytes] = []
    head = _EVENT_STREAM_HEAD  # goes out with the first event
    finished = answered = False
    while True:
        position = 0
        try:
            while not finished and (parsed := parse_frame(inbox, position)) is not None:
                opcode, payload, position = parsed
                if opcode == OP_TEXT:
                    if payload.startswith(b'{"type":"delta"'):
                        out.append(_event_chunk(_DELTA, payload))
                    else:
                        done = payload.startswith(b'{"type":"done"')
                        out.append(_event_chunk(_DONE if done else _ERROR, payload))
                        finished = answered = True
                elif opcode == OP_CLOSE:
                    out.append(_event_chunk(_ERROR, b'{"error": "the agent left"}'))
                    finished = True
                elif opcode == OP_PING:
                    await _write(agent.stream, server_frame(payload, 0xA))
        except FrameError as error:
            out.append(_event_chunk(_ERROR, b'{"error": "%s"}' % str(error).encode()))
            finished = True
        del inbox[:position]
        if finished:
            out.append(_LAST_CHUNK)
        if out:
            if not await _write(client, head + b"".join(out)):
                return answered, False
            out.clear()
            head = b""
        if finished:
            return answered, True
        data = await read_some(agent.stream, RECEIVE_SIZE)
        if not data:
            out.append(_event_chunk(_ERROR, b'{"error": "the agent left"}'))
            finished = True
        inbox += data


async def _serve(fd: int) -> None:
    listening = socket.socket(fileno=fd)
    listening.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listening))
    pool = Pool.new()
    with (
        Notifier.from_environ(unset_environment=True) as notifier,
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_listeners, partial(handle, pool), [listener]))
            notifier.ready()
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relayd.bench.bareloop")
    parser.add_argument("--listen", required=True, metavar="fd://N", help="a listening socket")
    args = parser.parse_args(argv)
    if not args.listen.startswith("fd://") or not args.listen[5:].isdigit():
        parser.error("--listen takes fd://N")
    trio.run(_serve, int(args.listen[5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
