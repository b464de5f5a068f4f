"""The agent WebSocket endpoint, as a bare ASGI application.

Agents are served without Quart: the route is on the hot path of every idle
agent (memory per connection) and Quart's WebSocket wrapper cancels the
handler's nursery on return and hides the disconnect message. Here the ASGI
messages are adapted to the session's :class:`Transport` directly and the
handler returns only when the session is over.

A refused agent gets an HTTP 401/403 with ``{"error": ...}`` before the
upgrade (the ASGI ``websocket.http.response`` extension, which Hypercorn
implements), and a warning in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from relayd.agents.auth import AgentKeys, AgentRefusal
from relayd.agents.session import AgentSession, SessionHost
from relayd.errors import retry_after_header
from relayd.throttle import FailureThrottle

__all__ = ["AgentEndpoint", "AsgiTransport", "deny_websocket"]

log = logging.getLogger("relayd.agents")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AsgiTransport:
    """The session's Transport over ASGI WebSocket messages."""

    __slots__ = ("_closed", "_receive", "_send", "close_code")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        self.close_code: int | None = None

    async def accept(self) -> bool:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self._closed = True
            return False
        try:
            await self._send({"type": "websocket.accept"})
        except Exception as error:  # Hypercorn already refused the upgrade (e.g. a 400)
            log.info("agent upgrade failed: %s", type(error).__name__)
            self._closed = True
            return False
        return True

    async def receive(self) -> str | bytes | None:
        while not self._closed:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    return str(text)
                return bytes(message.get("bytes") or b"")
            if kind == "websocket.disconnect":
                self._closed = True
                self.close_code = message.get("code")
        return None

    async def send(self, text: str) -> None:
        if not self._closed:
            await self._send({"type": "websocket.send", "text": text})
        # Once the peer has gone, Hypercorn's send returns without a checkpoint;
        # a caller that only sends must still yield to the scheduler.
        await trio.lowlevel.checkpoint()

    async def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class AgentEndpoint:
    """``/client/register`` and ``/agent/<key>/client/register`` for WebSocket scopes."""

    def __init__(
        self, host: SessionHost, keys: Callable[[], AgentKeys], throttle: FailureThrottle
    ) -> None:
        self._host = host
        self._keys = keys
        self._throttle = throttle

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The coroutine that serves this connection.

        Deliberately not ``async``: the credentials are in the scope, so the
        check needs no await, and returning the session's own coroutine keeps
        one frame fewer on the stack of every connected agent (memory per idle
        agent is a measured target).
        """
        client = scope.get("client")
        address = client[0] if client else "unix"
        remote = f"{client[0]}:{client[1]}" if client else "unix"
        wait = self._throttle.retry_after(address, trio.current_time())
        if wait is not None:
            log.warning("agent refused: too many failed attempts remote=%s", remote)
            return _refuse(scope, receive, send, 429, "too many failed attempts", wait)
        credential = self._keys().authenticate(
            path=scope["path"],
            query=scope.get("query_string", b""),
            headers=scope.get("headers", []),
            client_host=client[0] if client else None,
        )
        if isinstance(credential, AgentRefusal):
            self._throttle.failed(address, trio.current_time())
            log.warning(
                "agent refused: status=%d reason=%s remote=%s",
                credential.status,
                credential.reason,
                remote,
            )
            return _refuse(scope, receive, send, credential.status, credential.reason)
        session = AgentSession(
            AsgiTransport(receive, send), self._host, credential=credential, remote=remote
        )
        return session.run()


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    retry_after: float | None = None,
) -> None:
    if (await receive())["type"] == "websocket.connect":
        await deny_websocket(scope, send, status, message, retry_after)


async def deny_websocket(
    scope: Scope, send: Send, status: int, message: str, retry_after: float | None = None
) -> None:
    """Refuse a WebSocket upgrade with an HTTP status and ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="relayd agents"'))
        if retry_after is not None:
            headers.append((b"retry-after", retry_after_header(retry_after).encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
