"""``Idempotency-Key``: a retried request is answered once.

A client that loses its connection before the answer cannot tell whether its
question reached an agent; retrying may run it twice. With the same
``Idempotency-Key`` header (per user, within ``requests.idempotency_ttl``)
the retry gets the first request's answer instead: from the store if it
finished, by waiting for it if it is still running. The same key with a
different body is a 422. Only successful answers are kept; after a failure
(or a client that left before the answer) a retry runs the question again.

Answers are kept as the bytes the client got (a JSON body, or a whole
server-sent-event stream), so a retry is answered exactly as the first
request was. The table is an LRU bounded in age and count, and is kept across
restarts by :mod:`relayd.persist` (through :meth:`Idempotency.journal`).
Times are Trio's clock, passed in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

__all__ = ["IdempotencyStore", "Recorded", "body_hash", "key_problem"]

MAX_KEY = 255


def key_problem(key: str) -> str | None:
    """Why ``key`` is not an acceptable Idempotency-Key, or None."""
    if not 1 <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        return f"Idempotency-Key must be 1 to {MAX_KEY} printable ASCII characters"
    return None


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Recorded:
    """An answer as the client got it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    streamed: bool  # the body is a server-sent-event stream's


@dataclass(slots=True)
class _Entry:
    user_id: str
    key: str
    body_hash: str
    created: float  # Trio's clock
    recorded: Recorded | None = None
    done: trio.Event = field(default_factory=trio.Event)


class IdempotencyStore:
    """Answers by (user, key); see the module docstring."""

    def __init__(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._changed: dict[tuple[str, str], _Entry | None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit

    def get(self, user_id: str, key: str, now: float) -> _Entry | None:
        self._expire(now)
        return self._entries.get((user_id, key))

    def start(self, user_id: str, key: str, digest: str, now: float) -> _Entry:
        """A new entry for a request now running (replacing a failed one)."""
        entry = _Entry(user_id, key, digest, now)
        self._entries.pop((user_id, key), None)
        self._entries[(user_id, key)] = entry
        while len(self._entries) > self.limit:
            self._forget(next(iter(self._entries)))
        return entry

    def finish(self, entry: _Entry, recorded: Recorded | None) -> None:
        """The request ended: with an answer to keep, or (None) without one,
        which forgets the entry so that a retry runs the question again."""
        entry.recorded = recorded
        entry.done.set()
        ident = (entry.user_id, entry.key)
        if self._entries.get(ident) is not entry:
            return
        if recorded is None:
            self._forget(ident)
        elif self._changed is not None:
            self._changed[ident] = entry

    def restore(
        self, user_id: str, key: str, digest: str, recorded: Recorded, created: float, now: float
    ) -> None:
        if now - created > self.ttl:
            return
        entry = _Entry(user_id, key, digest, created, recorded)
        entry.done.set()
        self._entries[(user_id, key)] = entry
        while len(self._entries) > self.limit:
            self._forget(next(iter(self._entries)))

    def _expire(self, now: float) -> None:
        while self._entries:
            ident, oldest = next(iter(self._entries.items()))
            if now - oldest.created <= self.ttl:
                return
            self._forget(ident)

    def _forget(self, ident: tuple[str, str]) -> None:
        entry = self._entries.pop(ident)
        if self._changed is not None and entry.recorded is not None:
            self._changed[ident] = None

    # -- persistence (relayd.persist) ----------------------------------------------------

    def keep_journal(self) -> None:
        if self._changed is None:
            self._changed = {}

    def journal(self) -> dict[tuple[str, str], _Entry | None]:
        changed, self._changed = self._changed or {}, {}
        return changed
