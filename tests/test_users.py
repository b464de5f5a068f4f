"""The token store: hashes at rest, mode 0600, atomic locked read-modify-write.

Concurrency is tested with real processes (the daemon and ``relayd users``
commands share the file through ``flock``), and atomicity with a reader that
polls the file while another process writes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relayd.users import (
    User,
    UserStore,
    UserStoreError,
    UserTable,
    atomic_write,
    hash_token,
    new_token,
)

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    """Content, inode and mtime: a rewrite (even of the same bytes) changes the inode."""
    info = path.stat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


def a_user_block(user_id: str, token: str, name: str | None = None) -> str:
    lines = ["", "[[users]]", f'user_id = "{user_id}"']
    if name is not None:
        lines.append(f'name = "{name}"')
    lines += [f'token_sha256 = "{hash_token(token)}"', "created = 2024-05-01T12:00:00Z", ""]
    return "\n".join(lines)


# -- tokens and the file ------------------------------------------------------------


def test_new_token_is_256_bits_urlsafe() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert TOKEN_RE.match(token), token


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


def test_add_returns_user_token_and_table(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    user, token, table = store.add("alice")
    assert TOKEN_RE.match(token)
    assert UUID_RE.match(user.user_id)
    assert user.name == "alice"
    assert user.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert user.created.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - user.created).total_seconds()) < 60
    assert table.users == (user,)
    assert table.authenticate(token) == user


def test_file_keeps_only_the_hash(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    user, token, _ = store.add("alice")
    text = store.path.read_text("utf-8")
    assert token not in text
    assert token[:16] not in text
    assert hash_token(token) in text
    assert user.user_id in text
    document = tomllib.loads(text)
    assert document == {
        "users": [
            {
                "user_id": user.user_id,
                "name": "alice",
                "token_sha256": hash_token(token),
                "created": user.created,
            }
        ]
    }


def test_file_and_lock_mode_0600(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add()
    assert store.path == tmp_path / "users.toml"
    assert mode_of(store.path) == 0o600
    assert mode_of(tmp_path / "users.toml.lock") == 0o600


def test_rewrite_restores_mode_0600(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add()
    store.path.chmod(0o644)
    store.add()
    assert mode_of(store.path) == 0o600


def test_no_temporary_files_left(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    for _ in range(5):
        user, _, _ = store.add()
    store.delete(user.user_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml", "users.toml.lock"]


def test_missing_file_is_empty(tmp_path: Path) -> None:
    table = UserStore(tmp_path).load()
    assert len(table) == 0
    assert table.users == ()
    assert not (tmp_path / "users.toml").exists()


def test_add_without_name(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    user, _, _ = store.add()
    assert user.name is None
    assert "name" not in tomllib.loads(store.path.read_text())["users"][0]
    assert store.load().users[0].public()["name"] is None


def test_add_with_a_known_token(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    user, token, _ = store.add("seed", token="a-token-from-elsewhere")
    assert token == "a-token-from-elsewhere"
    assert store.load().authenticate("a-token-from-elsewhere") == user


def test_name_with_quotes_and_unicode_round_trips(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    name = 'Zoë "the admin" \\ [[users]]'
    user, _, _ = store.add(name)
    assert store.load().find(user.user_id) == user
    assert store.load().users[0].name == name


def test_reload_gives_the_same_users(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    added = [store.add(f"user{i}")[0] for i in range(5)]
    assert UserStore(tmp_path).load().users == tuple(added)


# -- authentication -------------------------------------------------------------------


def test_authenticate(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    alice, alice_token, _ = store.add("alice")
    bob, bob_token, _ = store.add("bob")
    table = store.load()
    assert table.authenticate(alice_token) == alice
    assert table.authenticate(bob_token) == bob
    assert table.authenticate("wrong") is None
    assert table.authenticate("") is None
    assert table.authenticate(alice_token + "x") is None
    assert table.authenticate(alice_token[:-1]) is None
    assert table.authenticate(hash_token(alice_token)) is None  # the hash is not a token


def test_deleted_user_no_longer_authenticates(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    alice, alice_token, _ = store.add("alice")
    bob, bob_token, _ = store.add("bob")
    table = store.delete(alice.user_id)
    assert table is not None
    assert table.authenticate(alice_token) is None
    assert table.authenticate(bob_token) == bob
    assert store.load().authenticate(alice_token) is None
    assert store.load().users == (bob,)
    assert alice.user_id not in store.path.read_text()


def test_delete_unknown_returns_none_and_does_not_write(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add("alice")
    before = fingerprint(store.path)
    time.sleep(0.01)  # so that a rewrite would show in the mtime too
    assert store.delete("no-such-user") is None
    assert fingerprint(store.path) == before


def test_delete_on_missing_file_creates_nothing(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    assert store.delete("anyone") is None
    assert not store.path.exists()


def test_uppercase_hash_written_by_hand_works(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.path.write_text(
        "[[users]]\n"
        'user_id = "hand"\n'
        f'token_sha256 = "{hash_token("hand-token").upper()}"\n'
        "created = 2024-05-01T12:00:00\n"
    )
    table = store.load()
    user = table.authenticate("hand-token")
    assert user is not None
    assert user.user_id == "hand"
    assert user.created == dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)  # naive means UTC


def test_public_view_has_no_token_material(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    user, token, _ = store.add("alice")
    public = user.public()
    assert set(public) == {"user_id", "name", "created"}
    assert public["created"].endswith("Z")
    assert token not in repr(user)
    assert user.token_sha256 not in repr(user)
    assert user.token_sha256 not in repr(store.load())


def test_table_find() -> None:
    user = User("u1", hash_token("t"), dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    table = UserTable.of((user,))
    assert table.find("u1") is user
    assert table.find("u2") is None
    assert len(table) == 1


# -- hand edits and broken files ----------------------------------------------------------


def test_hand_edit_between_writes_is_kept(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    alice, alice_token, _ = store.add("alice")
    # The operator renames alice and appends a user block by hand.
    text = store.path.read_text()
    text = text.replace('name = "alice"', 'name = "alice-renamed"')
    assert "alice-renamed" in text
    text += a_user_block("hand-made", "hand-token", "carol")
    store.path.write_text(text)

    bob, bob_token, table = store.add("bob")

    assert [u.user_id for u in table.users] == [alice.user_id, "hand-made", bob.user_id]
    reloaded = store.load()
    assert reloaded.users == table.users
    assert reloaded.find(alice.user_id).name == "alice-renamed"  # type: ignore[union-attr]
    assert reloaded.find("hand-made").name == "carol"  # type: ignore[union-attr]
    assert reloaded.authenticate("hand-token").user_id == "hand-made"  # type: ignore[union-attr]
    assert reloaded.authenticate(alice_token).user_id == alice.user_id  # type: ignore[union-attr]
    assert reloaded.authenticate(bob_token) == bob


def test_hand_deleted_user_stays_deleted(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    _, alice_token, _ = store.add("alice")
    store.path.write_text("")  # the operator removes everyone
    _, _, table = store.add("bob")
    assert [u.name for u in table.users] == ["bob"]
    assert store.load().authenticate(alice_token) is None


CORRUPT = {
    "broken TOML": ("[[users]\nuser_id = ", "not a valid users file"),
    "not UTF-8": (b'[[users]]\nuser_id = "\xff"\n', "not a valid users file"),
    "unknown top-level key": ('version = 2\n[[users]]\nuser_id = "x"\n', "unknown key 'version'"),
    "users is not an array": ('users = "everyone"\n', "users: expected an array of tables"),
    "unknown user key": (
        '[[users]]\nuser_id = "x"\ntoken = "plain"\n'
        f'token_sha256 = "{"a" * 64}"\ncreated = 2024-01-01T00:00:00Z\n',
        "users #1: unknown key 'token'",
    ),
    "missing hash": ('[[users]]\nuser_id = "x"\ncreated = 2024-01-01T00:00:00Z\n', "token_sha256"),
    "short hash": (
        '[[users]]\nuser_id = "x"\ntoken_sha256 = "abc"\ncreated = 2024-01-01T00:00:00Z\n',
        "users #1: token_sha256: expected 64 hex digits",
    ),
    "non-hex hash": (
        f'[[users]]\nuser_id = "x"\ntoken_sha256 = "{"g" * 64}"\ncreated = 2024-01-01T00:00:00Z\n',
        "users #1: token_sha256: expected 64 hex digits",
    ),
    "created not a date": (
        f'[[users]]\nuser_id = "x"\ntoken_sha256 = "{"a" * 64}"\ncreated = "yesterday"\n',
        "users #1: created: expected a TOML date-time",
    ),
    "empty user id": (
        f'[[users]]\nuser_id = ""\ntoken_sha256 = "{"a" * 64}"\ncreated = 2024-01-01T00:00:00Z\n',
        "users #1: user_id: expected a non-empty string",
    ),
    "name not a string": (
        f'[[users]]\nuser_id = "x"\nname = 5\ntoken_sha256 = "{"a" * 64}"\n'
        "created = 2024-01-01T00:00:00Z\n",
        "users #1: name: expected a string",
    ),
    "duplicate user id": (
        a_user_block("x", "t1") + a_user_block("x", "t2"),
        "users #2: duplicate user_id",
    ),
    "duplicate hash": (
        a_user_block("x", "same") + a_user_block("y", "same"),
        "users #2: duplicate token_sha256",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_an_error_naming_it(tmp_path: Path, case: str) -> None:
    content, fragment = CORRUPT[case]
    store = UserStore(tmp_path)
    if isinstance(content, bytes):
        store.path.write_bytes(content)
    else:
        store.path.write_text(content)
    with pytest.raises(UserStoreError) as caught:
        store.load()
    message = str(caught.value)
    assert message.startswith(f"{store.path}: "), message
    assert fragment in message, message


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_never_overwritten(tmp_path: Path, case: str) -> None:
    content, _ = CORRUPT[case]
    store = UserStore(tmp_path)
    if isinstance(content, bytes):
        store.path.write_bytes(content)
    else:
        store.path.write_text(content)
    before = fingerprint(store.path)
    with pytest.raises(UserStoreError, match=re.escape(str(store.path))):
        store.add("alice")
    with pytest.raises(UserStoreError, match=re.escape(str(store.path))):
        store.delete("x")
    with pytest.raises(UserStoreError, match=re.escape(str(store.path))):
        store.import_tokens([("new", "new-token")])
    assert fingerprint(store.path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml", "users.toml.lock"]


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.path.mkdir()  # a directory where the file should be
    with pytest.raises(UserStoreError) as caught:
        store.load()
    assert str(caught.value) == f"{store.path}: cannot read: Is a directory"


def test_missing_state_dir_is_an_error_naming_the_lock(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "absent")
    with pytest.raises(UserStoreError) as caught:
        store.add()
    assert str(caught.value) == (
        f"{tmp_path / 'absent' / 'users.toml.lock'}: cannot open: No such file or directory"
    )


# -- import ---------------------------------------------------------------------------------


def test_import_tokens(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    imported, skipped, table = store.import_tokens(
        [("seed-1", "token-1"), ("seed-2", "token-2"), ("seed-3", "token-3")]
    )
    assert (imported, skipped) == (3, 0)
    assert [u.user_id for u in table.users] == ["seed-1", "seed-2", "seed-3"]
    assert table.authenticate("token-2").user_id == "seed-2"  # type: ignore[union-attr]
    text = store.path.read_text()
    for token in ("token-1", "token-2", "token-3"):
        assert f'"{token}"' not in text
    assert store.load().users == table.users


def test_import_skips_present_ids_and_tokens(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    existing, existing_token, _ = store.add("existing")
    store.import_tokens([("seed-1", "token-1")])
    imported, skipped, table = store.import_tokens(
        [
            ("seed-1", "another-token"),  # id present
            ("seed-9", "token-1"),  # token present
            ("seed-8", existing_token),  # token of a user made by add
            (existing.user_id, "token-x"),  # id of a user made by add
            ("seed-2", "token-2"),  # new
            ("seed-2", "token-3"),  # id repeated within the batch
            ("seed-3", "token-2"),  # token repeated within the batch
        ]
    )
    assert (imported, skipped) == (1, 6)
    assert [u.user_id for u in table.users] == [existing.user_id, "seed-1", "seed-2"]
    assert table.authenticate("token-1").user_id == "seed-1"  # type: ignore[union-attr]
    assert table.authenticate("another-token") is None
    assert table.authenticate("token-3") is None


def test_import_of_nothing_new_does_not_write(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.import_tokens([("seed-1", "token-1")])
    before = fingerprint(store.path)
    time.sleep(0.01)
    imported, skipped, table = store.import_tokens([("seed-1", "token-1")])
    assert (imported, skipped) == (0, 1)
    assert len(table) == 1
    assert fingerprint(store.path) == before


# -- atomic_write -----------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"old")
    path.chmod(0o644)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600
    atomic_write(path, b"newer", mode=0o640)
    assert mode_of(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()  # os.replace of a file over a non-empty directory fails
    (target / "inside").write_text("x")
    with pytest.raises(OSError):
        atomic_write(target, b"data")
    assert (target / "inside").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from relayd.users import UserStore

    store = UserStore(Path(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        store.add("padding-" + "x" * (i % 150))
    """
)


def test_reader_never_sees_a_torn_file(tmp_path: Path) -> None:
    """Another process writes the file over and over; every read here parses."""
    writes = 150
    store = UserStore(tmp_path)
    store.add("first")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(writes)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    reads = 0
    counts = []
    deadline = time.monotonic() + 30
    try:
        while writer.poll() is None and reads < 500_000:
            assert time.monotonic() < deadline, "the writer did not finish in 30s"
            table = store.load()  # raises UserStoreError on a torn file
            counts.append(len(table))
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert reads > 20, f"only {reads} reads overlapped the writes"
    assert counts == sorted(counts)  # each read saw a whole, newer-or-equal file
    assert len(store.load()) == writes + 1
    assert len(set(counts)) > 2  # the reads really did see intermediate files


# -- processes --------------------------------------------------------------------------------


def _add_in_child(state_dir: str, index: int, barrier: Any) -> None:
    barrier.wait(timeout=30)
    user, token, _ = UserStore(Path(state_dir)).add(f"proc-{index}")
    print(user.user_id, token, flush=True)


def test_fifty_processes_add_at_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    count = 50
    barrier = context.Barrier(count)
    processes = [
        context.Process(target=_add_in_child, args=(str(tmp_path), index, barrier))
        for index in range(count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * count
    table = UserStore(tmp_path).load()  # parses
    assert len(table) == count
    assert sorted(u.name or "" for u in table.users) == sorted(f"proc-{i}" for i in range(count))
    assert len({u.user_id for u in table.users}) == count
    assert len({u.token_sha256 for u in table.users}) == count
    assert mode_of(tmp_path / "users.toml") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml", "users.toml.lock"]


def test_lock_is_held_across_the_read_modify_write(tmp_path: Path) -> None:
    """While another process holds the lock, add waits, then sees its write."""
    import fcntl

    store = UserStore(tmp_path)
    store.add("first")
    lock_fd = os.open(tmp_path / "users.toml.lock", os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from relayd.users import UserStore;"
            "UserStore(Path(sys.argv[1])).add('child')",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
        # While the child waits, "another writer" (us) changes the file.
        store.path.write_text(store.path.read_text() + a_user_block("locked-writer", "lw"))
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    assert child.wait(timeout=20) == 0
    names = [u.name or u.user_id for u in store.load().users]
    assert names == ["first", "locked-writer", "child"]


def test_root_writes_keep_the_state_directory_owner(tmp_path: Path) -> None:
    """`sudo relayd users add --state-dir /var/lib/relayd` must leave files the
    service's own (dynamic) user can read and lock: the state directory's owner."""
    assert os.geteuid() == 0, "this test chowns files: run it as root (CI does)"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 61234, 61234)
    store = UserStore(state)
    store.add("alice")
    for name in ("users.toml", "users.toml.lock"):
        info = (state / name).stat()
        assert (info.st_uid, info.st_gid) == (61234, 61234), name
    # An existing file keeps its owner even if the directory's differs.
    os.chown(state / "users.toml", 61235, 61235)
    store.add("bob")
    info = (state / "users.toml").stat()
    assert (info.st_uid, info.st_gid) == (61235, 61235)
    assert (info.st_mode & 0o777) == 0o600
