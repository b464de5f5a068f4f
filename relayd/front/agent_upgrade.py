"""The HTTP side of an agent's WebSocket upgrade, without I/O.

relayd serves agent connections on its own wire path (:mod:`relayd.front.websocket_wire`)
rather than through Hypercorn's ASGI WebSocket stack, which costs a second task,
a message queue and several layers per frame on every agent. That path starts
here: :func:`parse_agent_upgrade` reads a connection's first request head and
says whether it is a plain, well-formed upgrade to an agent path. Anything else
(another path, a body, an unusual header) is left to Hypercorn, which answers
it exactly as it always has; this module only has to be right about what it
accepts, never about what it declines. Bytes sent after the head, before the
``101`` (which RFC 6455 forbids), come back as ``early_data`` for the caller
to refuse.

The responses are built here too: the ``101 Switching Protocols`` that accepts
an agent, and the JSON error that refuses one before the upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import h11
from wsproto.utilities import generate_accept_token

from relayd.agents.auth import agent_key_from_path
from relayd.errors import retry_after_header
from relayd.front.http1 import MAX_HEAD

__all__ = [
    "AgentUpgrade",
    "accept_response",
    "may_be_agent_upgrade",
    "offered_subprotocols",
    "parse_agent_upgrade",
    "refusal_body",
    "refusal_headers",
    "refusal_response",
]

_PREFIXES = (b"GET /client/register", b"GET /agent/")
_WEBSOCKET_VERSION = b"13"


@dataclass(frozen=True, slots=True)
class AgentUpgrade:
    """A valid WebSocket upgrade request for an agent path."""

    path: str  # percent-decoded, like an ASGI scope's "path"
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    key: bytes  # Sec-WebSocket-Key
    # Bytes the client sent after the head without waiting for the 101: RFC 6455
    # forbids it, and the connection is refused with a 400.
    early_data: bytes = b""


def may_be_agent_upgrade(first_bytes: bytes) -> bool:
    """Whether a connection's first bytes are worth reading the whole head for."""
    return first_bytes.startswith(_PREFIXES)


def parse_agent_upgrade(head: bytes) -> AgentUpgrade | None:
    """The upgrade in ``head`` (a connection's first bytes), or None to leave it alone.

    None unless ``head`` is one complete ``GET`` request over HTTP/1.1 with no
    body, carrying a version 13 WebSocket upgrade, to ``/client/register`` or
    ``/agent/<key>/client/register``. Bytes after the head are returned as
    ``early_data``.
    """
    if len(head) > MAX_HEAD:
        return None
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        connection.receive_data(head)
        request = connection.next_event()
        if not isinstance(request, h11.Request):
            return None
        end = connection.next_event()
        if not isinstance(end, h11.EndOfMessage) or connection.next_event() is not h11.PAUSED:
            return None
    except h11.RemoteProtocolError:
        return None
    if request.method != b"GET" or request.http_version != b"1.1":
        return None
    raw_path, _, query = request.target.partition(b"?")
    path = unquote(raw_path.decode("ascii"))  # h11 admits only visible ASCII in a target
    if not agent_key_from_path(path)[0]:
        return None
    headers = list(request.headers)
    key: bytes | None = None
    connection_upgrade = websocket = version_ok = False
    for name, value in headers:
        if name == b"connection":
            connection_upgrade |= any(
                token.strip().lower() == b"upgrade" for token in value.split(b",")
            )
        elif name == b"upgrade":
            websocket = value.strip().lower() == b"websocket"
        elif name == b"sec-websocket-version":
            version_ok = value.strip() == _WEBSOCKET_VERSION
        elif name == b"sec-websocket-key":
            key = value.strip()
        elif name in (b"content-length", b"transfer-encoding"):
            return None  # an upgrade request has no body, not even an empty one
    if not (connection_upgrade and websocket and version_ok and key):
        return None
    early_data = bytes(connection.trailing_data[0])
    return AgentUpgrade(path=path, query=query, headers=headers, key=key, early_data=early_data)


def offered_subprotocols(upgrade: AgentUpgrade) -> list[str]:
    """The subprotocols the agent offered (``Sec-WebSocket-Protocol``), in its order."""
    offered: list[str] = []
    for name, value in upgrade.headers:
        if name == b"sec-websocket-protocol":
            offered += [token.strip() for token in value.decode("latin-1").split(",")]
    return [token for token in offered if token]


def accept_response(upgrade: AgentUpgrade, subprotocol: str | None = None) -> bytes:
    """The ``101`` that completes the upgrade, with the chosen subprotocol if any
    (no extension)."""
    chosen = b""
    if subprotocol is not None:
        chosen = b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n"
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        + chosen
        + b"Sec-WebSocket-Accept: "
        + generate_accept_token(upgrade.key)
        + b"\r\n\r\n"
    )


def refusal_headers(
    status: int, body: bytes, retry_after: float | None = None
) -> list[tuple[bytes, bytes]]:
    """Headers of a refused upgrade's JSON error (both wire and ASGI paths)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="relayd agents"'))
    if retry_after is not None:
        headers.append((b"retry-after", retry_after_header(retry_after).encode()))
    return headers


def refusal_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def refusal_response(status: int, message: str, retry_after: float | None = None) -> bytes:
    """A complete HTTP response refusing the upgrade; the connection closes after it."""
    body = refusal_body(message)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in refusal_headers(status, body, retry_after)]
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
