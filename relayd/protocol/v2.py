"""Agent protocol v2 (``relayd.v2``), sans-I/O: both ends.

Negotiated in the WebSocket handshake (``Sec-WebSocket-Protocol: relayd.v2``);
docs/agents.md specifies it for agent writers. Every frame is one JSON object
in a text message, with a ``type``; unknown fields are ignored, so either side
may add some later.

Agent → relay: ``hello`` (first, once), ``update``, ``delta``, ``done``,
``error``, ``drain``. Relay → agent: ``welcome`` (the answer to ``hello``),
``request``, ``cancel``, ``goodbye``. Liveness is WebSocket ping/pong, below
this layer.

State table of :class:`RelayConnectionV2`::

    state        event                                      next state
    -----------  -----------------------------------------  -----------
    AWAIT_HELLO  receive hello                              HELLO
    HELLO        send welcome                               OPEN
    OPEN         send request / cancel                      OPEN
    OPEN         receive update / delta / done / error      OPEN
    OPEN         receive drain                              DRAINING
    DRAINING     send cancel; receive update/delta/done/error DRAINING
    OPEN         send goodbye                               GOING
    DRAINING     send goodbye                               GOING
    GOING        send cancel; receive delta / done / error  GOING
    any          connection_lost()                          CLOSED

A request may be sent only in OPEN. ``delta``, ``done`` and ``error`` must name
a request in flight; after ``cancel`` a request is no longer in flight, and a
late frame for it (the agent had not seen the cancel yet) is ignored rather
than an error, for as long as the last :data:`CANCELLED_REMEMBERED` cancels
are remembered. Any other move raises: :class:`LocalProtocolError` when we make
it, :class:`RemoteProtocolError` when the peer does; either leaves the state as
it was.

The relay's end collects each request's deltas, so that ``done`` without
``content`` still yields the whole answer (:class:`~relayd.protocol.Reply`).
"""

from __future__ import annotations

import enum
import json
import math
from collections import OrderedDict
from collections.abc import KeysView
from dataclasses import dataclass, field
from typing import Any

from relayd.jsontext import may_hold_surrogate, unencodable_string
from relayd.protocol.errors import (
    CloseCode,
    LocalProtocolError,
    RemoteProtocolError,
    UnsendableText,
)
from relayd.protocol.events import AgentError, Closed, Reply, Request

__all__ = [
    "CANCELLED_REMEMBERED",
    "ERROR_CODES",
    "MAX_CAPACITY",
    "SUBPROTOCOL",
    "AgentConnectionV2",
    "AgentHello",
    "Cancel",
    "ChatRequest",
    "Delta",
    "Drain",
    "Goodbye",
    "RelayConnectionV2",
    "Update",
    "V2State",
    "Welcome",
]

SUBPROTOCOL = "relayd.v2"
# Requests one agent may take at once, at most (what "capacity" may say).
MAX_CAPACITY = 1000
# Models one agent may announce, and the longest model id.
MAX_MODELS = 1000
MAX_MODEL_ID = 256
# How many cancelled request ids the relay remembers, to ignore their late frames.
CANCELLED_REMEMBERED = 1024
# The error codes of an ``error`` frame; an unknown one is read as "agent_error".
ERROR_CODES = frozenset(
    {
        "agent_error",
        "bad_request",
        "unsupported",
        "backend_unavailable",
        "backend_error",
        "timeout",
        "overloaded",
        "cancelled",
        "internal",
    }
)


class V2State(enum.Enum):
    AWAIT_HELLO = "awaiting the agent's hello"
    HELLO = "hello received, welcome not sent"
    OPEN = "open"
    DRAINING = "draining"
    GOING = "saying goodbye"
    CLOSED = "closed"


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentHello:
    """The agent's first frame: who it is and what it takes."""

    name: str
    version: str
    capacity: int
    models: tuple[str, ...]  # empty: any model
    resume: str | None = None  # the agent id it held before, when reconnecting

    def welcome(self, agent_id: str, heartbeat: float) -> Welcome:
        return Welcome(agent_id, heartbeat)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The relay's answer to :class:`AgentHello`: the agent's id (the resumed one
    when the relay let it resume) and the heartbeat period, in seconds."""

    agent_id: str
    heartbeat: float


@dataclass(frozen=True, slots=True)
class Update:
    """The agent's capacity or models changed (None: unchanged)."""

    capacity: int | None = None
    models: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    request_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Drain:
    """The agent takes no new work, finishes what it has, then closes."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """An OpenAI-style chat request: ``messages`` and ``params`` (max_tokens,
    temperature, top_p, stop, ...) are passed through untouched."""

    request_id: str
    model: str
    messages: tuple[dict[str, Any], ...]
    params: dict[str, Any] = field(default_factory=dict)

    def fail(self, code: str, message: str, *, retryable: bool = False) -> AgentError:
        return AgentError(self.request_id, message, code=code, retryable=retryable)


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The relay is going away; reconnect after ``reconnect_after`` seconds."""

    reason: str
    reconnect_after: float


# -- wire helpers ------------------------------------------------------------------------

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def _encode(document: dict[str, Any], what: str) -> str:
    text = _encoder.encode(document)
    if not text.isascii() and unencodable_string(document) is not None:
        raise UnsendableText(f"the {what} holds text that is not valid Unicode")
    return text


def _decode(text: str) -> dict[str, Any]:
    try:
        frame = _decoder.decode(text)
    except ValueError as error:
        raise RemoteProtocolError(f"frame is not JSON: {error}") from None
    except RecursionError:
        raise RemoteProtocolError("frame is nested too deeply") from None
    if not isinstance(frame, dict):
        raise RemoteProtocolError("frame is not a JSON object")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError("frame has no string 'type'")
    if may_hold_surrogate(text) and unencodable_string(kind) is not None:
        raise RemoteProtocolError("frame 'type' holds a lone surrogate: not Unicode")
    return frame


def _string(frame: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = frame.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{frame['type']!r} frame needs a string {name!r}")
    return value


def _text(frame: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    """A string field that is passed on (to a client, a log): it must be Unicode."""
    value = _string(frame, name, optional=optional)
    if value is not None and not value.isascii() and unencodable_string(value) is not None:
        raise RemoteProtocolError(f"{frame['type']!r} frame {name!r} is not valid Unicode")
    return value


def _capacity(frame: dict[str, Any]) -> int:
    value = frame.get("capacity")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAPACITY:
        raise RemoteProtocolError(
            f"{frame['type']!r} frame needs a 'capacity' from 1 to {MAX_CAPACITY}"
        )
    return value


def _models(frame: dict[str, Any]) -> tuple[str, ...]:
    value = frame.get("models", [])
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise RemoteProtocolError(
            f"{frame['type']!r} frame 'models' must be a list of at most {MAX_MODELS} ids"
        )
    models: list[str] = []
    for item in value:
        if (
            not isinstance(item, str)
            or not item
            or len(item) > MAX_MODEL_ID
            or unencodable_string(item) is not None
        ):
            raise RemoteProtocolError(
                f"{frame['type']!r} frame model ids must be non-empty strings of at most "
                f"{MAX_MODEL_ID} characters"
            )
        if item not in models:
            models.append(item)
    return tuple(models)


def _usage(frame: dict[str, Any]) -> dict[str, int] | None:
    value = frame.get("usage")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RemoteProtocolError("'done' frame 'usage' must be an object")
    usage: dict[str, int] = {}
    for name in ("prompt_tokens", "completion_tokens"):
        count = value.get(name)
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise RemoteProtocolError(f"'done' frame usage {name!r} must be a whole number")
        usage[name] = count
    return usage


def _seconds(value: float) -> float | int:
    """A duration for JSON: whole seconds as an integer."""
    if math.isfinite(value) and value == int(value):
        return int(value)
    return value


# -- the relay's end ---------------------------------------------------------------------


class RelayConnectionV2:
    """The relay's end of one v2 agent connection. See the module docstring."""

    __slots__ = ("_cancelled", "_outstanding", "_state", "connection_id")

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id  # the id offered; welcome may resume another
        self._state = V2State.AWAIT_HELLO
        # Request id → the text of its deltas so far, in flight.
        self._outstanding: dict[str, list[str]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    @property
    def state(self) -> V2State:
        return self._state

    @property
    def outstanding(self) -> KeysView[str]:
        return self._outstanding.keys()

    @property
    def accepts_requests(self) -> bool:
        return self._state is V2State.OPEN

    def received_text(self, request_id: str) -> str:
        """The deltas received so far for a request in flight, joined."""
        return "".join(self._outstanding.get(request_id, ()))

    # -- sending ---------------------------------------------------------------

    def send(self, event: Welcome | Request | ChatRequest | Cancel | Goodbye) -> str:
        """The text frame that carries ``event``; moves the state on."""
        if isinstance(event, Welcome):
            if self._state is not V2State.HELLO:
                raise LocalProtocolError(f"cannot welcome in state {self._state.value}")
            frame = _encode(
                {
                    "type": "welcome",
                    "agent_id": event.agent_id,
                    "heartbeat": _seconds(event.heartbeat),
                },
                "welcome",
            )
            self._state = V2State.OPEN
            self.connection_id = event.agent_id
            return frame
        if isinstance(event, Request | ChatRequest):
            return self._send_request(event)
        if isinstance(event, Cancel):
            if self._state not in (V2State.OPEN, V2State.DRAINING, V2State.GOING):
                raise LocalProtocolError(f"cannot cancel in state {self._state.value}")
            if event.request_id not in self._outstanding:
                raise LocalProtocolError(f"request {event.request_id!r} is not in flight")
            frame = _encode(
                {"type": "cancel", "id": event.request_id, "reason": event.reason}, "cancel"
            )
            del self._outstanding[event.request_id]
            self._cancelled[event.request_id] = None
            while len(self._cancelled) > CANCELLED_REMEMBERED:
                self._cancelled.popitem(last=False)
            return frame
        if self._state not in (V2State.OPEN, V2State.DRAINING):
            raise LocalProtocolError(f"cannot say goodbye in state {self._state.value}")
        frame = _encode(
            {
                "type": "goodbye",
                "reason": event.reason,
                "reconnect_after": _seconds(event.reconnect_after),
            },
            "goodbye",
        )
        self._state = V2State.GOING
        return frame

    def _send_request(self, event: Request | ChatRequest) -> str:
        if self._state is not V2State.OPEN:
            raise LocalProtocolError(f"cannot send a request in state {self._state.value}")
        if event.request_id in self._outstanding:
            raise LocalProtocolError(f"request id {event.request_id} is already in flight")
        document: dict[str, Any]
        if isinstance(event, Request):
            document = {
                "type": "request",
                "id": event.request_id,
                "kind": "ask",
                "content": event.content,
                "conversation_id": event.conversation_id,
                "parent_id": event.parent_id,
                "message_id": event.message_id,
            }
            if event.model is not None:
                document["model"] = event.model
        else:
            document = {
                "type": "request",
                "id": event.request_id,
                "kind": "chat",
                "model": event.model,
                "messages": list(event.messages),
                "params": event.params,
            }
        frame = _encode(document, "request")
        self._outstanding[event.request_id] = []
        return frame

    def withdraw(self, request_id: str) -> None:
        """Take back a request whose frame never reached the transport."""
        self._outstanding.pop(request_id, None)

    # -- receiving ---------------------------------------------------------------

    def receive_text(
        self, text: str
    ) -> AgentHello | Update | Delta | Reply | AgentError | Drain | None:
        """The event one text frame carries; None for a late frame of a cancelled request."""
        if self._state is V2State.CLOSED:
            raise LocalProtocolError("cannot receive on a closed connection")
        frame = _decode(text)
        kind = frame["type"]
        if self._state is V2State.AWAIT_HELLO:
            if kind != "hello":
                raise RemoteProtocolError(
                    f"expected 'hello' first, got {kind[:64]!r}",
                    close_code=CloseCode.PROTOCOL_ERROR,
                )
            try:
                hello = AgentHello(
                    name=_text(frame, "name", optional=True) or "",
                    version=_text(frame, "version", optional=True) or "",
                    capacity=_capacity(frame),
                    models=_models(frame),
                    resume=_text(frame, "resume", optional=True) or None,
                )
            except RemoteProtocolError as error:
                raise RemoteProtocolError(str(error), close_code=CloseCode.PROTOCOL_ERROR) from None
            self._state = V2State.HELLO
            return hello
        if self._state is V2State.HELLO:
            raise RemoteProtocolError(f"{kind[:64]!r} before the relay's welcome")
        if kind in ("delta", "done", "error"):
            request_id = _string(frame, "id")
            assert request_id is not None
            if request_id not in self._outstanding:
                if request_id in self._cancelled:
                    if kind != "delta":
                        del self._cancelled[request_id]  # its last word
                    return None
                raise RemoteProtocolError(
                    f"{kind!r} for request {request_id[:64]!r}, which is not in flight"
                )
            return self._answer(kind, request_id, frame)
        if kind == "update":
            if self._state is V2State.GOING:
                raise RemoteProtocolError("'update' after the relay's goodbye")
            capacity = _capacity(frame) if "capacity" in frame else None
            models = _models(frame) if "models" in frame else None
            return Update(capacity, models)
        if kind == "drain":
            if self._state is not V2State.OPEN:
                raise RemoteProtocolError(f"'drain' in state {self._state.value}")
            self._state = V2State.DRAINING
            return Drain()
        if kind == "hello":
            raise RemoteProtocolError("a second 'hello'")
        raise RemoteProtocolError(f"unknown frame type {kind[:64]!r}")

    def _answer(
        self, kind: str, request_id: str, frame: dict[str, Any]
    ) -> Delta | Reply | AgentError:
        if kind == "delta":
            text = _text(frame, "text")
            assert text is not None
            self._outstanding[request_id].append(text)
            return Delta(request_id, text)
        if kind == "error":
            code = _string(frame, "code", optional=True) or "agent_error"
            message = _text(frame, "message", optional=True) or "the agent reported an error"
            retryable = frame.get("retryable", False)
            del self._outstanding[request_id]
            return AgentError(
                request_id,
                message,
                code=code if code in ERROR_CODES else "agent_error",
                retryable=retryable is True,
            )
        try:
            content = _text(frame, "content", optional=True)
            response_id = _text(frame, "response_id", optional=True) or ""
            conversation_id = _text(frame, "conversation_id", optional=True) or ""
            finish_reason = _text(frame, "finish_reason", optional=True)
            usage = _usage(frame)
        except RemoteProtocolError as error:
            del self._outstanding[request_id]
            return AgentError(request_id, f"malformed 'done': {error}", malformed=True)
        pieces = self._outstanding.pop(request_id)
        if content is None:
            content = "".join(pieces)
        return Reply(
            request_id,
            response_id,
            conversation_id,
            content,
            finish_reason=finish_reason,
            usage=usage,
        )

    def connection_lost(self) -> Closed:
        lost = tuple(self._outstanding)
        self._outstanding.clear()
        self._state = V2State.CLOSED
        return Closed(lost)


# -- the agent's end ---------------------------------------------------------------------


class AgentConnectionV2:
    """The agent's end: for relayd.agentkit, the reference agent and the tests."""

    __slots__ = ("_state", "agent_id", "pending")

    def __init__(self) -> None:
        self._state = V2State.AWAIT_HELLO
        self.agent_id: str | None = None
        self.pending: set[str] = set()

    @property
    def state(self) -> V2State:
        return self._state

    def hello(self, hello: AgentHello) -> str:
        if self._state is not V2State.AWAIT_HELLO:
            raise LocalProtocolError("hello is sent once, first")
        document: dict[str, Any] = {
            "type": "hello",
            "name": hello.name,
            "version": hello.version,
            "capacity": hello.capacity,
            "models": list(hello.models),
        }
        if hello.resume:
            document["resume"] = hello.resume
        frame = _encode(document, "hello")
        self._state = V2State.HELLO
        return frame

    def receive_text(self, text: str) -> Welcome | Request | ChatRequest | Cancel | Goodbye:
        frame = _decode(text)
        kind = frame["type"]
        if kind == "welcome":
            if self._state is not V2State.HELLO:
                raise RemoteProtocolError("an unexpected 'welcome'")
            agent_id = _string(frame, "agent_id")
            heartbeat = frame.get("heartbeat", 0)
            if not isinstance(heartbeat, int | float) or isinstance(heartbeat, bool):
                raise RemoteProtocolError("'welcome' frame 'heartbeat' must be a number")
            assert agent_id is not None
            self._state = V2State.OPEN
            self.agent_id = agent_id
            return Welcome(agent_id, float(heartbeat))
        if self._state is V2State.AWAIT_HELLO or self._state is V2State.HELLO:
            raise RemoteProtocolError(f"{kind[:64]!r} before 'welcome'")
        if kind == "request":
            return self._request(frame)
        if kind == "cancel":
            request_id = _string(frame, "id")
            assert request_id is not None
            self.pending.discard(request_id)
            return Cancel(request_id, _string(frame, "reason", optional=True) or "")
        if kind == "goodbye":
            after = frame.get("reconnect_after", 0)
            if not isinstance(after, int | float) or isinstance(after, bool) or after < 0:
                after = 0
            self._state = V2State.GOING
            return Goodbye(_string(frame, "reason", optional=True) or "", float(after))
        raise RemoteProtocolError(f"unknown frame type {kind[:64]!r}")

    def _request(self, frame: dict[str, Any]) -> Request | ChatRequest:
        request_id = _string(frame, "id")
        assert request_id is not None
        if frame.get("kind", "ask") == "chat":
            model = _string(frame, "model")
            messages = frame.get("messages")
            params = frame.get("params", {})
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise RemoteProtocolError("'request' frame 'messages' must be a list of objects")
            if not isinstance(params, dict):
                raise RemoteProtocolError("'request' frame 'params' must be an object")
            assert model is not None
            self.pending.add(request_id)
            return ChatRequest(request_id, model, tuple(messages), params)
        request = Request(
            request_id,
            _string(frame, "message_id", optional=True) or "",
            _string(frame, "conversation_id", optional=True) or "",
            _string(frame, "parent_id", optional=True) or "",
            _text(frame, "content") or "",
            model=_string(frame, "model", optional=True),
        )
        self.pending.add(request_id)
        return request

    def send(self, event: Delta | Reply | AgentError | Update | Drain) -> str:
        """The frame for ``event``. A :class:`Reply` is ``done`` (its content
        omitted when ``stream_sent``-style agents already sent it as deltas:
        pass ``content=None`` through :meth:`done`)."""
        if self._state in (V2State.AWAIT_HELLO, V2State.HELLO):
            raise LocalProtocolError(f"cannot send {type(event).__name__} before 'welcome'")
        if isinstance(event, Update):
            document: dict[str, Any] = {"type": "update"}
            if event.capacity is not None:
                document["capacity"] = event.capacity
            if event.models is not None:
                document["models"] = list(event.models)
            return _encode(document, "update")
        if isinstance(event, Drain):
            return _encode({"type": "drain"}, "drain")
        if event.request_id not in self.pending:
            raise LocalProtocolError(f"no request {event.request_id!r} to answer")
        if isinstance(event, Delta):
            return _encode({"type": "delta", "id": event.request_id, "text": event.text}, "delta")
        if isinstance(event, AgentError):
            frame = _encode(
                {
                    "type": "error",
                    "id": event.request_id,
                    "code": event.code,
                    "message": event.text,
                    "retryable": event.retryable,
                },
                "error",
            )
            self.pending.discard(event.request_id)
            return frame
        return self.done(event)

    def done(self, reply: Reply, *, include_content: bool = True) -> str:
        """A ``done`` frame; without the content when the deltas carried it."""
        document: dict[str, Any] = {
            "type": "done",
            "id": reply.request_id,
            "response_id": reply.response_id,
            "conversation_id": reply.conversation_id,
            "finish_reason": reply.finish_reason,
        }
        if include_content:
            document["content"] = reply.content
        if reply.usage is not None:
            document["usage"] = reply.usage
        frame = _encode(document, "done")
        self.pending.discard(reply.request_id)
        return frame

    def connection_lost(self) -> Closed:
        lost = tuple(self.pending)
        self.pending.clear()
        self._state = V2State.CLOSED
        return Closed(lost)
