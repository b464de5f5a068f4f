"""The ``relayd`` command, run as a real subprocess: exit codes, output, files.

Exit codes (relayd/cli.py): 0 success, 1 an error the operator must fix, 2 a
usage error. Every run gets a clean environment (no ``RELAYD_*``, a private
``HOME``) so nothing here reads or writes the real state directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from relayd import __version__
from tests.support import ADMIN_KEY, Relayd, console_script

REPO = Path(__file__).resolve().parent.parent
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
RUN_TIMEOUT = 30


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(
            ("RELAYD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "JOURNAL_", "XDG_STATE_HOME")
        )
        and key not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def relayd(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    command = [console_script()] if script else [sys.executable, "-m", "relayd"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env if env is not None else clean_env(tmp_path),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_seed_db(path: Path, rows: Sequence[tuple[str | None, str | None]]) -> Path:
    """ChatGPT-API-server's ``Data/auth.db``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    try:
        connection.execute("CREATE TABLE tokens(user_id TEXT PRIMARY KEY, token TEXT UNIQUE)")
        connection.executemany("INSERT INTO tokens VALUES (?, ?)", rows)
        connection.commit()
    finally:
        connection.close()
    return path


class UserStoreView:
    """users.toml as plain TOML, read without relayd's code."""

    def __init__(self, state: Path) -> None:
        self.path = state / "users.toml"

    def names(self) -> dict[str, str | None]:
        entries = tomllib.loads(self.path.read_text())["users"]
        return {entry["user_id"]: entry.get("name") for entry in entries}


@pytest.fixture
def daemons() -> Iterator[Callable[..., Relayd]]:
    """Start ``relayd ARGS`` exactly as given (no --listen fd://), wait for READY=1."""
    started: list[Relayd] = []

    def start(tmp_path: Path, args: Sequence[str], env: dict[str, str], port: int) -> Relayd:
        notify_path = tmp_path / f"notify-{time.monotonic_ns()}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        log_path = tmp_path / f"relayd-{time.monotonic_ns()}.log"
        env = {**env, "NOTIFY_SOCKET": str(notify_path)}
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "relayd", *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        daemon = Relayd(process, port, Path(env.get("RELAYD_STATE_DIR", "")), log_path, notify)
        started.append(daemon)
        daemon.wait_notification("READY=1")
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.notify.close()


# -- version, usage -----------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = relayd(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"relayd {__version__}"


def test_version_of_the_console_script(tmp_path: Path) -> None:
    result = relayd(tmp_path, "--version", script=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"relayd {__version__}"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["users"], "users"),
        (["no-such-command"], "invalid choice"),
        (["users", "delete"], "user_id"),
        (["serve", "--listen", "nonsense"], "--listen: expected host:port"),
        (["serve", "--listen", "127.0.0.1:99999"], "--listen: expected host:port"),
        (["8080"], "admin_key"),
        (["70000", "key"], "port must be 1-65535"),
        (["8080", "key", "-listen"], "-listen"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = relayd(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_listen_port_of_superscript_digits_is_a_usage_error(tmp_path: Path) -> None:
    """``"³".isdigit()`` is true but ``int("³")`` raises: the CLI must still say
    "--listen: expected ..." and exit 2, not crash with a traceback."""
    result = relayd(tmp_path, "serve", "--listen", "127.0.0.1:\u00b3", "--state-dir", "st")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert "--listen: expected" in result.stderr


# -- check-config ---------------------------------------------------------------------------


def test_check_config_good_file(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:9999"]\n[agents]\nkeys = ["a", "b"]\n')
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"relayd: configuration OK: {path}: listen 127.0.0.1:9999; 2 agent")
    assert "configuration OK" in lines[0]
    assert result.stderr == ""


def test_check_config_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text("[agents]\nmax_inflght = 2\n")
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"relayd: {path}: agents.max_inflght: unknown key")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_check_config_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[requests]\ntimeout = "nope"\n')
    result = relayd(tmp_path, "check-config", env=clean_env(tmp_path, RELAYD_CONFIG=str(path)))
    assert result.returncode == 1
    assert f"{path}: requests.timeout: expected a duration" in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"relayd: {path}: cannot read the file: No such file or directory"
    )


def test_check_config_reads_the_agent_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "agent_keys"
    path = tmp_path / "relayd.toml"
    path.write_text(f'[agents]\nkeys_file = "{keys}"\n')
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1
    assert f"{keys}: cannot read agent keys: No such file or directory" in result.stderr
    keys.write_text("good-key\nbad key\n")
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 1
    assert f"{keys}: line 2: an agent key has no spaces" in result.stderr
    keys.write_text("# ok\ngood-key\n")
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_config_with_a_nul_in_a_path_exits_1(tmp_path: Path) -> None:
    """TOML allows ``\\u0000`` in a string; such a path must be a config error
    (exit 1, file named), not a ValueError traceback from ``open()``."""
    path = tmp_path / "relayd.toml"
    path.write_text(f'[agents]\nkeys_file = "{tmp_path}/keys\\u0000"\n')
    result = relayd(tmp_path, "check-config", "--config", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert "keys" in result.stderr


def test_check_config_of_the_example_file(tmp_path: Path) -> None:
    result = relayd(tmp_path, "check-config", "--config", str(REPO / "etc" / "relayd.toml"))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


# -- users ------------------------------------------------------------------------------------


def users_env(tmp_path: Path, state: Path) -> dict[str, str]:
    """The state directory through $RELAYD_STATE_DIR, valid wherever ``--state-dir`` goes."""
    return clean_env(tmp_path, RELAYD_STATE_DIR=str(state))


def users(tmp_path: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return relayd(tmp_path, "users", *args, env=users_env(tmp_path, state))


def parse_added(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"user_id: (\S+)\ntoken:   (\S+)\n", result.stdout)
    assert match, result.stdout
    assert "shown only now" in result.stderr
    return match[1], match[2]


def users_add(tmp_path: Path, state: Path, *extra: str) -> tuple[str, str]:
    return parse_added(users(tmp_path, state, "add", *extra))


def test_users_add_list_delete(tmp_path: Path) -> None:
    state = tmp_path / "state"
    user_id, token = users_add(tmp_path, state, "--name", "x")
    assert UUID_RE.match(user_id)
    assert TOKEN_RE.match(token)
    users_file = state / "users.toml"
    assert token not in users_file.read_text()
    assert mode_of(users_file) == 0o600

    listing = users(tmp_path, state, "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rf"{user_id}  \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ  x", lines[0]), lines
    assert token not in listing.stdout + listing.stderr
    assert listing.stderr.strip() == f"1 users in {users_file}"

    as_json = users(tmp_path, state, "list", "--json")
    assert as_json.returncode == 0
    listed = json.loads(as_json.stdout)["users"]
    assert [(u["user_id"], u["name"]) for u in listed] == [(user_id, "x")]
    assert set(listed[0]) == {"user_id", "name", "created"}

    deleted = users(tmp_path, state, "delete", user_id)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"deleted {user_id}; reload relayd (SIGHUP) to apply"
    assert tomllib.loads(users_file.read_text()) == {"users": []}

    again = users(tmp_path, state, "delete", user_id)
    assert again.returncode == 1
    assert again.stderr.strip() == f"relayd: no user {user_id} in {users_file}"


@pytest.mark.parametrize(
    "args",
    [
        # README, "Installing as a service": the option after the action.
        ["users", "add", "--name", "alice", "--state-dir", "{state}"],
        ["users", "--state-dir", "{state}", "add", "--name", "alice"],
    ],
)
def test_users_add_state_dir_option(tmp_path: Path, args: list[str]) -> None:
    state = tmp_path / "state"
    result = relayd(tmp_path, *[arg.format(state=state) for arg in args])
    user_id, _ = parse_added(result)
    assert UserStoreView(state).names() == {user_id: "alice"}


@pytest.mark.parametrize("action", [["list"], ["delete", "some-id"]])
def test_users_state_dir_option_after_the_action(tmp_path: Path, action: list[str]) -> None:
    state = tmp_path / "state"
    result = relayd(tmp_path, "users", *action, "--state-dir", str(state))
    assert result.returncode != 2, result.stderr  # not a usage error
    assert state.is_dir()


def test_users_add_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = users(tmp_path, state, "add", "--json", "--name", "j")
    assert result.returncode == 0
    body = json.loads(result.stdout)
    assert set(body) == {"user_id", "name", "token"}
    assert body["name"] == "j"
    assert TOKEN_RE.match(body["token"])


def test_users_delete_unknown_exits_1_and_does_not_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    users_add(tmp_path, state)
    before = (state / "users.toml").read_bytes()
    result = users(tmp_path, state, "delete", "nobody")
    assert result.returncode == 1
    assert result.stderr.strip() == f"relayd: no user nobody in {state / 'users.toml'}"
    assert (state / "users.toml").read_bytes() == before


def test_users_with_a_corrupt_file_exit_1(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.toml").write_text("[[users]\n")
    result = users(tmp_path, state, "add")
    assert result.returncode == 1
    assert result.stderr.startswith(f"relayd: {state / 'users.toml'}: not a valid users file")
    assert (state / "users.toml").read_text() == "[[users]\n"
    assert "Traceback" not in result.stderr


def test_state_dir_from_the_environment(tmp_path: Path) -> None:
    state = tmp_path / "from-env"
    env = clean_env(tmp_path, RELAYD_STATE_DIR=str(state))
    result = relayd(tmp_path, "users", "add", env=env)
    assert result.returncode == 0, result.stderr
    assert (state / "users.toml").is_file()


def test_state_dir_default_is_under_home(tmp_path: Path) -> None:
    result = relayd(tmp_path, "users", "add")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / ".local" / "state" / "relayd" / "users.toml").is_file()


def test_state_dir_is_created_with_mode_0700(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "er" / "state"
    result = users(tmp_path, state, "list")
    assert result.returncode == 0, result.stderr
    assert state.is_dir()
    assert mode_of(state) == 0o700
    assert result.stdout == ""
    assert result.stderr.strip() == f"0 users in {state / 'users.toml'}"


def test_state_dir_that_cannot_be_created_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = users(tmp_path, blocker / "state", "list")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"relayd: {blocker / 'state'}: cannot create the state directory: Not a directory"
    )


def test_concurrent_cli_adds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = users_env(tmp_path, state)
    command = [sys.executable, "-m", "relayd", "users", "add", "--json"]
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
        for _ in range(10)
    ]
    outputs = [process.communicate(timeout=RUN_TIMEOUT) for process in processes]
    assert [process.returncode for process in processes] == [0] * 10, outputs
    ids = {json.loads(out)["user_id"] for out, _ in outputs}
    assert len(ids) == 10
    stored = tomllib.loads((state / "users.toml").read_text())["users"]
    assert {entry["user_id"] for entry in stored} == ids


# -- import-seed-db -----------------------------------------------------------------------------


def test_import_seed_db(tmp_path: Path, relayd_factory: Callable[..., Relayd]) -> None:
    tokens = [str(uuid.uuid4()) for _ in range(3)]
    rows: list[tuple[str | None, str | None]] = [(str(uuid.uuid4()), token) for token in tokens]
    rows.append(("no-token", None))
    db = make_seed_db(tmp_path / "Data" / "auth.db", rows)
    state = tmp_path / "state"  # where relayd_factory's relayd keeps its state
    users_file = state / "users.toml"

    first = relayd(tmp_path, "import-seed-db", "--state-dir", str(state), str(db))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"imported 3 users, skipped 0 already present, ignored 1 malformed rows into {users_file}"
    )
    text = users_file.read_text()
    for token in tokens:
        assert token not in text
    stored = tomllib.loads(text)["users"]
    assert [entry["user_id"] for entry in stored] == [row[0] for row in rows[:3]]

    second = relayd(tmp_path, "import-seed-db", "--state-dir", str(state), str(db))
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("imported 0 users, skipped 3 already present")
    assert tomllib.loads(users_file.read_text())["users"] == stored

    server = relayd_factory()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for token in tokens:
            response = client.post(
                "/api/ask", content=b'{"content": "hi"}', headers={"Authorization": token}
            )
            assert response.status_code == 503, response.text
            assert response.json() == {"error": "no agent connected"}
        response = client.post(
            "/api/ask", content=b'{"content": "hi"}', headers={"Authorization": "not-imported"}
        )
        assert response.status_code == 401
    assert server.stop() == 0


def test_import_seed_db_missing_file(tmp_path: Path) -> None:
    db = tmp_path / "Data" / "auth.db"
    result = relayd(tmp_path, "import-seed-db", "--state-dir", str(tmp_path / "s"), str(db))
    assert result.returncode == 1
    assert result.stderr.strip() == f"relayd: {db}: no such file"
    assert not db.exists()


def test_import_seed_db_without_tokens_table(tmp_path: Path) -> None:
    db = tmp_path / "auth.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE other(x)")
    connection.commit()
    connection.close()
    result = relayd(tmp_path, "import-seed-db", "--state-dir", str(tmp_path / "s"), str(db))
    assert result.returncode == 1
    assert f"relayd: {db}: cannot read the seed's tokens table: no such table: tokens" in (
        result.stderr
    )


def test_import_seed_db_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "auth.db"
    db.write_text("this is not sqlite, just text padding " * 50)
    result = relayd(tmp_path, "import-seed-db", "--state-dir", str(tmp_path / "s"), str(db))
    assert result.returncode == 1
    assert f"relayd: {db}: cannot read the seed's tokens table" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("directory", ["seed #1", "what?", "100%25 real"])
def test_import_seed_db_from_a_path_with_uri_characters(tmp_path: Path, directory: str) -> None:
    """The database is opened through a ``file:`` URI; a path holding ``#``, ``?``
    or ``%`` must still be read, read-only, and nothing else created."""
    db = make_seed_db(tmp_path / directory / "auth.db", [("seed-user", "seed-token")])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = relayd(tmp_path, "import-seed-db", "--state-dir", str(tmp_path / "s"), str(db))
    after = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("s", "home"))
    assert after == before, "a stray file was created next to the database"
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported 1 users, skipped 0 already present")


def test_import_seed_db_does_not_modify_the_database(tmp_path: Path) -> None:
    db = make_seed_db(tmp_path / "auth.db", [("u", "t")])
    before = db.read_bytes()
    result = relayd(tmp_path, "import-seed-db", "--state-dir", str(tmp_path / "s"), str(db))
    assert result.returncode == 0, result.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth.db", "home", "s"]


# -- serving ---------------------------------------------------------------------------------


def test_admin_key_is_generated_on_first_start(
    tmp_path: Path, relayd_factory: Callable[..., Relayd]
) -> None:
    server = relayd_factory(admin_key=None)
    key_file = server.state_dir / "admin_key"
    assert mode_of(server.state_dir) == 0o700
    assert key_file.is_file()
    assert mode_of(key_file) == 0o600
    key = key_file.read_text()
    assert key.endswith("\n")
    key = key.strip()
    assert TOKEN_RE.match(key)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.get("/admin/users", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        assert response.json() == {"users": []}
        assert client.get("/admin/users", params={"admin_key": "guess"}).status_code == 401
    assert server.stop() == 0
    log = server.log
    assert key not in log
    assert key[:10] not in log
    assert f"generated a new admin key in {key_file}" in log

    # The second start reuses the key and says where it came from.
    again = relayd_factory(admin_key=None)
    assert key_file.read_text().strip() == key
    assert again.stop() == 0
    assert f"admin key from {key_file}" in again.log
    assert "generated a new admin key" not in again.log
    assert key not in again.log


def test_seed_command_line(tmp_path: Path, daemons: Callable[..., Relayd]) -> None:
    port = free_port()
    key = "seed-admin-key-0987654321"
    env = clean_env(tmp_path, RELAYD_STATE_DIR=str(tmp_path / "state"))
    server = daemons(tmp_path, [str(port), key, "-listen", "127.0.0.1"], env, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        response = client.get("/health")
        assert response.status_code == 200
        assert response.text == "OK"
        assert client.get("/admin/users", params={"admin_key": key}).status_code == 200
    assert server.stop() == 0
    log = server.log
    assert "the admin key was given on the command line, where `ps` shows it" in log
    assert f"listening on http://127.0.0.1:{port}" in log
    assert key not in log
    assert "Traceback" not in log


def test_seed_command_line_defaults_to_loopback(
    tmp_path: Path, daemons: Callable[..., Relayd]
) -> None:
    port = free_port()
    env = clean_env(tmp_path, RELAYD_STATE_DIR=str(tmp_path / "state"))
    server = daemons(tmp_path, [str(port), "k"], env, port)
    with httpx.Client(timeout=10) as client:
        assert client.get(f"http://127.0.0.1:{port}/health").text == "OK"
    assert server.stop() == 0
    assert f"listening on http://127.0.0.1:{port}" in server.log
    assert "0.0.0.0" not in server.log


def test_no_arguments_means_serve(tmp_path: Path, daemons: Callable[..., Relayd]) -> None:
    port = free_port()
    config = tmp_path / "relayd.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n')
    state = tmp_path / "state"
    env = clean_env(
        tmp_path,
        RELAYD_CONFIG=str(config),
        RELAYD_STATE_DIR=str(state),
        RELAYD_ADMIN_KEY=ADMIN_KEY,
    )
    server = daemons(tmp_path, [], env, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/health").text == "OK"
        response = client.get("/admin/users", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 200
    assert mode_of(state) == 0o700
    assert not (state / "admin_key").exists()  # the key came from the environment
    assert server.stop() == 0
    assert f"{config}: listen 127.0.0.1:{port}" in server.log
    assert "admin key from $RELAYD_ADMIN_KEY" in server.log
    assert "relayd stopped" in server.log
    assert ADMIN_KEY not in server.log


def test_serve_with_a_bad_config_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("[server]\nmax_body = 5\n")
    result = relayd(tmp_path, "serve", "--config", str(config), "--state-dir", "st")
    assert result.returncode == 1
    assert f"{config}: server.max_body: expected a size string" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_an_address_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = relayd(
            tmp_path,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            "st",
            env=clean_env(tmp_path, RELAYD_ADMIN_KEY=ADMIN_KEY),
        )
    assert result.returncode == 1
    assert "cannot serve" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_users_added_by_the_cli_apply_on_sighup(
    tmp_path: Path, relayd_factory: Callable[..., Relayd]
) -> None:
    server = relayd_factory()
    _, token = users_add(tmp_path, server.state_dir, "--name", "late")
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def ask() -> httpx.Response:
            return client.post(
                "/api/ask", content=b'{"content": "hi"}', headers={"Authorization": token}
            )

        assert ask().status_code == 401  # not yet reloaded
        server.signal(signal.SIGHUP)
        server.wait_notification("READY=1")
        response = ask()
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "no agent connected"}
    assert server.stop() == 0
    assert "reloaded" in server.log
