"""The agent's conversation trees (relayd.agent.history): paths, branches, bounds, a restart.

Real SQLite files in a temporary directory; the store's clock is a variable
the test moves, so age is tested without waiting.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from relayd.agent.history import DB_NAME, ConversationStore, Limits, StoreError, UnknownTurn

BIG = Limits(max_conversations=1000, max_bytes=1 << 30, ttl=86400)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_path_is_sent_whole_and_an_older_parent_branches(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, BIG)
        r1 = await store.add_turn("c", None, "q1", "a1", "m")
        r2 = await store.add_turn("c", r1, "q2", "a2", None)
        r3 = await store.add_turn("c", r2, "q3", "a3", None)
        history = await store.history("c", r3)
        assert history is not None
        assert history.turns == (("q1", "a1"), ("q2", "a2"), ("q3", "a3"))
        assert history.model == "m" and history.parent_id == r3
        # A branch from turn 1 sees turn 1 only; the later turns stay.
        branch = await store.add_turn("c", r1, "q2'", "a2'", None)
        history = await store.history("c", branch)
        assert history is not None and history.turns == (("q1", "a1"), ("q2'", "a2'"))
        history = await store.history("c", r3)
        assert history is not None and len(history.turns) == 3
        # No parent: the latest turn.
        latest = await store.history("c", "")
        assert latest is not None and latest.parent_id == branch
        assert await store.counts() == (1, 4, 3 * len("q1a1") + len("q2'a2'"))
        await store.aclose()


async def test_unknown_conversations_and_turns(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, BIG)
        first = await store.add_turn("c1", None, "q", "a", None)
        await store.add_turn("c2", None, "q", "a", None)
        assert await store.history("nope", first) is None
        with pytest.raises(UnknownTurn):
            await store.history("c1", "no-such-turn")
        with pytest.raises(UnknownTurn):  # a turn of another conversation
            await store.history("c2", first)
        await store.aclose()


async def test_a_restart_keeps_the_conversations(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, BIG)
        r1 = await store.add_turn("c", None, "é 日本", "ok", "m")
        await store.aclose()
        again = await ConversationStore.open(tmp_path, BIG)
        history = await again.history("c", r1)
        assert history is not None and history.turns == (("é 日本", "ok"),)
        await again.aclose()


async def test_the_count_bound_drops_the_least_recently_used(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, Limits(3, 1 << 30, 86400), clock=clock)
        turns = {}
        for name in ("a", "b", "c"):
            clock.now += 1
            turns[name] = await store.add_turn(name, None, "q", "a", None)
        clock.now += 1
        assert await store.history("a", turns["a"]) is not None  # "a" is used again
        clock.now += 1
        await store.add_turn("d", None, "q", "a", None)  # one too many: "b" goes
        assert await store.history("b", turns["b"]) is None
        for name in ("a", "c"):
            assert await store.history(name, turns[name]) is not None
        assert store.evicted == 1
        await store.aclose()


async def test_the_byte_bound_drops_whole_conversations(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, Limits(100, 1000, 86400), clock=clock)
        old = await store.add_turn("old", None, "x" * 300, "y" * 300, None)
        clock.now += 1
        new = await store.add_turn("new", None, "x" * 201, "y" * 200, None)
        assert await store.history("old", old) is None  # 1001 bytes: over 1000
        assert await store.history("new", new) is not None
        _, turns, size = await store.counts()
        assert (turns, size) == (1, 401)
        await store.aclose()


async def test_the_age_bound_at_each_turn_and_at_start_up(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, Limits(100, 1 << 30, 60), clock=clock)
        stale = await store.add_turn("stale", None, "q", "a", None)
        clock.now += 61
        await store.add_turn("fresh", None, "q", "a", None)
        assert await store.history("stale", stale) is None
        await store.aclose()
        clock.now += 61
        store = await ConversationStore.open(tmp_path, Limits(100, 1 << 30, 60), clock=clock)
        assert await store.counts() == (0, 0, 0)
        await store.aclose()


async def test_sqlite_runs_in_worker_threads_never_on_the_event_loop(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = await ConversationStore.open(tmp_path, BIG)
        threads: set[int] = set()
        store._db.set_trace_callback(lambda statement: threads.add(threading.get_ident()))
        first = await store.add_turn("c", None, "q", "a", None)
        await store.history("c", first)
        assert threads and threading.get_ident() not in threads
        await store.aclose()


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    with trio.fail_after(10), pytest.raises(StoreError) as raised:
        await ConversationStore.open(tmp_path, BIG)
    assert str(tmp_path / DB_NAME) in str(raised.value)
