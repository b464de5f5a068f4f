"""Conversations for a stateless chat backend: each one's tree of turns, in SQLite.

A seed-style question (``kind: "ask"``) carries only the new text, the
conversation's id and the turn it follows (``parent_id``). A chat backend
remembers nothing, so the agent keeps every turn, question and answer, keyed
by the ``response_id`` it gave out; the backend then gets the whole path from
the first turn to the parent, and asking again from an older ``parent_id``
starts a branch beside the later turns.

Owns one SQLite file in the state directory (``conversations.sqlite3``), so
that a restarted agent still knows its conversations. Every statement runs in
a worker thread (:func:`trio.to_thread.run_sync`), one at a time (a capacity
limiter of one guards the connection), so the event loop never waits on the
disk. Time is passed in (``clock``), so tests control it.

Bounds, enforced after every new turn and at start-up: conversations unused
for ``ttl`` are deleted; beyond ``max_conversations`` conversations or
``max_bytes`` of text, the least recently used go first, whole (a tree with a
hole in it would send the backend a history with a hole in it).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

__all__ = ["DB_NAME", "ConversationStore", "History", "Limits", "StoreError", "UnknownTurn"]

DB_NAME = "conversations.sqlite3"
SCHEMA_VERSION = 1

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    model TEXT,
    created REAL NOT NULL,
    used REAL NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_use ON conversations(used);
CREATE TABLE IF NOT EXISTS turns (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns(conversation_id, created);
"""

# The path from a turn up to the conversation's first turn.
_CHAIN = """
WITH RECURSIVE chain(id, parent_id, question, answer, depth) AS (
    SELECT id, parent_id, question, answer, 0 FROM turns
    WHERE id = ? AND conversation_id = ?
    UNION ALL
    SELECT t.id, t.parent_id, t.question, t.answer, c.depth + 1
    FROM turns t JOIN chain c ON t.id = c.parent_id
    WHERE t.conversation_id = ?
)
SELECT question, answer FROM chain ORDER BY depth DESC
"""


class StoreError(Exception):
    """The conversation store cannot be opened or used; the message names the file."""


class UnknownTurn(Exception):
    """The conversation is known, but not the turn the question follows."""


@dataclass(frozen=True)
class Limits:
    max_conversations: int
    max_bytes: int
    ttl: float


@dataclass(frozen=True)
class History:
    """A conversation's path up to one turn: the model it used, and its
    (question, answer) pairs, oldest first."""

    model: str | None
    turns: tuple[tuple[str, str], ...]
    parent_id: str | None  # the turn a new one follows (None: the first turn)


class ConversationStore:
    """The conversation trees of one agent, in ``<state_dir>/conversations.sqlite3``.

    Build it with :meth:`open`; :meth:`aclose` it. Raises :class:`StoreError`
    (naming the file) when SQLite fails.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        limits: Limits,
        clock: Callable[[], float],
    ) -> None:
        self._db = connection
        self.path = path
        self.limits = limits
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self.evicted = 0  # conversations dropped by the bounds, for the log and tests

    @classmethod
    async def open(
        cls, directory: Path, limits: Limits, *, clock: Callable[[], float] = time.time
    ) -> ConversationStore:
        path = directory / DB_NAME

        def connect() -> sqlite3.Connection:
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            except sqlite3.Error as error:
                raise StoreError(f"{path}: cannot open the conversation store: {error}") from None
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise StoreError(
                        f"{path}: written by a newer relayd (schema {version}); move it away"
                    )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.Error as error:
                db.close()
                raise StoreError(f"{path}: cannot use the conversation store: {error}") from None
            except BaseException:
                db.close()
                raise
            return db

        connection = await trio.to_thread.run_sync(connect)
        store = cls(connection, path, limits, clock)
        await store._run(store._prune_locked, None)
        return store

    async def aclose(self) -> None:
        await self._run(lambda: self._db.close())

    async def _run(self, function: Callable[..., _T], *args: object) -> _T:
        """Run ``function(*args)`` on the connection in a worker thread, one at a time.

        Not abandoned on cancel: a statement under way finishes (or rolls back)
        before the caller's cancellation goes on.
        """

        def call() -> _T:
            try:
                return function(*args)
            except sqlite3.Error as error:
                raise StoreError(f"{self.path}: {error}") from error

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    # -- reading -------------------------------------------------------------------------

    async def history(self, conversation_id: str, parent_id: str) -> History | None:
        """The path to ``parent_id`` in ``conversation_id`` (the latest turn when
        ``parent_id`` is empty); None for a conversation this store does not
        know. Raises :class:`UnknownTurn` for a turn it does not know in it."""
        return await self._run(self._history, conversation_id, parent_id)

    def _history(self, conversation_id: str, parent_id: str) -> History | None:
        row = self._db.execute(
            "SELECT model FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            return None
        if not parent_id:
            latest = self._db.execute(
                "SELECT id FROM turns WHERE conversation_id = ? ORDER BY created DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            if latest is None:
                return History(row[0], (), None)
            parent_id = latest[0]
        chain = self._db.execute(_CHAIN, (parent_id, conversation_id, conversation_id)).fetchall()
        if not chain:
            raise UnknownTurn(parent_id)
        self._db.execute(
            "UPDATE conversations SET used = ? WHERE id = ?", (self._clock(), conversation_id)
        )
        return History(row[0], tuple((q, a) for q, a in chain), parent_id)

    async def counts(self) -> tuple[int, int, int]:
        """(conversations, turns, bytes) held now."""

        def count() -> tuple[int, int, int]:
            conversations, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM conversations"
            ).fetchone()
            turns = self._db.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
            return int(conversations), int(turns), int(size)

        return await self._run(count)

    # -- writing -------------------------------------------------------------------------

    async def add_turn(
        self,
        conversation_id: str,
        parent_id: str | None,
        question: str,
        answer: str,
        model: str | None,
    ) -> str:
        """Record a turn (a new conversation when ``conversation_id`` is new);
        its ``response_id``. Enforces the bounds afterwards."""
        response_id = str(uuid.uuid4())
        await self._run(
            self._add_turn, response_id, conversation_id, parent_id, question, answer, model
        )
        return response_id

    def _add_turn(
        self,
        response_id: str,
        conversation_id: str,
        parent_id: str | None,
        question: str,
        answer: str,
        model: str | None,
    ) -> None:
        now = self._clock()
        size = len(question.encode("utf-8", "surrogatepass")) + len(
            answer.encode("utf-8", "surrogatepass")
        )
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO conversations (id, model, created, used, bytes) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "used = excluded.used, bytes = bytes + excluded.bytes, "
                "model = COALESCE(excluded.model, model)",
                (conversation_id, model, now, now, size),
            )
            db.execute(
                "INSERT INTO turns (id, conversation_id, parent_id, question, answer, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (response_id, conversation_id, parent_id, question, answer, now),
            )
            self._prune_locked(conversation_id)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _prune_locked(self, keep: str | None) -> None:
        """Delete what is past the bounds: expired conversations, then the least
        recently used ones while there are too many or too many bytes. ``keep``
        (the conversation just written) goes last."""
        db = self._db
        limits = self.limits
        cursor = db.execute(
            "DELETE FROM conversations WHERE used < ?", (self._clock() - limits.ttl,)
        )
        evicted = max(cursor.rowcount, 0)
        count, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM conversations"
        ).fetchone()
        if count > limits.max_conversations or size > limits.max_bytes:
            oldest = db.execute(
                "SELECT id, bytes FROM conversations ORDER BY id = ?, used", (keep or "",)
            )
            doomed = []
            for conversation_id, conversation_bytes in oldest:
                if count <= limits.max_conversations and size <= limits.max_bytes:
                    break
                doomed.append((conversation_id,))
                count -= 1
                size -= conversation_bytes
            db.executemany("DELETE FROM conversations WHERE id = ?", doomed)
            evicted += len(doomed)
        self.evicted += evicted
