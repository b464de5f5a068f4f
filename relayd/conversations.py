"""Which agent owns which conversation, bounded in size and age.

An entry is ``conversation_id → (agent id, user id, last response id)``. The
table is an LRU: each use moves an entry to the end, so the oldest-used are at
the front, where expiry (``ttl``) and eviction (``max``) take them in O(1)
amortised. Time is passed in, never read here, so tests control it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

__all__ = ["Conversation", "Conversations"]


@dataclass(slots=True)
class Conversation:
    agent_id: str
    user_id: str
    last_response_id: str
    last_used: float


class Conversations:
    def __init__(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[str, Conversation] = OrderedDict()
        self._per_agent: Counter[str] = Counter()
        self.evicted = 0  # dropped by the size limit, for statistics

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit

    def get(self, conversation_id: str, now: float) -> Conversation | None:
        """The live entry, marked as used now; None if unknown or expired."""
        self.expire(now)
        entry = self._entries.get(conversation_id)
        if entry is None:
            return None
        entry.last_used = now
        self._entries.move_to_end(conversation_id)
        return entry

    def record(
        self, conversation_id: str, *, agent_id: str, user_id: str, response_id: str, now: float
    ) -> None:
        """Remember (or refresh) who holds ``conversation_id`` after a reply."""
        entry = self._entries.get(conversation_id)
        if entry is None:
            self._entries[conversation_id] = Conversation(agent_id, user_id, response_id, now)
            self._per_agent[agent_id] += 1
        else:
            if entry.agent_id != agent_id:
                self._move(entry, agent_id)
            entry.last_response_id = response_id
            entry.last_used = now
            self._entries.move_to_end(conversation_id)
        while len(self._entries) > self.limit:
            self._pop_oldest()
            self.evicted += 1
        self.expire(now)

    def expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.last_used <= self.ttl:
                return
            self._pop_oldest()

    def count_for(self, agent_id: str) -> int:
        return self._per_agent.get(agent_id, 0)

    def _move(self, entry: Conversation, agent_id: str) -> None:
        self._decrement(entry.agent_id)
        entry.agent_id = agent_id
        self._per_agent[agent_id] += 1

    def _pop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._decrement(entry.agent_id)

    def _decrement(self, agent_id: str) -> None:
        self._per_agent[agent_id] -= 1
        if self._per_agent[agent_id] <= 0:
            del self._per_agent[agent_id]
