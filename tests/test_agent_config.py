"""The agent's settings (relayd.agent.config) and ``relayd agent``'s command line.

Validation is as strict as the daemon's: an unknown key, a wrong type or a
value out of range is an error naming the file and ``agent.key`` (or the
option), never a silent default. Keys come from a file, a systemd
credential or the environment, never from the command line, and never show
in a repr. The last tests run the real ``relayd agent`` command.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from relayd.agent.config import (
    AgentSettings,
    build_settings,
    display_url,
    find_agent_key,
    find_backend_key,
    find_state_dir,
    load_table,
    register_url,
)
from relayd.config import ConfigError
from tests.support import console_script, service_environment

RELAY = "ws://127.0.0.1:8080"


def settings(table: dict[str, Any] | None = None, **overrides: Any) -> AgentSettings:
    return build_settings(table, source="agent.toml" if table is not None else None,
                          overrides=overrides, hostname=lambda: "box")  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_from_the_command_line_alone() -> None:
    got = settings(relay=RELAY, echo=True)
    assert got.register_url == "ws://127.0.0.1:8080/client/register"
    assert (got.capacity, got.name, got.models, got.echo_delay) == (4, "box", (), 0.05)
    assert (got.drain_grace, got.backend_timeout, got.log_level) == (30.0, 120.0, "info")
    assert (got.conversations_max, got.conversations_max_bytes) == (10000, 64 * 1024**2)
    assert got.conversations_ttl == 86400.0


def test_a_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[agent]\n"
        'relay = "wss://relay.example.com"\n'
        'backend = "http://127.0.0.1:11434/v1"\n'
        'models = ["llama3.1:8b", "qwen2.5:7b", "llama3.1:8b"]\n'
        "capacity = 2\n"
        'name = "gpu-box"\n'
        'key_file = "/etc/relayd/agent_key"\n'
        'backend_timeout = "5m"\n'
        'conversations_max_bytes = "1GiB"\n'
        'log_level = "DEBUG"\n',
    )
    got = build_settings(load_table(path), source=str(path))
    assert got.models == ("llama3.1:8b", "qwen2.5:7b")  # repeats dropped
    assert (got.capacity, got.name, got.backend_timeout, got.log_level) == (2, "gpu-box", 300.0,
                                                                             "debug")  # fmt: skip
    assert got.key_file == Path("/etc/relayd/agent_key")
    assert got.conversations_max_bytes == 1024**3
    assert got.register_url == "wss://relay.example.com/client/register"
    assert "wss://relay.example.com" in got.summary()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[agent]\nrelay = "ws://h:1"\necho = true\ncolour = "red"\n', "agent.colour: unknown key"),
        ('[agent]\nrelay = "ws://h:1"\necho = true\ncapacity = "4"\n',
         "agent.capacity: expected an integer, got a string"),
        ('[agent]\nrelay = "ws://h:1"\necho = "yes"\n', "agent.echo: expected true or false"),
        ('[agent]\nrelay = "ws://h:1"\necho = true\ncapacity = 0\n',
         "agent.capacity: expected at least 1, got 0"),
        ('[agent]\nrelay = "ws://h:1"\necho = true\nmodels = "llama"\n',
         "agent.models: expected an array of non-empty strings"),
        ('[agent]\nrelay = "ws://h:1"\necho = true\nbackend_timeout = 30\n',
         'agent.backend_timeout: expected a duration string such as "30s", got an integer'),
        ('[agent]\nrelay = "http://h:1"\necho = true\n',
         "agent.relay: expected a URL such as ws://HOST:PORT"),
        ('[agent]\nrelay = "ws://h:1"\nbackend = "ftp://x"\n', "agent.backend: expected a URL"),
        ('[agent]\nrelay = "ws://h:1"\necho = true\nbackend = "http://x/v1"\n',
         "agent.backend: give a backend or echo = true, not both"),
        ('[agent]\nrelay = "ws://h:1"\n', "agent.backend: missing"),
        ("[agent]\necho = true\n", "agent.relay: missing"),
        ('[agents]\nrelay = "ws://h:1"\n', "agents: unknown section 'agents' outside [agent]"),
        ('relay = "ws://h:1"\n', "relay: unknown key 'relay' outside [agent]"),
        ("# nothing\n", "no [agent] table"),
        ("[agent\n", "invalid TOML"),
    ],
)  # fmt: skip
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        build_settings(load_table(path), source=str(path))
    assert str(raised.value).startswith(f"{path}: ")
    assert where in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"relay": RELAY, "echo": True, "capacity": 0}, "--capacity: expected at least 1"),
        ({"relay": RELAY, "echo": True, "capacity": 5000}, "--capacity: expected at most 1000"),
        ({"relay": RELAY, "echo": True, "echo_delay": "soon"}, "--echo-delay: expected a duration"),
        ({"relay": "example.com:8080", "echo": True}, "--relay: expected a URL such as ws://"),
        ({"echo": True}, "--relay: missing"),
        ({"relay": RELAY}, "--backend: missing"),
        ({"relay": RELAY, "echo": True, "models": ["x" * 300]}, "--models: expected model names"),
    ],
)
def test_command_line_errors_name_the_option(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings(**overrides)
    assert str(raised.value).startswith("the command line: ")
    assert where in str(raised.value)


def test_the_command_line_wins_over_the_file() -> None:
    table = {"relay": "ws://a:1", "backend": "http://b:2/v1", "capacity": 2}
    got = settings(table, relay="ws://c:3", echo=True, capacity=8)
    assert (got.relay, got.echo, got.backend, got.capacity) == ("ws://c:3", True, None, 8)
    got = settings({"relay": "ws://a:1", "echo": True}, backend="http://b:2/v1")
    assert (got.echo, got.backend) == (False, "http://b:2/v1")


@pytest.mark.parametrize(
    ("relay", "url"),
    [
        ("ws://h:8080", "ws://h:8080/client/register"),
        ("ws://h:8080/", "ws://h:8080/client/register"),
        ("wss://example.com/relayd", "wss://example.com/relayd/client/register"),
        ("wss://example.com/client/register", "wss://example.com/client/register"),
    ],
)
def test_the_register_path_is_added(relay: str, url: str) -> None:
    assert register_url(relay) == url


def test_urls_in_logs_keep_only_scheme_host_and_port() -> None:
    assert display_url("wss://relay.example.com/agent/SECRET/x?key=SECRET") == (
        "wss://relay.example.com"
    )
    assert display_url("http://user:pw@[::1]:11434/v1") == "http://[::1]:11434"


def test_where_the_agent_key_comes_from(tmp_path: Path) -> None:
    key_file = tmp_path / "agent_key"
    key_file.write_text("file-key-123\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "agent_key").write_text("credential-key-456")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "RELAYD_AGENT_KEY": "env-key-789"}
    with_file = settings(relay=RELAY, echo=True, key_file=str(key_file))
    plain = settings(relay=RELAY, echo=True)
    key = find_agent_key(with_file, environ)
    assert key is not None and (key.value, key.source) == ("file-key-123", str(key_file))
    key = find_agent_key(plain, environ)
    assert key is not None and (key.value, key.source) == ("credential-key-456",
                                                           "credential agent_key")  # fmt: skip
    # The unit's fallback credential is a lone newline: not set.
    (credentials / "agent_key").write_text("\n")
    key = find_agent_key(plain, environ)
    assert key is not None and (key.value, key.source) == ("env-key-789", "$RELAYD_AGENT_KEY")
    assert find_agent_key(plain, {}) is None
    assert "env-key-789" not in repr(key) and "env-key-789" not in str(key)
    key_file.write_text("  \n")
    with pytest.raises(ConfigError, match="agent key file is empty"):
        find_agent_key(with_file, environ)


def test_where_the_backend_key_comes_from(tmp_path: Path) -> None:
    plain = settings(relay=RELAY, backend="http://h/v1")
    assert find_backend_key(plain, {}) is None
    key = find_backend_key(plain, {"OPENAI_API_KEY": "sk-1"})
    assert key is not None and key.source == "$OPENAI_API_KEY"
    key = find_backend_key(plain, {"OPENAI_API_KEY": "sk-1", "RELAYD_BACKEND_KEY": "sk-2"})
    assert key is not None and key.value == "sk-2"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "backend_key").write_text("sk-3\n")
    key = find_backend_key(plain, {"CREDENTIALS_DIRECTORY": str(credentials),
                                   "RELAYD_BACKEND_KEY": "sk-2"})  # fmt: skip
    assert key is not None and (key.value, key.source) == ("sk-3", "credential backend_key")


def test_the_state_directory() -> None:
    plain = settings(relay=RELAY, echo=True)
    assert find_state_dir(plain, {"STATE_DIRECTORY": "/var/lib/relayd-agent"}) == Path(
        "/var/lib/relayd-agent"
    )
    assert find_state_dir(plain, {"XDG_STATE_HOME": "/x"}) == Path("/x/relayd-agent")
    assert find_state_dir(plain, {"HOME": "/home/u"}) == Path("/home/u/.local/state/relayd-agent")
    chosen = settings(relay=RELAY, echo=True, state_dir="/srv/a")
    assert find_state_dir(chosen, {"STATE_DIRECTORY": "/var/lib/x"}) == Path("/srv/a")


# -- the real command --------------------------------------------------------------------


def run_agent_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**service_environment(), **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_relayd_agent_names_the_file_and_key_of_a_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\nrelay = "ws://127.0.0.1:9"\necho = true\nmodel = "x"\n')
    result = run_agent_command("--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"relayd agent: {path}: agent.model: unknown key" in result.stderr
    path.write_text('[agent]\nrelay = "ws://127.0.0.1:9"\necho = true\ncapacity = "lots"\n')
    result = run_agent_command("--config", str(path))
    assert result.returncode == 1
    assert f"{path}: agent.capacity: expected an integer, got a string" in result.stderr


def test_relayd_agent_check_and_usage_errors(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\nrelay = "ws://127.0.0.1:9"\necho = true\n')
    result = run_agent_command("--config", str(path), "--check", "--capacity", "2",
                               env={"RELAYD_AGENT_KEY": "k-" + "x" * 30})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout and "capacity 2" in result.stdout
    assert "agent key: $RELAYD_AGENT_KEY" in result.stdout and "x" * 30 not in result.stdout
    result = run_agent_command("--relay", "ws://h:1", "--echo", "--backend", "http://h/v1")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
    result = run_agent_command("--relay", "ws://h:1", "--echo", "--key", "secret")
    assert result.returncode == 2  # no option takes a key
    result = run_agent_command("--help")
    assert result.returncode == 0 and "--backend URL | --echo" in result.stdout
