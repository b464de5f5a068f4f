"""The two sides of a protocol error: our misuse, and the peer's misbehaviour."""

from __future__ import annotations

__all__ = [
    "CloseCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "UnsendableText",
]


class CloseCode:
    """WebSocket close codes the agent protocol uses (RFC 6455, section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # relay shutting down: agents should reconnect
    PROTOCOL_ERROR = 1002
    ABNORMAL_CLOSURE = 1006  # never sent: a peer gone without a close frame
    POLICY_VIOLATION = 1008  # e.g. the agent key was revoked
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class ProtocolError(Exception):
    """Base of both protocol errors; never raised itself."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug in relayd).

    The connection's state is unchanged.
    """


class UnsendableText(LocalProtocolError):
    """A field of an event we were asked to send is not Unicode (a lone
    surrogate), so no frame can carry it. The fault is the event's, not the
    connection's: the connection's state is unchanged and it stays usable.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    ``close_code`` is the hint for what to do: None means the frame was dropped
    and the connection can carry on; a code means the connection is unusable and
    should be closed with it. The connection's state is unchanged.
    """

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code
