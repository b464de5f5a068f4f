"""The registry of live agent sessions and the choice of the next one.

The pool is plain data: it owns no task and does no I/O. The dispatcher calls
it synchronously, so every change here is atomic with respect to Trio.

Choosing must cost the same with 10,000 agents as with 8, so sessions that
have a free slot sit in buckets by their in-flight count, each bucket a dict
kept in the order sessions entered it. The rule "fewest in-flight, ties to the
one idle longest" is then: the first session of the lowest non-empty bucket.
Full sessions are in no bucket. Cost: O(max capacity) for a pick, O(1) to take
or release a slot.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from relayd.agents.session import AgentSession

__all__ = ["AgentPool", "PoolStatistics", "eligible"]


def eligible(
    session: AgentSession, exclude: Collection[str], model: str | None, v2_only: bool
) -> bool:
    """Whether a request (for ``model``, needing v2 or not) may go to ``session``."""
    return (
        session.agent_id not in exclude
        and session.serves(model)
        and (not v2_only or session.version == 2)
    )


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    connected: int
    busy: int  # sessions with every slot taken
    inflight: int
    capacity: int


class AgentPool:
    """Live sessions by agent id, and their free slots."""

    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._free: list[dict[AgentSession, None]] = []  # index: in-flight count
        self._inflight = 0
        self._capacity = 0
        self._draining = 0  # registered sessions that take no new work

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[AgentSession]:
        return iter(list(self._sessions.values()))

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._sessions

    def get(self, agent_id: str) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def add(self, session: AgentSession) -> None:
        """Register a session under its ``agent_id`` (which must be free)."""
        if session.agent_id in self._sessions:
            raise KeyError(f"{session.agent_id} is already registered")
        self._sessions[session.agent_id] = session
        self._capacity += session.capacity
        self._inflight += session.inflight
        self._file(session)

    def remove(self, session: AgentSession) -> bool:
        """Forget ``session``; False if it was not (or no longer) registered."""
        if self._sessions.get(session.agent_id) is not session:
            return False
        del self._sessions[session.agent_id]
        self._unfile(session)
        if session.draining:
            self._draining -= 1
        self._capacity -= session.capacity
        self._inflight -= session.inflight
        return True

    def pick(
        self, exclude: Collection[str] = (), model: str | None = None, *, v2_only: bool = False
    ) -> AgentSession | None:
        """The session a new conversation should go to, or None if all are full.

        Only sessions that serve ``model`` (None: any), and with ``v2_only``
        only protocol v2 sessions (chat requests), are candidates.
        """
        if model is None and not v2_only:
            for bucket in self._free:
                for session in bucket:
                    if session.agent_id not in exclude:
                        return session
            return None
        for bucket in self._free:
            for session in bucket:
                if eligible(session, exclude, model, v2_only):
                    return session
        return None

    def has_candidate(
        self, exclude: Collection[str], model: str | None = None, *, v2_only: bool = False
    ) -> bool:
        """Whether any registered session, busy or not, could take such a request."""
        if model is None and not v2_only and not self._draining:
            if len(exclude) < len(self._sessions):
                return True
            return any(agent_id not in exclude for agent_id in self._sessions)
        return any(
            eligible(session, exclude, model, v2_only) and not session.draining
            for session in self._sessions.values()
        )

    def models(self) -> tuple[list[str], bool]:
        """``(models named by connected agents, whether one takes any model)``."""
        named: dict[str, None] = {}
        any_model = False
        for session in self._sessions.values():
            if session.draining:
                continue
            if not session.models:
                any_model = True
            named.update(dict.fromkeys(session.models))
        return sorted(named), any_model

    def set_draining(self, session: AgentSession) -> None:
        """A draining session takes no new work: it leaves the free buckets.
        (``session.draining`` is already set.)"""
        if self._sessions.get(session.agent_id) is session:
            self._unfile(session)
            self._draining += 1

    def take(self, session: AgentSession) -> None:
        """Occupy one of ``session``'s slots (it must have one free)."""
        if session.inflight >= session.capacity:
            raise ValueError(f"{session} has no free slot")
        self._unfile(session)
        session.inflight += 1
        if self._sessions.get(session.agent_id) is session:
            self._inflight += 1
        self._file(session)

    def release(self, session: AgentSession) -> None:
        """Free one of ``session``'s slots."""
        if session.inflight <= 0:
            raise ValueError(f"{session} has no slot taken")
        self._unfile(session)
        session.inflight -= 1
        if self._sessions.get(session.agent_id) is session:
            self._inflight -= 1
            self._file(session)

    def resize(self, session: AgentSession, capacity: int) -> None:
        """Change a session's capacity (config reload, or a v2 agent announcing it)."""
        registered = self._sessions.get(session.agent_id) is session
        self._unfile(session)
        if registered:
            self._capacity += capacity - session.capacity
        session.capacity = capacity
        if registered:
            self._file(session)

    def statistics(self) -> PoolStatistics:
        busy = len(self._sessions) - sum(len(bucket) for bucket in self._free)
        if self._draining:  # a draining session leaves the free buckets with slots free
            busy -= sum(
                1
                for session in self._sessions.values()
                if session.draining and session.inflight < session.capacity
            )
        return PoolStatistics(len(self._sessions), busy, self._inflight, self._capacity)

    def _file(self, session: AgentSession) -> None:
        if (
            session.inflight < session.capacity
            and not session.draining
            and self._sessions.get(session.agent_id) is session
        ):
            while len(self._free) <= session.inflight:
                self._free.append({})
            self._free[session.inflight][session] = None

    def _unfile(self, session: AgentSession) -> None:
        if session.inflight < len(self._free):
            self._free[session.inflight].pop(session, None)
