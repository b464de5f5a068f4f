"""The user token store: ``<state_dir>/users.toml``, written by relayd.

Tokens are 256-bit random strings shown once, when they are created; the file
keeps only their SHA-256. The file is TOML so an operator can read it and, in a
pinch, edit it by hand (delete a user, rename one).

Invariants:

* Every write is a read-modify-write of the file as it is on disk, under an
  exclusive ``flock`` on ``users.toml.lock``: the daemon and ``relayd users``
  commands can run at the same time, and a hand edit made before a write is
  kept.
* Every write is atomic and durable: a temporary file in the same directory,
  fsync, ``os.replace``, fsync of the directory, mode 0600. A reader sees the
  old file or the new one, never a torn one.
* A file that cannot be parsed is never overwritten: it is an error naming it.

The in-memory view is a :class:`UserTable` snapshot; the daemon swaps in a new
snapshot after each change or reload.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import os
import secrets
import tempfile
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

__all__ = [
    "User",
    "UserStore",
    "UserStoreError",
    "UserTable",
    "atomic_write",
    "hash_token",
    "new_token",
    "secret_digest",
]

USERS_FILE = "users.toml"
_HEADER = (
    "# relayd users. Written by relayd (`relayd users add/delete`, the admin API).\n"
    "# Tokens are stored only as SHA-256 hashes. You may delete or rename users by\n"
    "# hand; then run `systemctl reload relayd` (or send SIGHUP).\n\n"
)


class UserStoreError(Exception):
    """The users file cannot be read or written; the message names it."""


def new_token() -> str:
    """A fresh 256-bit token, URL-safe so it fits a header or a query string."""
    return secrets.token_urlsafe(32)


def secret_digest(secret: str) -> bytes:
    """SHA-256 of a token or key, the only form in which relayd keeps secrets.

    ``surrogatepass`` so that no string a client can send makes it raise.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def hash_token(token: str) -> str:
    return secret_digest(token).hex()


@dataclass(frozen=True)
class User:
    user_id: str
    token_sha256: str = field(repr=False)
    created: dt.datetime
    name: str | None = None

    def public(self) -> dict[str, Any]:
        """What the admin API may show: never the token hash."""
        return {
            "user_id": self.user_id,
            "name": self.name,
            "created": self.created.isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True)
class UserTable:
    """An immutable snapshot of the users, indexed for token lookup."""

    users: tuple[User, ...] = ()
    _by_hash: Mapping[str, User] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, users: tuple[User, ...]) -> UserTable:
        return cls(users, {user.token_sha256: user for user in users})

    def __len__(self) -> int:
        return len(self.users)

    def authenticate(self, token: str) -> User | None:
        """The user holding ``token``, or None.

        The lookup is keyed by the SHA-256 of the presented token, so its timing
        depends only on that hash, which tells an attacker nothing about any
        stored token; the final comparison is constant-time all the same.
        """
        digest = hash_token(token)
        user = self._by_hash.get(digest)
        if user is not None and hmac.compare_digest(user.token_sha256, digest):
            return user
        return None

    def find(self, user_id: str) -> User | None:
        return next((user for user in self.users if user.user_id == user_id), None)


def _owner_for(path: Path, *, from_directory: bool = False) -> tuple[int, int] | None:
    """Who a file written by root into the state directory must belong to.

    ``sudo relayd users add --state-dir /var/lib/relayd`` runs as root, but the
    service reads the file as its own (systemd dynamic) user: a root-owned
    0600 file would lock it out. So root keeps the existing file's owner, or
    gives a new file (always, with ``from_directory``) the directory's owner.
    None when not root (nothing to change, and not allowed) or when root owns
    the place anyway.
    """
    if os.geteuid() != 0:
        return None
    try:
        stat = os.stat(path.parent if from_directory else path)
    except FileNotFoundError:
        stat = os.stat(path.parent)
    if stat.st_uid == 0 and stat.st_gid == 0:
        return None
    return stat.st_uid, stat.st_gid


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never a mix.

    Temp file in the same directory, fsync, ``os.replace``, fsync the directory.
    Written by root, the file keeps (or takes) the state directory's owner.
    """
    directory = path.parent
    owner = _owner_for(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as temp:
            os.fchmod(temp.fileno(), mode)
            if owner is not None:
                os.fchown(temp.fileno(), *owner)
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UserStore:
    """The users file in one state directory. Blocking file I/O, all of it short."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / USERS_FILE
        self._lock_path = state_dir / (USERS_FILE + ".lock")

    def __repr__(self) -> str:
        return f"UserStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            owner = _owner_for(self._lock_path, from_directory=True)
            if owner is not None:
                os.fchown(fd, *owner)  # the service must be able to take the lock too
        except OSError as error:
            raise UserStoreError(f"{self._lock_path}: cannot open: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> UserTable:
        """Read the file; a missing file is an empty table."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return UserTable.of(())
        except OSError as error:
            raise UserStoreError(f"{self.path}: cannot read: {error.strerror}") from None
        return UserTable.of(self._parse(raw))

    def _parse(self, raw: bytes) -> tuple[User, ...]:
        where = str(self.path)
        try:
            document = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UserStoreError(f"{where}: not a valid users file: {error}") from None
        unknown = set(document) - {"users"}
        if unknown:
            raise UserStoreError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected [[users]]")
        entries = document.get("users", [])
        if not isinstance(entries, list):
            raise UserStoreError(f"{where}: users: expected an array of tables [[users]]")
        users: list[User] = []
        seen_ids: set[str] = set()
        seen_hashes: set[str] = set()
        for index, entry in enumerate(entries, 1):
            users.append(self._parse_user(entry, f"{where}: users #{index}"))
            if users[-1].user_id in seen_ids:
                raise UserStoreError(f"{where}: users #{index}: duplicate user_id")
            if users[-1].token_sha256 in seen_hashes:
                raise UserStoreError(f"{where}: users #{index}: duplicate token_sha256")
            seen_ids.add(users[-1].user_id)
            seen_hashes.add(users[-1].token_sha256)
        return tuple(users)

    @staticmethod
    def _parse_user(entry: Any, where: str) -> User:
        if not isinstance(entry, dict):
            raise UserStoreError(f"{where}: expected a table")
        unknown = set(entry) - {"user_id", "name", "token_sha256", "created"}
        if unknown:
            raise UserStoreError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        user_id = entry.get("user_id")
        digest = entry.get("token_sha256")
        created = entry.get("created")
        name = entry.get("name")
        if not isinstance(user_id, str) or not user_id:
            raise UserStoreError(f"{where}: user_id: expected a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64 or not _is_hex(digest):
            raise UserStoreError(f"{where}: token_sha256: expected 64 hex digits")
        if not isinstance(created, dt.datetime):
            raise UserStoreError(f"{where}: created: expected a TOML date-time")
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.UTC)
        if name is not None and not isinstance(name, str):
            raise UserStoreError(f"{where}: name: expected a string")
        return User(user_id=user_id, token_sha256=digest.lower(), created=created, name=name)

    def _write(self, users: tuple[User, ...]) -> None:
        entries = []
        for user in users:
            entry: dict[str, Any] = {"user_id": user.user_id}
            if user.name is not None:
                entry["name"] = user.name
            entry["token_sha256"] = user.token_sha256
            entry["created"] = user.created
            entries.append(entry)
        data = _HEADER + tomli_w.dumps({"users": entries})
        try:
            atomic_write(self.path, data.encode("utf-8"))
        except OSError as error:
            raise UserStoreError(f"{self.path}: cannot write: {error.strerror}") from None

    def add(
        self, name: str | None = None, *, token: str | None = None
    ) -> tuple[User, str, UserTable]:
        """Create a user; returns it, its token (the only time it is known) and the new table."""
        token = token if token is not None else new_token()
        with self._locked():
            users = self.load().users
            user = User(
                user_id=str(uuid.uuid4()),
                token_sha256=hash_token(token),
                created=dt.datetime.now(dt.UTC).replace(microsecond=0),
                name=name,
            )
            users = (*users, user)
            self._write(users)
        return user, token, UserTable.of(users)

    def delete(self, user_id: str) -> UserTable | None:
        """Remove a user; None when there is no such user (nothing is written)."""
        with self._locked():
            users = self.load().users
            kept = tuple(user for user in users if user.user_id != user_id)
            if len(kept) == len(users):
                return None
            self._write(kept)
        return UserTable.of(kept)

    def import_tokens(self, pairs: list[tuple[str, str]]) -> tuple[int, int, UserTable]:
        """Add users with known ``(user_id, token)`` pairs, skipping ids or tokens present.

        Returns (imported, skipped, table). Used by ``relayd import-seed-db``.
        """
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        with self._locked():
            users = list(self.load().users)
            ids = {user.user_id for user in users}
            hashes = {user.token_sha256 for user in users}
            imported = skipped = 0
            for user_id, token in pairs:
                digest = hash_token(token)
                if user_id in ids or digest in hashes:
                    skipped += 1
                    continue
                users.append(User(user_id=user_id, token_sha256=digest, created=now))
                ids.add(user_id)
                hashes.add(digest)
                imported += 1
            if imported:
                self._write(tuple(users))
        return imported, skipped, UserTable.of(tuple(users))


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
