"""What a restart must not lose: conversation ownership, agent identities and
idempotent answers, kept in ``<state_dir>/relay.sqlite3``.

The hot path never touches the file. The in-memory tables (the dispatcher's
:class:`~relayd.conversations.Conversations`, its agent identities, the
:class:`Idempotency` store) keep a journal of what changed; :meth:`StateFile.run`
writes the journal in one transaction every :data:`FLUSH_INTERVAL` in a
worker thread. A crash (``kill -9``) loses at most that window, and SQLite's
WAL journal keeps the file whole whatever happens. A file that cannot be read
(damaged, not SQLite, a newer schema) is moved aside with an error-priority
log and a fresh one started: relayd always starts.

Times in the file are wall-clock (``time.time()``); in memory relayd uses
Trio's clock, so rows are translated on load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = ["FLUSH_INTERVAL", "Change", "Loaded", "StateFile", "StoredAnswer", "StoredConversation"]

log = logging.getLogger("relayd.persist")

FILE_NAME = "relay.sqlite3"
FLUSH_INTERVAL = 1.0
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    last_response_id TEXT NOT NULL,
    last_used REAL NOT NULL,
    turns TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    agent_id TEXT PRIMARY KEY,
    credential TEXT NOT NULL,
    seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (user_id, key)
);
"""


@dataclass(frozen=True, slots=True)
class StoredConversation:
    conversation_id: str
    agent_id: str
    user_id: str
    last_response_id: str
    last_used: float  # wall clock
    turns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    user_id: str
    key: str
    body_hash: str
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    created: float  # wall clock


@dataclass(frozen=True, slots=True)
class Loaded:
    conversations: list[StoredConversation]
    identities: list[tuple[str, str]]  # agent id, credential; oldest first
    answers: list[StoredAnswer]


# One journal entry: a row to write (a tuple of values) or to delete (its key only).
Change = tuple[str, tuple[Any, ...], bool]  # table, values or key, delete?


class StateFile:
    """The SQLite file and its writer. See the module docstring.

    ``sources`` are callables that each return (and clear) a list of changes:
    the in-memory tables' journals.
    """

    def __init__(self, path: Path, sources: Iterable[Callable[[], list[Change]]] = ()) -> None:
        self.path = path
        self.sources = list(sources)
        self._db: sqlite3.Connection | None = None

    @classmethod
    def in_directory(cls, state_dir: Path) -> StateFile:
        return cls(state_dir / FILE_NAME)

    # -- opening and loading (at start, in a worker thread) -----------------------

    def open_and_load(self, *, now: float | None = None) -> Loaded:
        """Open the file (moving a damaged one aside) and read what it holds."""
        try:
            return self._open_and_load()
        except (sqlite3.DatabaseError, ValueError) as error:
            self._set_aside(error)
            return self._open_and_load()

    def _open_and_load(self) -> Loaded:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ValueError(f"schema version {version}, this relayd knows {SCHEMA_VERSION}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conversations = [
                StoredConversation(
                    row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5]))
                )
                for row in db.execute(
                    "SELECT conversation_id, agent_id, user_id, last_response_id, last_used, turns"
                    " FROM conversations ORDER BY last_used"
                )
            ]
            identities = [
                (row[0], row[1])
                for row in db.execute("SELECT agent_id, credential FROM identities ORDER BY seen")
            ]
            answers = [
                StoredAnswer(
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    bytes(row[4]),
                    tuple((bytes.fromhex(n), bytes.fromhex(v)) for n, v in json.loads(row[5])),
                    row[6],
                )
                for row in db.execute(
                    "SELECT user_id, key, body_hash, status, body, headers, created"
                    " FROM idempotency ORDER BY created"
                )
            ]
        except BaseException:
            db.close()
            raise
        self._db = db
        return Loaded(conversations, identities, answers)

    def _set_aside(self, error: Exception) -> None:
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        log.error(
            "state file %s cannot be read (%s); moved it to %s and started a fresh one: "
            "conversations and idempotent answers from before are forgotten",
            self.path,
            error,
            aside,
        )
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(self.path) + suffix).rename(str(aside) + suffix)

    # -- writing -----------------------------------------------------------------

    async def run(self) -> None:
        """Write the journals every FLUSH_INTERVAL until cancelled; then once more."""
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()
                await trio.to_thread.run_sync(self.close)

    async def flush(self) -> int:
        """Write what changed since the last flush; how many changes."""
        changes: list[Change] = []
        for source in self.sources:
            changes += source()
        if changes and self._db is not None:
            try:
                await trio.to_thread.run_sync(self._write, changes)
            except sqlite3.Error as error:
                log.error("cannot write the state file %s: %s", self.path, error)
        return len(changes)

    def _write(self, changes: list[Change]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            for table, values, delete in changes:
                db.execute(_DELETE[table] if delete else _UPSERT[table], values)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_UPSERT = {
    "conversations": "INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
    "identities": "INSERT OR REPLACE INTO identities VALUES (?, ?, ?)",
    "idempotency": "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)",
}
_DELETE = {
    "conversations": "DELETE FROM conversations WHERE conversation_id = ?",
    "identities": "DELETE FROM identities WHERE agent_id = ?",
    "idempotency": "DELETE FROM idempotency WHERE user_id = ? AND key = ?",
}


def conversation_row(entry: Any, wall_offset: float) -> tuple[Any, ...]:
    """A Conversation as a row (``wall_offset``: wall clock minus Trio's clock)."""
    return (
        entry.conversation_id,
        entry.agent_id,
        entry.user_id,
        entry.last_response_id,
        entry.last_used + wall_offset,
        json.dumps(entry.turns),
    )


def answer_row(answer: StoredAnswer) -> tuple[Any, ...]:
    return (
        answer.user_id,
        answer.key,
        answer.body_hash,
        answer.status,
        answer.body,
        json.dumps([(n.hex(), v.hex()) for n, v in answer.headers]),
        answer.created,
    )
