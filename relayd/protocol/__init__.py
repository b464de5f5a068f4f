"""The agent protocol of ChatGPT-API-server, sans-I/O.

Feed text frames in, get typed events out; give events, get the text to send.
No trio, no clock, no logging: the session owns all of that.
"""

from relayd.protocol.connection import (
    AgentConnection,
    RelayConnection,
    State,
    decode_frame,
    encode_frame,
)
from relayd.protocol.errors import (
    CloseCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsendableText,
)
from relayd.protocol.events import (
    AgentError,
    Closed,
    Event,
    Greeting,
    Hello,
    Ping,
    Pong,
    Reply,
    Request,
)

__all__ = [
    "AgentConnection",
    "AgentError",
    "CloseCode",
    "Closed",
    "Event",
    "Greeting",
    "Hello",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "RelayConnection",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "State",
    "UnsendableText",
    "decode_frame",
    "encode_frame",
]
