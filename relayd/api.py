"""The HTTP API: routes, authentication, and domain errors mapped to statuses.

``create_asgi_app(state)`` is the whole server: the hot paths (``/api/ask``,
agent WebSockets) are bare ASGI endpoints, the rest is the Quart-Trio
application of ``create_app(state)``. Neither keeps globals
(everything comes from the :class:`~relayd.state.RelayState` passed in) and owns
no agent lifetimes. Every answer, errors included, is JSON; every error is
``{"error": "<text>"}`` with a status that says what happened.

Bodies are parsed as JSON whatever the Content-Type says: the seed's clients
(``curl -d``) send ``application/x-www-form-urlencoded``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

import trio
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relayd import __version__
from relayd.agents.auth import agent_key_from_path
from relayd.asgi import AsgiApp, Receive, Scope, Send
from relayd.ask import DISCARD_WAIT, AskEndpoint
from relayd.config import Config
from relayd.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RelayError,
    RequestTimeout,
    body_late,
    retry_after_header,
)
from relayd.front.agent_endpoint import AgentEndpoint, deny_websocket
from relayd.openai_api import ChatCompletionsEndpoint, models_listing, openai_error
from relayd.proxies import TrustedProxies
from relayd.state import RelayState
from relayd.users import UserStoreError
from relayd.web import (
    STATUS,
    Gate,
    error_body,
    optional_string,
    parse_json_object,
    redact_path,
    rfc3339,
    status_of,
    token_from_header,
)

__all__ = ["STATUS", "AsgiApp", "agent_endpoint", "create_app", "create_asgi_app", "rfc3339"]

log = logging.getLogger("relayd.api")


def error_response(status: int, message: str, retry_after: float | None = None) -> Response:
    response = Response(error_body(message), status=status, content_type="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after_header(retry_after)
    return response


def v1_error(status: int, message: str, retry_after: float | None = None) -> Response:
    """An error on a /v1 route, in OpenAI's shape (the SDKs parse it)."""
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    response = Response(
        openai_error(message, status, code=code), status=status, content_type="application/json"
    )
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after_header(retry_after)
    return response


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


async def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type.

    Raises BadRequest (not JSON, not an object) or PayloadTooLarge.
    """
    try:
        raw = await request.get_data(cache=False, as_text=False)
    except HTTPException as error:
        if error.code == 413:
            raise PayloadTooLarge(
                f"request body larger than server.max_body ({request.max_content_length} bytes)"
            ) from None
        if error.code == 408:
            raise RequestTimeout(body_late(request.body_timeout or 0)) from None
        raise
    return parse_json_object(raw if isinstance(raw, bytes) else raw.encode())


def create_app(state: RelayState) -> Quart:
    """The API application for ``state``. See the module docstring."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = state.config.server.max_body
    app.config["BODY_TIMEOUT"] = state.config.server.body_timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    def on_reload(config: Config) -> None:
        app.config["MAX_CONTENT_LENGTH"] = config.server.max_body
        app.config["BODY_TIMEOUT"] = config.server.body_timeout

    state.reload_hooks.append(on_reload)

    gate = Gate(state)

    def require_admin(document: dict[str, Any] | None = None) -> None:
        """The admin key from ``Authorization: Bearer``, the body or the query."""
        candidates = []
        token = token_from_header(request.headers.get("Authorization"))
        if token is not None:
            candidates.append(token)
        if document is not None and "admin_key" in document:
            if not isinstance(document["admin_key"], str):
                raise BadRequest("admin_key must be a string")
            candidates.append(document["admin_key"])
        if "admin_key" in request.args:
            candidates.append(request.args["admin_key"])
        gate.admin(candidates, request.remote_addr or "unix", request.path)

    async def drop_body() -> None:
        """Read and drop the body of a request refused before it (bounded: the
        refusal must not wait on a slow client), so that the connection can
        carry the next request. If it did not come whole, the front's h11
        connection adds ``Connection: close`` to the answer (relayd.front.server):
        the connection cannot carry another."""
        with trio.move_on_after(DISCARD_WAIT), contextlib.suppress(HTTPException):
            await request.get_data(cache=False)

    async def admin_body() -> dict[str, Any]:
        """The JSON body of an admin POST, the admin key checked.

        A key in the ``Authorization`` header or the query is checked before
        the body is read, so a wrong one is a 401 whatever the body holds;
        only without one does the key come from the body's ``admin_key``.
        """
        if request.headers.get("Authorization") or "admin_key" in request.args:
            try:
                require_admin()
            except RelayError:
                await drop_body()  # so that the connection can carry the next request
                raise
            return await read_json_object()
        document = await read_json_object()
        require_admin(document)
        return document

    @app.errorhandler(RelayError)
    async def relay_error(error: RelayError) -> Response:
        status = status_of(error)
        if request.path.startswith("/v1/"):
            response = v1_error(status, error.message, error.retry_after)
        else:
            response = error_response(status, error.message, error.retry_after)
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status in (404, 405):
            # Refused by the router, before anything read the body: Hypercorn
            # can carry the next request only once it has been read.
            await drop_body()
        if status == 413:
            message = (
                f"request body larger than server.max_body ({state.config.server.max_body} bytes)"
            )
        elif status == 404:
            message = f"no route {redact_path(request.path)}"
        elif status == 405:
            message = f"method {request.method} not allowed on {redact_path(request.path)}"
        else:
            message = error.description or error.name
        if request.path.startswith("/v1/"):
            response = v1_error(status, message)
        else:
            response = error_response(status, message)
        if status == 405 and error.get_headers():
            for name, value in error.get_headers():
                if name.lower() == "allow":
                    response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.error(
            "unhandled error on %s %s", request.method, redact_path(request.path), exc_info=error
        )
        return error_response(500, "internal error; see the relayd log")

    @app.get("/health")
    async def health() -> Response:
        return Response("OK", content_type="text/plain")

    @app.get("/api/connections")
    async def connections() -> Response:
        require_admin()
        dispatcher = state.dispatcher
        listing = []
        for session in dispatcher.pool:
            listing.append(
                {
                    "Ws": {},
                    "Id": session.agent_id,
                    "Heartbeat": rfc3339(session.last_pong_at or session.connected_at),
                    "LastMessageTime": rfc3339(session.last_message_at),
                    "inflight": session.inflight,
                    "capacity": session.capacity,
                    "remote": session.remote,
                    "connected_at": rfc3339(session.connected_at),
                    "conversations": dispatcher.conversations.count_for(session.agent_id),
                    "protocol": session.version,
                    "name": session.name,
                    "software": session.software,
                    "models": list(session.models),
                    "draining": session.draining,
                }
            )
        return json_response({"connections": listing})

    @app.post("/admin/users/add")
    async def add_user() -> Response:
        document = await admin_body()
        name = optional_string(document, "name")
        if name is not None and (len(name) > 200 or not name.isprintable()):
            raise BadRequest("name must be printable and at most 200 characters")
        try:
            user, token, table = await _store_call(state, lambda: state.store.add(name))
        except UserStoreError as error:
            log.error("cannot add a user: %s", error)
            raise
        state.set_users(table)
        log.info("user added: user=%s name=%s", user.user_id, name or "-")
        return json_response({"user_id": user.user_id, "token": token, "name": name})

    @app.post("/admin/users/delete")
    async def delete_user() -> Response:
        document = await admin_body()
        user_id = document.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            raise BadRequest("user_id must be a non-empty string")
        table = await _store_call(state, lambda: state.store.delete(user_id))
        if table is None:
            raise NotFound(f"no user {user_id}")
        state.set_users(table)
        log.info("user deleted: user=%s", user_id)
        return json_response({"message": "User deleted"})

    @app.get("/v1/models")
    async def v1_models() -> Response:
        gate.user(request.headers.get("Authorization"), request.remote_addr or "unix", request.path)
        return json_response(models_listing(state))

    @app.get("/admin/users")
    async def list_users() -> Response:
        require_admin()
        return json_response({"users": [user.public() for user in state.users.users]})

    @app.get("/")
    async def index() -> Response:
        return json_response({"name": "relayd", "version": __version__})

    return app


async def _store_call(state: RelayState, operation: Any) -> Any:
    """Run one users-file operation in a worker thread, one at a time here.

    It takes the file's cross-process lock and fsyncs: a ``relayd users add``
    in another process holding the lock must not freeze the event loop (every
    heartbeat and request). Serialising the daemon's own writers keeps the
    lock uncontended among them.
    """
    async with state.store_lock:
        return await trio.to_thread.run_sync(operation)


async def _no_websocket_route(scope: Scope, receive: Receive, send: Send) -> None:
    # Quart's error handlers assume an HTTP request; answer here.
    if (await receive())["type"] == "websocket.connect":
        message = f"no WebSocket route {redact_path(scope['path'])}"
        await deny_websocket(scope, send, 404, message)


async def _upgrade_required(send: Send) -> None:
    """An agent path asked without a WebSocket upgrade: say what the path is for
    (a 404 would read as "this endpoint does not exist")."""
    body = error_body(
        "agents connect here over WebSocket (a GET with Upgrade: websocket); "
        "API clients use /api/ask"
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
    ]
    await send({"type": "http.response.start", "status": 426, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _forwarded(scope: Scope, proxies: TrustedProxies) -> Scope:
    """The scope with the client behind a trusted proxy (X-Forwarded-For)."""
    client = scope.get("client")
    if not client:
        return scope
    forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
    if not forwarded:
        return scope
    real = proxies.client(client[0], forwarded)
    if real == client[0]:
        return scope
    return {**scope, "client": (real, 0)}


def _has_conflicting_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both ``Transfer-Encoding`` and ``Content-Length``: RFC 9112, 6.3 says the
    request must be rejected or its connection closed after it, since a proxy
    in front may have framed it the other way (request smuggling)."""
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


async def _refuse_framing(scope: Scope, receive: Receive, send: Send) -> None:
    """400 and ``Connection: close``, without reading the body: Hypercorn then
    closes the connection, and nothing sent after the request is served."""
    message = "a request with both Transfer-Encoding and Content-Length is refused"
    log.info("request refused: %s path=%s", message, redact_path(scope["path"]))
    if scope["type"] == "websocket":
        if (await receive())["type"] == "websocket.connect":
            await deny_websocket(scope, send, 400, message)
        return
    body = error_body(message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _origin_form(scope: Scope) -> Scope:
    """A request target in absolute form (``POST http://host/api/ask``, RFC 9112,
    3.2.2) served as its path; other targets (``*``) are left as they are."""
    scheme, separator, rest = scope["path"].partition("://")
    if not separator or scheme.lower() not in ("http", "https", "ws", "wss"):
        return scope
    path = "/" + rest.partition("/")[2]
    raw_path: bytes = scope.get("raw_path") or b""
    _, _, raw_rest = raw_path.partition(b"://")
    raw = b"/" + raw_rest.partition(b"/")[2]
    return {**scope, "path": path, "raw_path": raw.partition(b"?")[0]}


def agent_endpoint(state: RelayState) -> AgentEndpoint:
    """The agents' endpoint; the daemon also hands it to the server loop (wire path)."""
    return AgentEndpoint(
        state.dispatcher, lambda: state.agent_keys, state.throttle, lambda: state.proxies
    )


def create_asgi_app(
    state: RelayState,
    agents: AgentEndpoint | None = None,
    ask: AskEndpoint | None = None,
    chat: ChatCompletionsEndpoint | None = None,
) -> AsgiApp:
    """The whole server: ``/api/ask`` and agent WebSockets served bare (the hot
    paths), everything else by Quart. The daemon passes the endpoints it also
    serves on the wire path."""
    quart_app = create_app(state)
    if agents is None:
        agents = agent_endpoint(state)
    if ask is None:
        ask = AskEndpoint(state)
    if chat is None:
        chat = ChatCompletionsEndpoint(state)

    def relayd_app(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Returns the handler's coroutine rather than awaiting it: one frame fewer
        # on every connection's stack (memory per idle agent is a measured target).
        kind = scope["type"]
        if kind in ("http", "websocket"):
            if state.proxies:
                scope = _forwarded(scope, state.proxies)
            if _has_conflicting_framing(scope["headers"]):
                return _refuse_framing(scope, receive, send)
            if not scope["path"].startswith("/"):
                scope = _origin_form(scope)
        if kind == "http":
            if scope["path"] == "/api/ask":
                return ask(scope, receive, send)
            if scope["path"] == "/v1/chat/completions":
                return chat(scope, receive, send)
            if agent_key_from_path(scope["path"])[0]:
                return _upgrade_required(send)
        if kind == "websocket":
            if agent_key_from_path(scope["path"])[0]:
                return agents(scope, receive, send)
            return _no_websocket_route(scope, receive, send)
        return quart_app(scope, receive, send)  # type: ignore[arg-type]

    return relayd_app
