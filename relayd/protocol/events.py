"""Frozen events of the agent protocol, with helpers that build correct replies.

Relay → agent: :class:`Greeting`, :class:`Ping`, :class:`Request`.
Agent → relay: :class:`Hello`, :class:`Pong`, :class:`Reply`, :class:`AgentError`.
Either side: :class:`Closed` (the transport is gone).

Identifiers are strings chosen by the sender of the frame that starts an
exchange; a reply carries the same ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AgentError",
    "Closed",
    "Event",
    "Greeting",
    "Hello",
    "Ping",
    "Pong",
    "Reply",
    "Request",
]


@dataclass(frozen=True, slots=True)
class Greeting:
    """The relay's first frame: "your connection id is ``connection_id``"."""

    connection_id: str

    def accept(self) -> Hello:
        """The agent keeps the id it was given (a fresh connection)."""
        return Hello(self.connection_id, self.connection_id)

    def reclaim(self, earlier_id: str) -> Hello:
        """The agent asks for the id it held on an earlier connection."""
        return Hello(earlier_id, self.connection_id)


@dataclass(frozen=True, slots=True)
class Hello:
    """The agent's answer to :class:`Greeting`.

    ``connection_id`` is the id the agent wants; ``offered_id`` is the one the
    relay offered. They differ when the agent reconnects and reclaims an id.
    """

    connection_id: str
    offered_id: str

    @property
    def is_reclaim(self) -> bool:
        return self.connection_id != self.offered_id


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: str

    def reply(self) -> Pong:
        return Pong(self.ping_id)


@dataclass(frozen=True, slots=True)
class Pong:
    ping_id: str


@dataclass(frozen=True, slots=True)
class Request:
    """Work for the agent: one turn of a conversation."""

    request_id: str
    message_id: str
    conversation_id: str  # "" starts a new conversation
    parent_id: str
    content: str
    model: str | None = None  # v2 only: the model asked for, when one was

    def reply(self, response_id: str, conversation_id: str, content: str) -> Reply:
        return Reply(self.request_id, response_id, conversation_id, content)

    def fail(self, text: str = "Unknown error") -> AgentError:
        return AgentError(self.request_id, text)


@dataclass(frozen=True, slots=True)
class Reply:
    """A request's answer (v1 ``ChatGptResponse``, v2 ``done``)."""

    request_id: str
    response_id: str
    conversation_id: str
    content: str
    finish_reason: str | None = None  # v2: "stop", "length", ...
    usage: dict[str, int] | None = None  # v2: prompt_tokens, completion_tokens


@dataclass(frozen=True, slots=True)
class AgentError:
    """The agent could not do a request; or (``malformed``) its reply was unreadable.

    ``code`` and ``retryable`` are v2's (a v1 error may always be retried
    elsewhere, as the seed did).
    """

    request_id: str
    text: str
    malformed: bool = False
    code: str = "agent_error"
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class Closed:
    """The transport is gone. ``outstanding`` lists requests that got no reply."""

    outstanding: tuple[str, ...] = ()


Event = Greeting | Hello | Ping | Pong | Request | Reply | AgentError | Closed
