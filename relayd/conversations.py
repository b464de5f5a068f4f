"""Which agent owns which conversation, bounded in size and age.

An entry is ``conversation_id → (agent id, user id, last response id)``. The
table is an LRU: each use moves an entry to the end, so the oldest-used are at
the front, where expiry (``ttl``) and eviction (``max``) take them in O(1)
amortised. Time is passed in, never read here, so tests control it.

**Ownership.** A conversation belongs to the user who started it and to the
agent that holds it, and relayd never moves it on an agent's word: a reply
that names a conversation recorded for another agent or another user is not
recorded, and :meth:`Conversations.record` says why (the dispatcher logs the
agent as misbehaving; the client still gets its answer, which is all the
agent could give). Otherwise any agent (with a valid key, or any local one
when keyless agents are allowed) could divert another user's conversation,
and its later turns with their content, to itself.

**Turns.** The last :data:`TURNS_KEPT` response ids of each live conversation
are indexed (:meth:`Conversations.turn`), so that a client's ``parent_id``
can be checked: no one continues from another user's turn. A reply whose
``response_id`` is a turn of a conversation on another agent is not indexed
for its own conversation (the same misbehaviour). One whose ``response_id``
the same agent already gave in another conversation shows that the agent's
ids are not unique (scripts that answer a fixed id): the id then names no
turn at all, and is passed through unchecked, as relayd cannot tell whose it
is; only that agent ever gave it out. Turns older than the last
:data:`TURNS_KEPT`, or of conversations expired or evicted, are forgotten;
relayd cannot protect what it no longer knows, and passes such ids through
as the seed did.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

__all__ = ["TURNS_KEPT", "Conversation", "Conversations"]

# Response ids remembered per conversation: about 150 bytes each.
TURNS_KEPT = 64


@dataclass(slots=True)
class Conversation:
    agent_id: str
    user_id: str
    last_response_id: str
    last_used: float
    conversation_id: str = ""
    # Its remembered response ids, oldest first (a list: an empty deque costs 13 times more).
    turns: list[str] = field(default_factory=list)


class Conversations:
    def __init__(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[str, Conversation] = OrderedDict()
        self._per_agent: Counter[str] = Counter()
        self._turns: dict[str, Conversation] = {}  # response id → its conversation
        self.evicted = 0  # dropped by the size limit, for statistics
        # What changed since journal() was last called (None: gone), when a
        # state file keeps the table across restarts; None: nobody keeps it.
        self._changed: dict[str, Conversation | None] | None = None

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

    def turn(self, response_id: str, now: float) -> Conversation | None:
        """The live conversation that ``response_id`` is a remembered turn of, or None."""
        self.expire(now)
        return self._turns.get(response_id)

    def record(
        self,
        conversation_id: str,
        *,
        agent_id: str,
        user_id: str,
        response_id: str,
        now: float,
        any_user: bool = False,
    ) -> str | None:
        """Remember (or refresh) who holds ``conversation_id`` after a reply.

        Returns None, or why the reply was not recorded whole (see the module
        docstring): the agent misbehaves, and the caller says so. ``any_user``:
        the asker may continue any user's conversation (the admin key); the
        conversation keeps its owner.
        """
        self.expire(now)  # an expired conversation is no one's any more
        entry = self._entries.get(conversation_id)
        if entry is not None:
            if entry.agent_id != agent_id:
                return "its conversation_id is held by another agent; not recorded"
            if entry.user_id != user_id and not any_user:
                return "its conversation_id is another user's; not recorded"
            entry.last_response_id = response_id
            entry.last_used = now
            self._entries.move_to_end(conversation_id)
        else:
            entry = Conversation(agent_id, user_id, response_id, now, conversation_id)
            self._entries[conversation_id] = entry
            self._per_agent[agent_id] += 1
        problem = self._add_turn(entry, response_id)
        if self._changed is not None:
            self._changed[conversation_id] = entry
        while len(self._entries) > self.limit:
            self._pop_oldest()
            self.evicted += 1
        return problem

    def expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.last_used <= self.ttl:
                return
            self._pop_oldest()

    def count_for(self, agent_id: str) -> int:
        return self._per_agent.get(agent_id, 0)

    def _add_turn(self, entry: Conversation, response_id: str) -> str | None:
        if not response_id:
            return None  # names no turn
        owner = self._turns.get(response_id)
        if owner is entry:
            return None
        if owner is not None:
            if owner.agent_id != entry.agent_id:
                return "its response_id is a turn held by another agent; turn not recorded"
            # The agent repeats its own ids: this one names no turn any more.
            del self._turns[response_id]
            owner.turns.remove(response_id)
            return None
        self._turns[response_id] = entry
        entry.turns.append(response_id)
        if len(entry.turns) > TURNS_KEPT:
            del self._turns[entry.turns.pop(0)]
        return None

    def _pop_oldest(self) -> None:
        conversation_id, entry = self._entries.popitem(last=False)
        for response_id in entry.turns:
            del self._turns[response_id]
        self._decrement(entry.agent_id)
        if self._changed is not None:
            self._changed[conversation_id] = None

    # -- persistence (relayd.persist) ----------------------------------------------------

    def keep_journal(self) -> None:
        """From now on, remember what changes, for :meth:`journal`."""
        if self._changed is None:
            self._changed = {}

    def journal(self) -> dict[str, Conversation | None]:
        """What changed since the last call: the entry as it is now, or None if gone."""
        changed, self._changed = self._changed or {}, {}
        return changed

    def restore(
        self,
        conversation_id: str,
        *,
        agent_id: str,
        user_id: str,
        last_response_id: str,
        turns: tuple[str, ...],
        last_used: float,
        now: float,
    ) -> None:
        """Put back a conversation kept across a restart (oldest first), unless it
        has expired meanwhile or clashes with one already known."""
        if now - last_used > self.ttl or conversation_id in self._entries:
            return
        entry = Conversation(agent_id, user_id, last_response_id, last_used, conversation_id)
        self._entries[conversation_id] = entry
        self._per_agent[agent_id] += 1
        for response_id in turns[-TURNS_KEPT:]:
            self._add_turn(entry, response_id)
        while len(self._entries) > self.limit:
            self._pop_oldest()

    def _decrement(self, agent_id: str) -> None:
        self._per_agent[agent_id] -= 1
        if self._per_agent[agent_id] <= 0:
            del self._per_agent[agent_id]
