"""Sans-I/O connections for both ends of the agent protocol.

Rules (the ChatGPT-API-server contract, kept unchanged):

* Every frame is a JSON object with string fields ``id``, ``message`` and
  ``data``; other fields are ignored. ``data`` is itself JSON text, or "".
* The relay speaks first (``Connection id``); the agent answers with the id it
  wants. Nothing else may come before that answer.
* After the handshake the relay sends ``ping`` and ``ChatGptRequest``; the
  agent answers ``pong``, and ``ChatGptResponse`` or ``error`` carrying the
  request's id, in any order.

State table of :class:`RelayConnection`::

    state          event                        next state
    -------------  ---------------------------  -------------
    NEW            send Greeting                AWAIT_HELLO
    AWAIT_HELLO    receive Hello                OPEN
    OPEN           send Ping / Request          OPEN
    OPEN           withdraw a Request unsent    OPEN
    OPEN           receive Pong / Reply / Error OPEN
    any            connection_lost()            CLOSED

Any other move raises: :class:`LocalProtocolError` when we make it,
:class:`RemoteProtocolError` when the peer does. Either leaves the state as it
was. Feeding ``connection_lost()`` is how the loss of the transport enters the
protocol: it is an input, not an exception.

Nothing here does I/O, reads a clock or logs.
"""

from __future__ import annotations

import enum
import json
from collections.abc import KeysView
from typing import Any

from relayd.jsontext import may_hold_surrogate, unencodable_string
from relayd.protocol.errors import (
    CloseCode,
    LocalProtocolError,
    RemoteProtocolError,
    UnsendableText,
)
from relayd.protocol.events import (
    AgentError,
    Closed,
    Greeting,
    Hello,
    Ping,
    Pong,
    Reply,
    Request,
)

__all__ = ["AgentConnection", "RelayConnection", "State", "decode_frame", "encode_frame"]

# The ``message`` kinds on the wire.
CONNECTION_ID = "Connection id"
PING = "ping"
PONG = "pong"
REQUEST = "ChatGptRequest"
RESPONSE = "ChatGptResponse"
ERROR = "error"

_REPLY_FIELDS = ("response_id", "conversation_id", "content")
_REQUEST_FIELDS = ("message_id", "conversation_id", "parent_id", "content")
# Request's fields, each sent as a JSON string.
_REQUEST_TEXTS = ("request_id", *_REQUEST_FIELDS)


class State(enum.Enum):
    NEW = "new"
    AWAIT_HELLO = "awaiting the agent's connection id"
    OPEN = "open"
    CLOSED = "closed"


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def encode_frame(frame_id: str, message: str, data: str) -> str:
    return _encoder.encode({"id": frame_id, "message": message, "data": data})


def decode_frame(text: str) -> tuple[str, str, str]:
    """``(id, message, data)`` of one frame; RemoteProtocolError says what is wrong."""
    try:
        frame = _decoder.decode(text)
    except ValueError as error:
        raise RemoteProtocolError(f"frame is not JSON: {error}") from None
    except RecursionError:
        raise RemoteProtocolError("frame is nested too deeply") from None
    if not isinstance(frame, dict):
        raise RemoteProtocolError(f"frame is not a JSON object but {_json_type(frame)}")
    values = []
    for name in ("id", "message", "data"):
        value = frame.get(name, "" if name == "data" else None)
        if value is None:
            raise RemoteProtocolError(f"frame has no {name!r} field")
        if not isinstance(value, str):
            raise RemoteProtocolError(f"frame field {name!r} is {_json_type(value)}, not a string")
        values.append(value)
    if may_hold_surrogate(text):
        # ``data`` is left to the caller: a reply whose data is not Unicode still
        # names the request it ends, which must fail rather than wait forever.
        problem = unencodable_string({"id": values[0], "message": values[1]})
        if problem is not None:
            raise RemoteProtocolError(f"frame {problem} holds a lone surrogate: not Unicode")
    return values[0], values[1], values[2]


def _not_unicode(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (``decode_frame`` leaves ``data`` unchecked)."""
    return not text.isascii() and unencodable_string(text) is not None


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _decode_data(data: str, fields: tuple[str, ...]) -> dict[str, str] | str:
    """The double-encoded ``data`` as a dict of string fields, or a text saying why not."""
    try:
        document = _decoder.decode(data)
    except (ValueError, RecursionError):
        return "data is not JSON"
    if not isinstance(document, dict):
        return f"data is {_json_type(document)}, not a JSON object"
    result = {}
    for name in fields:
        value = document.get(name)
        if not isinstance(value, str):
            return f"data field {name!r} is {'missing' if value is None else _json_type(value)}"
        result[name] = value
    if may_hold_surrogate(data):
        problem = unencodable_string(result, "data")
        if problem is not None:
            return f"{problem} holds a lone surrogate, which is not Unicode"
    return result


class RelayConnection:
    """The relay's end of one agent connection.

    ``outstanding`` holds the ids of requests sent and not yet answered: the
    agent's in-flight work, as the protocol sees it.
    """

    __slots__ = ("_outstanding", "_state", "connection_id")

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id
        self._state = State.NEW
        # A dict used as an ordered set: a third of an empty set's size, and
        # there is one per connected agent.
        self._outstanding: dict[str, None] = {}

    @property
    def state(self) -> State:
        return self._state

    @property
    def outstanding(self) -> KeysView[str]:
        """Ids of requests sent and not yet answered (compares equal to a set)."""
        return self._outstanding.keys()

    # -- sending -----------------------------------------------------------

    def send(self, event: Greeting | Ping | Request) -> str:
        """The text frame that carries ``event``; moves the state on."""
        if isinstance(event, Greeting):
            if self._state is not State.NEW:
                raise LocalProtocolError(f"cannot greet in state {self._state.value}")
            self._state = State.AWAIT_HELLO
            return encode_frame(event.connection_id, CONNECTION_ID, "")
        if self._state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self._state.value}"
            )
        if isinstance(event, Ping):
            return encode_frame(event.ping_id, PING, "")
        if event.request_id in self._outstanding:
            raise LocalProtocolError(f"request id {event.request_id} is already in flight")
        for name in _REQUEST_TEXTS:
            text = getattr(event, name)
            if not text.isascii() and unencodable_string(text) is not None:
                raise UnsendableText(f"the request's {name} is not valid Unicode")
        data = _encoder.encode(
            {
                "message_id": event.message_id,
                "conversation_id": event.conversation_id,
                "parent_id": event.parent_id,
                "content": event.content,
            }
        )
        self._outstanding[event.request_id] = None
        return encode_frame(event.request_id, REQUEST, data)

    def withdraw(self, request_id: str) -> None:
        """Take back a request whose frame never reached the transport.

        A reply to it is then a protocol error, as for any id not in flight.
        """
        self._outstanding.pop(request_id, None)

    # -- receiving -----------------------------------------------------------

    def receive_text(self, text: str) -> Hello | Pong | Reply | AgentError:
        """The event one text frame from the agent carries."""
        if self._state in (State.NEW, State.CLOSED):
            raise LocalProtocolError(f"cannot receive in state {self._state.value}")
        frame_id, kind, data = decode_frame(text)
        if self._state is State.AWAIT_HELLO:
            if kind != CONNECTION_ID:
                raise RemoteProtocolError(
                    f"expected the {CONNECTION_ID!r} answer first, got {kind!r}",
                    close_code=CloseCode.PROTOCOL_ERROR,
                )
            if not frame_id:
                raise RemoteProtocolError(
                    "the connection id is empty", close_code=CloseCode.PROTOCOL_ERROR
                )
            self._state = State.OPEN
            return Hello(frame_id, self.connection_id)
        if kind == PONG:
            return Pong(frame_id)
        if kind in (RESPONSE, ERROR):
            if frame_id not in self._outstanding:
                raise RemoteProtocolError(
                    f"{kind!r} for request {frame_id!r}, which is not in flight"
                )
            del self._outstanding[frame_id]
            if kind == ERROR:
                if _not_unicode(data):  # the text is only shown: keep what it says
                    data = data.encode("utf-8", "backslashreplace").decode("utf-8")
                return AgentError(frame_id, data or "agent reported an error")
            if _not_unicode(data):
                return AgentError(
                    frame_id, "malformed reply: data holds a lone surrogate", malformed=True
                )
            fields = _decode_data(data, _REPLY_FIELDS)
            if isinstance(fields, str):
                return AgentError(frame_id, f"malformed reply: {fields}", malformed=True)
            return Reply(
                frame_id, fields["response_id"], fields["conversation_id"], fields["content"]
            )
        if kind == CONNECTION_ID:
            raise RemoteProtocolError("a second connection id after the handshake")
        raise RemoteProtocolError(f"unknown message kind {kind[:64]!r}")

    def receive_bytes(self, data: bytes) -> None:
        """Binary frames are not part of the protocol; always raises."""
        raise RemoteProtocolError(f"binary frame of {len(data)} bytes; the protocol is text only")

    def connection_lost(self) -> Closed:
        """The transport is gone: every outstanding request is lost."""
        lost = tuple(self._outstanding)
        self._outstanding.clear()
        self._state = State.CLOSED
        return Closed(lost)


class AgentConnection:
    """The agent's end: for test agents, the benchmark and the reference agent."""

    __slots__ = ("_state", "connection_id", "pending")

    def __init__(self) -> None:
        self._state = State.AWAIT_HELLO
        self.connection_id: str | None = None
        self.pending: set[str] = set()

    @property
    def state(self) -> State:
        return self._state

    def receive_text(self, text: str) -> Greeting | Ping | Request:
        if self._state is State.CLOSED:
            raise LocalProtocolError("cannot receive on a closed connection")
        frame_id, kind, data = decode_frame(text)
        if kind == CONNECTION_ID:
            if self._state is not State.AWAIT_HELLO:
                raise RemoteProtocolError("a second greeting")
            return Greeting(frame_id)
        if self._state is not State.OPEN:
            raise RemoteProtocolError(f"expected the greeting first, got {kind!r}")
        if kind == PING:
            return Ping(frame_id)
        if kind == REQUEST:
            fields = _decode_data(data, _REQUEST_FIELDS)
            if isinstance(fields, str):
                raise RemoteProtocolError(f"malformed request: {fields}")
            self.pending.add(frame_id)
            return Request(
                frame_id,
                fields["message_id"],
                fields["conversation_id"],
                fields["parent_id"],
                fields["content"],
            )
        raise RemoteProtocolError(f"unknown message kind {kind[:64]!r}")

    def send(self, event: Hello | Pong | Reply | AgentError) -> str:
        if isinstance(event, Hello):
            if self._state is not State.AWAIT_HELLO:
                raise LocalProtocolError("the handshake is over")
            self._state = State.OPEN
            self.connection_id = event.connection_id
            return encode_frame(event.connection_id, CONNECTION_ID, "")
        if self._state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {type(event).__name__} before the handshake")
        if isinstance(event, Pong):
            return encode_frame(event.ping_id, PONG, "")
        if event.request_id not in self.pending:
            raise LocalProtocolError(f"no request {event.request_id!r} to answer")
        self.pending.discard(event.request_id)
        if isinstance(event, AgentError):
            return encode_frame(event.request_id, ERROR, event.text)
        data = _encoder.encode(
            {
                "response_id": event.response_id,
                "conversation_id": event.conversation_id,
                "content": event.content,
            }
        )
        return encode_frame(event.request_id, RESPONSE, data)

    def connection_lost(self) -> Closed:
        lost = tuple(self.pending)
        self.pending.clear()
        self._state = State.CLOSED
        return Closed(lost)
