"""The agent pool: who gets the next new conversation, and its bookkeeping.

The pool only reads ``agent_id``, ``capacity`` and ``inflight`` of a session
(and hashes it), so these tests use lightweight fake sessions; the cost test
counts how many sessions a pick looks at instead of timing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relayd.agents.pool import AgentPool, PoolStatistics
from relayd.agents.session import AgentSession


class FakeSession:
    """What the pool sees of a session; counts reads of ``agent_id``."""

    reads = 0  # class-wide: how many times any fake's agent_id was read

    def __init__(self, agent_id: str, capacity: int = 1, inflight: int = 0) -> None:
        self._agent_id = agent_id
        self.capacity = capacity
        self.inflight = inflight
        self.draining = False
        self.version = 1
        self.models: tuple[str, ...] = ()

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    @property
    def agent_id(self) -> str:
        FakeSession.reads += 1
        return self._agent_id

    def __repr__(self) -> str:
        return f"Fake({self._agent_id}, {self.inflight}/{self.capacity})"


def fake(agent_id: str, capacity: int = 1, inflight: int = 0) -> AgentSession:
    return cast(AgentSession, FakeSession(agent_id, capacity, inflight))


def pool_of(*sessions: AgentSession) -> AgentPool:
    pool = AgentPool()
    for session in sessions:
        pool.add(session)
    return pool


def test_empty_pool() -> None:
    pool = AgentPool()
    assert pool.pick() is None
    assert len(pool) == 0
    assert list(pool) == []
    assert pool.statistics() == PoolStatistics(connected=0, busy=0, inflight=0, capacity=0)
    assert not pool.has_candidate(())


def test_fewest_in_flight_is_picked() -> None:
    a, b, c = fake("a", 3), fake("b", 3), fake("c", 3)
    pool = pool_of(a, b, c)
    pool.take(a)
    pool.take(a)
    pool.take(b)
    assert pool.pick() is c
    pool.take(c)
    assert pool.pick() is b  # b and c at 1; b has been at 1 longer
    pool.take(b)
    assert pool.pick() is c
    pool.take(c)
    assert pool.pick() is a  # everyone at 2
    pool.release(c)
    assert pool.pick() is c


def test_ties_go_to_the_longest_idle() -> None:
    a, b, c = fake("a"), fake("b"), fake("c")
    pool = pool_of(a, b, c)
    assert pool.pick() is a  # connected first, idle longest
    pool.take(a)
    pool.release(a)  # a just finished: now the most recently idle
    assert pool.pick() is b
    pool.take(b)
    pool.take(c)
    pool.release(c)
    pool.release(b)
    assert pool.pick() is a
    pool.take(a)
    assert pool.pick() is c  # c went idle before b
    pool.take(c)
    assert pool.pick() is b


def test_full_agents_are_never_picked() -> None:
    a, b = fake("a"), fake("b")
    pool = pool_of(a, b)
    pool.take(a)
    for _ in range(5):
        assert pool.pick() is b
    pool.take(b)
    assert pool.pick() is None
    assert pool.statistics().busy == 2
    with pytest.raises(ValueError, match="no free slot"):
        pool.take(a)
    assert a.inflight == 1
    assert pool.statistics().inflight == 2


def test_capacity_above_one() -> None:
    a = fake("a", capacity=4)
    pool = pool_of(a)
    for n in range(4):
        assert pool.pick() is a
        assert pool.statistics() == PoolStatistics(1, 0, n, 4)
        pool.take(a)
    assert pool.pick() is None
    assert pool.statistics() == PoolStatistics(1, 1, 4, 4)
    pool.release(a)
    assert pool.pick() is a
    assert pool.statistics() == PoolStatistics(1, 0, 3, 4)


def test_exclude() -> None:
    a, b, c = fake("a"), fake("b"), fake("c")
    pool = pool_of(a, b, c)
    assert pool.pick(exclude={"a"}) is b
    assert pool.pick(exclude={"a", "b"}) is c
    assert pool.pick(exclude={"a", "b", "c"}) is None
    assert pool.pick(exclude=frozenset({"b"})) is a
    pool.take(c)
    assert pool.pick(exclude={"a", "b"}) is None
    assert pool.has_candidate({"a", "b"})  # c is busy but connected
    assert not pool.has_candidate({"a", "b", "c"})
    assert pool.has_candidate({"a", "b", "c", "gone"} - {"c"})
    assert not pool.has_candidate({"a", "b", "c", "x", "y"})


def test_resize() -> None:
    a, b = fake("a", 1), fake("b", 1)
    pool = pool_of(a, b)
    pool.take(a)
    pool.take(b)
    assert pool.pick() is None
    pool.resize(a, 3)
    assert a.capacity == 3
    assert pool.pick() is a
    assert pool.statistics() == PoolStatistics(2, 1, 2, 4)
    pool.take(a)
    pool.take(a)
    pool.resize(a, 2)  # below what is in flight: full until two finish
    assert pool.pick() is None
    assert pool.statistics() == PoolStatistics(2, 2, 4, 3)
    pool.release(a)
    assert pool.pick() is None
    pool.release(a)
    assert pool.pick() is a
    assert pool.statistics() == PoolStatistics(2, 1, 2, 3)


def test_resize_of_an_unregistered_session_leaves_the_pool_alone() -> None:
    a, b = fake("a"), fake("b")
    pool = pool_of(a)
    pool.resize(b, 5)
    assert b.capacity == 5
    assert pool.statistics() == PoolStatistics(1, 0, 0, 1)
    assert pool.pick() is a


def test_statistics_follow_add_take_release_remove() -> None:
    a, b = fake("a", 2), fake("b", 1)
    pool = pool_of(a, b)
    assert pool.statistics() == PoolStatistics(2, 0, 0, 3)
    pool.take(a)
    pool.take(b)
    assert pool.statistics() == PoolStatistics(2, 1, 2, 3)
    pool.take(a)
    assert pool.statistics() == PoolStatistics(2, 2, 3, 3)
    assert pool.remove(a)
    assert pool.statistics() == PoolStatistics(1, 1, 1, 1)
    # The session's own slots finish after it left: the pool is not affected.
    pool.release(a)
    pool.release(a)
    assert a.inflight == 0
    assert pool.statistics() == PoolStatistics(1, 1, 1, 1)
    assert pool.pick() is None
    pool.release(b)
    assert pool.statistics() == PoolStatistics(1, 0, 0, 1)
    assert pool.remove(b)
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0)


def test_add_a_session_with_work_in_flight() -> None:
    a = fake("a", capacity=2, inflight=2)
    pool = pool_of(a)
    assert pool.statistics() == PoolStatistics(1, 1, 2, 2)
    assert pool.pick() is None
    pool.release(a)
    assert pool.pick() is a


def test_registry() -> None:
    a, b = fake("a"), fake("b")
    pool = pool_of(a, b)
    assert len(pool) == 2
    assert "a" in pool and "zzz" not in pool
    assert pool.get("b") is b
    assert pool.get("zzz") is None
    assert list(pool) == [a, b]
    with pytest.raises(KeyError, match="already registered"):
        pool.add(fake("a"))
    assert pool.get("a") is a


def test_remove_only_the_registered_session_of_an_id() -> None:
    older, newer = fake("same"), fake("same")
    pool = pool_of(older)
    pool.take(older)
    assert pool.remove(older)
    pool.add(newer)
    assert not pool.remove(older)  # a reclaimed id: the old session must not take it away
    assert pool.get("same") is newer
    pool.release(older)  # the old session's late reply
    assert pool.pick() is newer
    assert pool.statistics() == PoolStatistics(1, 0, 0, 1)
    assert not pool.remove(fake("never-added"))


def test_release_without_a_slot_is_an_error() -> None:
    a = fake("a")
    pool = pool_of(a)
    with pytest.raises(ValueError, match="no slot taken"):
        pool.release(a)
    assert pool.statistics() == PoolStatistics(1, 0, 0, 1)


def test_iteration_is_a_snapshot() -> None:
    a, b = fake("a"), fake("b")
    pool = pool_of(a, b)
    for session in pool:
        pool.remove(session)
    assert len(pool) == 0


# -- cost: counted, not timed ---------------------------------------------------------


def counted(action: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """(reads of agent_id during ``action(*args)``, its result)."""
    before = FakeSession.reads
    result = action(*args)
    return FakeSession.reads - before, result


@pytest.mark.parametrize("size", [10, 10_000])
def test_pick_looks_at_a_constant_number_of_sessions(size: int) -> None:
    sessions = [fake(f"agent-{n}", capacity=2) for n in range(size)]
    pool = pool_of(*sessions)
    # All idle, all in the same bucket: the first is the answer.
    assert counted(pool.pick) == (1, sessions[0])
    # Excluding a few costs a few more looks, not a scan.
    exclude = {f"agent-{n}" for n in range(5)}
    assert counted(pool.pick, exclude) == (6, sessions[5])
    # Taking and releasing a slot touches O(1) entries too.
    assert counted(pool.take, sessions[0])[0] <= 6
    assert counted(pool.release, sessions[0])[0] <= 6
    # Everyone busy at 1 but one idle session at the very end: found at once.
    for session in sessions[:-1]:
        pool.take(session)
    assert counted(pool.pick) == (1, sessions[-1])
    # And with every slot taken, saying "none" is as cheap.
    for session in sessions:
        while session.inflight < session.capacity:
            pool.take(session)
    assert counted(pool.pick) == (0, None)


def test_pick_cost_does_not_grow_with_the_pool() -> None:
    def cost(size: int) -> int:
        sessions = [fake(f"agent-{n}", capacity=3) for n in range(size)]
        pool = pool_of(*sessions)
        for session in sessions[: size // 2]:
            pool.take(session)
        total = 0
        for _ in range(50):
            reads, chosen = counted(pool.pick)
            assert chosen is not None
            total += reads + counted(pool.take, chosen)[0]
        return total

    assert cost(10_000) == cost(100)


# -- a model of the rule, checked against random operations --------------------------


class PoolModel(RuleBasedStateMachine):
    """pick() == the registered session with a free slot, fewest in flight, then
    the one that entered its current in-flight count the earliest."""

    @initialize()
    def setup(self) -> None:
        self.pool = AgentPool()
        self.sessions: dict[str, AgentSession] = {}
        self.entered: dict[str, int] = {}
        self.clock = 0

    def _touch(self, agent_id: str) -> None:
        self.clock += 1
        self.entered[agent_id] = self.clock

    @rule(agent_id=st.sampled_from("abcdef"), capacity=st.integers(1, 3))
    def add(self, agent_id: str, capacity: int) -> None:
        if agent_id in self.sessions:
            return
        session = fake(agent_id, capacity)
        self.pool.add(session)
        self.sessions[agent_id] = session
        self._touch(agent_id)

    @rule(agent_id=st.sampled_from("abcdef"))
    def remove(self, agent_id: str) -> None:
        session = self.sessions.pop(agent_id, None)
        if session is not None:
            assert self.pool.remove(session)

    @rule(agent_id=st.sampled_from("abcdef"))
    def take(self, agent_id: str) -> None:
        session = self.sessions.get(agent_id)
        if session is not None and session.inflight < session.capacity:
            self.pool.take(session)
            self._touch(agent_id)

    @rule(agent_id=st.sampled_from("abcdef"))
    def release(self, agent_id: str) -> None:
        session = self.sessions.get(agent_id)
        if session is not None and session.inflight > 0:
            self.pool.release(session)
            self._touch(agent_id)

    @rule(agent_id=st.sampled_from("abcdef"), capacity=st.integers(1, 4))
    def resize(self, agent_id: str, capacity: int) -> None:
        session = self.sessions.get(agent_id)
        if session is not None:
            self.pool.resize(session, capacity)
            self._touch(agent_id)

    @rule(exclude=st.sets(st.sampled_from("abcdef")))
    def pick(self, exclude: set[str]) -> None:
        candidates = [
            s
            for s in self.sessions.values()
            if s.inflight < s.capacity and s.agent_id not in exclude
        ]
        expected = min(
            candidates, key=lambda s: (s.inflight, self.entered[s.agent_id]), default=None
        )
        assert self.pool.pick(exclude) is expected

    @invariant()
    def statistics_match(self) -> None:
        if not hasattr(self, "pool"):
            return
        sessions = list(self.sessions.values())
        assert self.pool.statistics() == PoolStatistics(
            connected=len(sessions),
            busy=sum(1 for s in sessions if s.inflight >= s.capacity),
            inflight=sum(s.inflight for s in sessions),
            capacity=sum(s.capacity for s in sessions),
        )


PoolModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_model = PoolModel.TestCase
