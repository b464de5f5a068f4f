"""The ASGI type aliases relayd's hand-written ASGI code shares.

Only the shapes, no behaviour: the agent endpoint, ``/api/ask``'s ASGI path,
the app that routes between them and Quart, and the bench's baseline app all
speak ASGI without a framework, so they name its parts the same way here
rather than each in its own module. Importing this loads neither Trio nor
Hypercorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["AsgiApp", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]
