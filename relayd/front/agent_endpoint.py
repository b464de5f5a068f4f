"""The agent WebSocket endpoint: on the wire path, or as a bare ASGI application.

Agents are served without Quart: the route is on the hot path of every idle
agent (memory per connection) and Quart's WebSocket wrapper cancels the
handler's nursery on return and hides the disconnect message. Usually an
agent's connection does not reach Hypercorn's WebSocket stack either (see
:mod:`relayd.front.websocket_wire`); when it does, the ASGI messages are adapted to the
session's :class:`Transport` directly and the handler returns only when the
session is over.

A refused agent gets an HTTP 401/403 with ``{"error": ...}`` before the
upgrade (the ASGI ``websocket.http.response`` extension, which Hypercorn
implements), and a warning in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from relayd.agents.auth import AgentKeys, AgentRefusal
from relayd.agents.session import AgentSession, SessionHost
from relayd.asgi import Receive, Scope, Send
from relayd.front.agent_upgrade import (
    accept_response,
    may_be_agent_upgrade,
    offered_subprotocols,
    parse_agent_upgrade,
    refusal_body,
    refusal_headers,
    refusal_response,
)
from relayd.front.sockets import ConnectionTerms, WriteLimits
from relayd.front.websocket_wire import WireTransport
from relayd.protocol import CloseCode
from relayd.protocol.v2 import SUBPROTOCOL
from relayd.proxies import TrustedProxies
from relayd.throttle import FailureThrottle

__all__ = ["AgentEndpoint", "AsgiTransport", "Refusal", "deny_websocket"]

log = logging.getLogger("relayd.agents")


class AsgiTransport:
    """The session's Transport over ASGI WebSocket messages."""

    __slots__ = ("_closed", "_receive", "_send", "close_code", "code_unknown", "failure", "on_pong")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        self.close_code: int | None = None
        self.failure: tuple[int, str] | None = None  # Hypercorn fails connections itself
        self.code_unknown = False  # Hypercorn did not say how the agent closed
        # ASGI cannot send a WebSocket ping, so protocol v2 is never offered here.
        self.on_pong: Callable[[], None] | None = None

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
                # Hypercorn reports 1006 for every end it did not start, a polite
                # close frame included: the agent's own code is not known here.
                code = message.get("code")
                self.close_code = None if code == CloseCode.ABNORMAL_CLOSURE else code
                self.code_unknown = code == CloseCode.ABNORMAL_CLOSURE
        return None

    async def send(self, text: str) -> None:
        if not self._closed:
            await self._send({"type": "websocket.send", "text": text})
        # Once the peer has gone, Hypercorn's send returns without a checkpoint;
        # a caller that only sends must still yield to the scheduler.
        await trio.lowlevel.checkpoint()

    def send_nowait(self, text: str) -> Awaitable[None] | None:
        # Hypercorn's connection lock keeps frames whole and in order.
        return self.send(text)

    def ping_nowait(self) -> Awaitable[None] | None:
        raise NotImplementedError("ASGI has no WebSocket ping: v2 is not offered on this path")

    async def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an agent is turned away before the upgrade."""

    status: int
    reason: str
    retry_after: float | None = None


class AgentEndpoint:
    """``/client/register`` and ``/agent/<key>/client/register``.

    Served two ways: :meth:`server_for` takes an agent's connection from the server
    loop and runs it on the wire path (:mod:`relayd.front.websocket_wire`, the usual
    case); calling the endpoint as an ASGI app serves an upgrade that reached
    Hypercorn instead (one sent after another request on a keep-alive
    connection, or one the wire path's strict parser declined).
    """

    def __init__(
        self,
        host: SessionHost,
        keys: Callable[[], AgentKeys],
        throttle: FailureThrottle,
        proxies: Callable[[], TrustedProxies] = TrustedProxies,
    ) -> None:
        self._host = host
        self._keys = keys
        self._throttle = throttle
        self._proxies = proxies  # whose X-Forwarded-For to believe

    def check(
        self,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
    ) -> str | Refusal:
        """The connecting agent's credential, or why it is refused (logged here)."""
        address = client[0] if client else "unix"
        wait = self._throttle.retry_after(address, trio.current_time())
        if wait is not None:
            log.warning("agent refused: too many failed attempts remote=%s", _remote(client))
            return Refusal(429, "too many failed attempts", wait)
        credential = self._keys().authenticate(
            path=path, query=query, headers=headers, client_host=client[0] if client else None
        )
        if isinstance(credential, AgentRefusal):
            self._throttle.failed(address, trio.current_time())
            log.warning(
                "agent refused: status=%d reason=%s remote=%s",
                credential.status,
                credential.reason,
                _remote(client),
            )
            return Refusal(credential.status, credential.reason)
        return credential

    # -- the wire path (relayd.front.sockets.Takeover) -----------------------------

    def might_serve(self, first_bytes: bytes) -> bool:
        return may_be_agent_upgrade(first_bytes)

    def server_for(
        self,
        head: bytes,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        terms: ConnectionTerms,
    ) -> Awaitable[None] | None:
        """Serve an agent's connection directly, if ``head`` is a clean agent upgrade.

        Returns the session's own coroutine (one frame fewer on every agent).
        """
        upgrade = parse_agent_upgrade(head)
        if upgrade is None:
            return None
        writes = terms.writes
        if upgrade.early_data:
            log.info("agent upgrade refused: data before the 101 remote=%s", _remote(client))
            return _send_refusal(
                stream, writes, Refusal(400, "data sent before the upgrade was accepted")
            )
        forwarded = [value for name, value in upgrade.headers if name == b"x-forwarded-for"]
        if forwarded and client is not None:
            real = self._proxies().client(client[0], forwarded)
            if real != client[0]:
                client = (real, 0)
        verdict = self.check(upgrade.path, upgrade.query, upgrade.headers, client)
        if isinstance(verdict, Refusal):
            return _send_refusal(stream, writes, verdict)
        settings = self._host.agents_config()
        version = 2 if SUBPROTOCOL in offered_subprotocols(upgrade) else 1
        accept = accept_response(upgrade, SUBPROTOCOL if version == 2 else None)
        transport = WireTransport(stream, accept, writes, settings.max_message)
        session = AgentSession(
            transport, self._host, credential=verdict, remote=_remote(client), version=version
        )
        return session.run()

    # -- the ASGI path -------------------------------------------------------------------

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The coroutine that serves this connection.

        Deliberately not ``async``: the credentials are in the scope, so the
        check needs no await, and returning the session's own coroutine keeps
        one frame fewer on the stack of every connected agent.
        """
        client = scope.get("client")
        verdict = self.check(
            scope["path"], scope.get("query_string", b""), scope.get("headers", []), client
        )
        if isinstance(verdict, Refusal):
            return _refuse(scope, receive, send, verdict)
        session = AgentSession(
            AsgiTransport(receive, send), self._host, credential=verdict, remote=_remote(client)
        )
        return session.run()


def _remote(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix"


async def _send_refusal(stream: trio.abc.Stream, writes: WriteLimits, refusal: Refusal) -> None:
    await writes.send_all(
        stream, refusal_response(refusal.status, refusal.reason, refusal.retry_after)
    )


async def _refuse(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    if (await receive())["type"] == "websocket.connect":
        await deny_websocket(scope, send, refusal.status, refusal.reason, refusal.retry_after)


async def deny_websocket(
    scope: Scope, send: Send, status: int, message: str, retry_after: float | None = None
) -> None:
    """Refuse a WebSocket upgrade with an HTTP status and ``{"error": message}``."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = refusal_body(message)
        headers = refusal_headers(status, body, retry_after)
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
