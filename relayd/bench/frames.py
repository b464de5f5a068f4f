"""WebSocket frames for the bench's lean v2 agents (:mod:`relayd.bench.stream`)
and its bare forwarding loop (:mod:`relayd.bench.bareloop`): whole frames only.

Frames the agents send carry a zero masking key. RFC 6455 wants an
unpredictable one (against proxies that cache); the relay cannot tell, and it
unmasks every frame the same way whatever the key (relayd.front.websocket_wire XORs
the payload with it, wsproto too), so the key changes nothing of the relay's
cost and saves the bench an XOR per frame.
"""

from __future__ import annotations

__all__ = [
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "SUBPROTOCOL",
    "TEXT_HEADS",
    "FrameError",
    "client_frame",
    "parse_frame",
    "server_frame",
]

SUBPROTOCOL = b"relayd.v2"

# -- WebSocket frames --------------------------------------------------------------------

_ZERO_MASK = b"\0\0\0\0"
# A masked text frame's head for each short length (what every delta uses).
TEXT_HEADS = [bytes((0x81, 0x80 | length)) + _ZERO_MASK for length in range(126)]
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A client's (masked, with a zero key) final frame carrying ``payload``."""
    length = len(payload)
    if opcode == OP_TEXT and length < 126:
        return TEXT_HEADS[length] + payload
    first = 0x80 | opcode
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = bytes((first, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + _ZERO_MASK + payload


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A server's (unmasked) final frame carrying ``payload``."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big") + payload
    return bytes((first, 127)) + length.to_bytes(8, "big") + payload


class FrameError(Exception):
    """A frame the bench's agents and bare loop do not take (fragmented, too big)."""


def parse_frame(buffer: bytes | bytearray, start: int = 0) -> tuple[int, bytes, int] | None:
    """The frame at ``buffer[start:]``: ``(opcode, payload unmasked, end)``, or None
    while it is incomplete. Raises :class:`FrameError` for a fragment."""
    if len(buffer) - start < 2:
        return None
    first, second = buffer[start], buffer[start + 1]
    if not first & 0x80:
        raise FrameError("fragmented frames are not supported")
    length = second & 0x7F
    position = start + 2
    if length == 126:
        if len(buffer) < position + 2:
            return None
        length = int.from_bytes(buffer[position : position + 2], "big")
        position += 2
    elif length == 127:
        if len(buffer) < position + 8:
            return None
        length = int.from_bytes(buffer[position : position + 8], "big")
        position += 8
    masked = second & 0x80
    end = position + (4 if masked else 0) + length
    if len(buffer) < end:
        return None
    if not masked:
        return first & 0x0F, bytes(buffer[position:end]), end
    key = bytes(buffer[position : position + 4]) * (length // 4 + 1)
    payload = int.from_bytes(buffer[position + 4 : end], "little") ^ int.from_bytes(
        key[:length], "little"
    )
    return first & 0x0F, payload.to_bytes(length, "little"), end
