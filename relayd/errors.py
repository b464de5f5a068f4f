"""Domain errors shared by dispatch, the API and the CLI.

They carry a text that is safe to show a client (never a secret) and, where it
helps the client, how long to wait before trying again. Which HTTP status each
one becomes is the API's business (``relayd.api.STATUS``), not theirs.
"""

from __future__ import annotations

import math
from typing import TypeVar

__all__ = [
    "AgentFailed",
    "AgentTimeout",
    "BadRequest",
    "ConversationAgentGone",
    "Forbidden",
    "NoAgent",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "QueueTimeout",
    "RateLimited",
    "RelayError",
    "RequestTimeout",
    "ShuttingDown",
    "StreamBroken",
    "Unauthorized",
    "UnknownConversation",
    "UnknownModel",
    "Unprocessable",
    "body_late",
    "leaf_exceptions",
    "retry_after_header",
]


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1.

    Rounded up so that a client that waits as told is not turned away again.
    """
    return str(max(1, math.ceil(seconds)))


class RelayError(Exception):
    """A request failed for a reason the client may be told."""

    default_message = "request failed"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        super().__init__(self.message)


class BadRequest(RelayError):
    default_message = "bad request"


class PayloadTooLarge(RelayError):
    default_message = "request body too large"


class RequestTimeout(RelayError):
    default_message = "the request body stopped arriving"


def body_late(body_timeout: float) -> str:
    """The 408 message for a body that did not arrive whole in time (every route)."""
    return f"the request body did not arrive within server.body_timeout ({body_timeout:g} s)"


class Unauthorized(RelayError):
    default_message = "missing or invalid credentials"


class Forbidden(RelayError):
    default_message = "forbidden"


class NotFound(RelayError):
    default_message = "not found"


class Unprocessable(RelayError):
    default_message = "the request cannot be processed"


class UnknownConversation(NotFound):
    default_message = "unknown conversation_id"


class UnknownModel(NotFound):
    default_message = "no connected agent serves that model"


class StreamBroken(RelayError):
    """A streamed answer failed after some of it reached the client: never
    retried elsewhere (a second agent's answer is not spliced on)."""

    default_message = "the answer broke off"


class RateLimited(RelayError):
    default_message = "too many failed attempts; try again later"


class NoAgent(RelayError):
    """No agent is connected at all."""

    default_message = "no agent connected"


class QueueFull(RelayError):
    default_message = "all agents are busy and the wait queue is full"


class QueueTimeout(RelayError):
    default_message = "all agents stayed busy for the whole queue timeout"


class ConversationAgentGone(RelayError):
    default_message = "the agent holding this conversation is not connected"


class ShuttingDown(RelayError):
    default_message = "relayd is shutting down"


class AgentFailed(RelayError):
    default_message = "the agent failed to answer"


class AgentTimeout(RelayError):
    default_message = "the agent did not answer in time"


_E = TypeVar("_E", bound=BaseException)


def leaf_exceptions(group: BaseExceptionGroup[_E]) -> list[_E]:
    """The exceptions in ``group`` and its nested groups, for one log line each:
    an error from deep in the nurseries reaches ``except*`` wrapped once per
    nursery it crossed."""
    found: list[_E] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(leaf_exceptions(error))
        else:
            found.append(error)
    return found
