"""Who may connect as an agent.

An agent proves itself with a key from ``agents.keys`` / ``agents.keys_file``,
given as ``Authorization: Bearer <key>``, as ``?key=<key>``, or as a path
prefix ``/agent/<key>/client/register`` (browser agents are configured with a
``host:port/...`` string and cannot set headers). Without a key, only loopback
peers get in, and only while ``agents.allow_loopback_without_key`` is true.

The result is a *credential*: ``"loopback"`` or ``"key:<sha256 of the key>"``.
Sessions carry it so that only the same credential can reclaim an agent id, and
so that a reload that removes a key can find and disconnect its agents. The
keys themselves are never stored on a session or logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from relayd.users import secret_digest

__all__ = ["AGENT_PATH", "AgentKeys", "AgentRefusal", "agent_key_from_path", "is_loopback"]

AGENT_PATH = "/client/register"
_PREFIX = "/agent/"
LOOPBACK = "loopback"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def agent_key_from_path(path: str) -> tuple[bool, str | None]:
    """``(is an agent path, key in the path or None)``."""
    if path == AGENT_PATH:
        return True, None
    if path.startswith(_PREFIX) and path.endswith(AGENT_PATH):
        key = path[len(_PREFIX) : -len(AGENT_PATH)]
        if key and "/" not in key:
            return True, key
    return False, None


@dataclass(frozen=True)
class AgentRefusal:
    status: int  # 401: no key where one is needed; 403: a key that is not valid
    reason: str


@dataclass(frozen=True)
class AgentKeys:
    """An immutable set of accepted agent keys (as SHA-256 digests)."""

    digests: frozenset[bytes] = field(default=frozenset(), repr=False)
    allow_loopback_without_key: bool = True

    @classmethod
    def of(cls, keys: tuple[str, ...], *, allow_loopback_without_key: bool) -> AgentKeys:
        return cls(frozenset(secret_digest(key) for key in keys), allow_loopback_without_key)

    def __len__(self) -> int:
        return len(self.digests)

    def authenticate(
        self,
        *,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client_host: str | None,
    ) -> str | AgentRefusal:
        """The credential of a connecting agent, or why it is refused."""
        _, key = agent_key_from_path(path)
        if key is None:
            for name, value in headers:
                if name.lower() == b"authorization":
                    scheme, _, token = value.decode("latin-1").partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        key = token.strip()
                    break
        if key is None and query:
            for field_name, field_value in parse_qsl(query.decode("latin-1")):
                if field_name == "key" and field_value:
                    key = field_value
                    break
        if key is not None:
            digest = secret_digest(key)
            # Constant-time against every key, so timing tells nothing of which is near.
            matched = False
            for accepted in self.digests:
                matched |= hmac.compare_digest(digest, accepted)
            if matched:
                return "key:" + digest.hex()
            return AgentRefusal(403, "invalid agent key")
        if self.allow_loopback_without_key and is_loopback(client_host):
            return LOOPBACK
        if is_loopback(client_host):
            return AgentRefusal(
                401, "an agent key is required (agents.allow_loopback_without_key is false)"
            )
        return AgentRefusal(401, "an agent key is required")

    def still_valid(self, credential: str) -> bool:
        """Whether a session with ``credential`` may stay connected after a reload."""
        if credential == LOOPBACK:
            return self.allow_loopback_without_key
        return bytes.fromhex(credential.removeprefix("key:")) in self.digests
