"""The configuration loader: schema defaults, every class of error, value syntax.

Every error test checks the message, because the message is the whole user
interface of a config error: it must name the file, the key as
``section.key`` and what was expected.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.config import (
    SCHEMA,
    Config,
    ConfigError,
    format_duration,
    format_size,
    listen_address_problem,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    read_keys_file,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "relayd.toml"

KiB = 1024
MiB = 1024 * 1024

# Every key of SCHEMA with the typed value its documented default becomes.
DEFAULTS: dict[str, Any] = {
    "server.listen": ("127.0.0.1:8080",),
    "server.state_dir": None,
    "server.max_body": 1 * MiB,
    "server.log_level": "info",
    "server.shutdown_grace": 30.0,
    "server.idle_timeout": 10.0,
    "server.body_timeout": 60.0,
    "server.tls_certificate": None,
    "server.tls_key": None,
    "server.trusted_proxies": (),
    "server.proxy_protocol": False,
    "auth.admin_key_file": None,
    "auth.failure_burst": 10,
    "auth.failure_interval": 6.0,
    "auth.prefix_failure_burst": 40,
    "auth.ipv4_prefix": 24,
    "auth.ipv6_prefix": 64,
    "agents.keys": (),
    "agents.keys_file": None,
    "agents.allow_loopback_without_key": True,
    "agents.heartbeat_interval": 15.0,
    "agents.heartbeat_timeout": 45.0,
    "agents.handshake_timeout": 10.0,
    "agents.max_inflight": 1,
    "agents.max_message": 1 * MiB,
    "agents.reconnect_grace": 30.0,
    "agents.startup_grace": 15.0,
    "agents.max_agents": 20000,
    "agents.v1_model": None,
    "requests.timeout": 120.0,
    "requests.queue_timeout": 30.0,
    "requests.max_queue": 1000,
    "requests.max_attempts": 3,
    "requests.wait_for_agent": 0.0,
    "requests.max_content": 256 * KiB,
    "requests.max_response": 1024 * KiB,
    "requests.idempotency_ttl": 24 * 3600.0,
    "requests.idempotency_max": 10000,
    "conversations.ttl": 24 * 3600.0,
    "conversations.max": 100000,
}


def value_of(config: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def write(tmp_path: Path, text: str, name: str = "relayd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    """The message of the ConfigError that loading ``text`` from a file raises."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message


# -- defaults ----------------------------------------------------------------------


def test_defaults_cover_every_schema_key() -> None:
    schema_keys = {f"{section}.{name}" for section, keys in SCHEMA.items() for name in keys}
    assert schema_keys == set(DEFAULTS)


@pytest.mark.parametrize("dotted", sorted(DEFAULTS))
def test_default_value(dotted: str) -> None:
    assert value_of(load_config(None), dotted) == DEFAULTS[dotted]
    assert value_of(parse_config({}), dotted) == DEFAULTS[dotted]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing but a comment\n")
    config = load_config(path)
    assert config.source == str(path)
    for dotted, expected in DEFAULTS.items():
        assert value_of(config, dotted) == expected, dotted
    assert load_config(None).source == "<defaults>"


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    text = "".join(f"[{section}]\n" for section in SCHEMA)
    config = load_config(write(tmp_path, text))
    for dotted, expected in DEFAULTS.items():
        assert value_of(config, dotted) == expected, dotted


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.server.max_body = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.requests = config.requests  # type: ignore[misc]


def test_every_key_can_be_set(tmp_path: Path) -> None:
    text = """
[server]
listen = ["127.0.0.1:9000", "[::1]:9001", "unix:/run/relayd.sock", "fd://3"]
state_dir = "/var/lib/relayd"
max_body = "2MiB"
log_level = "DEBUG"
shutdown_grace = "5s"
idle_timeout = "30s"

[auth]
admin_key_file = "/etc/relayd/admin_key"
failure_burst = 5
failure_interval = "1m"

[agents]
keys = ["k1", "k2"]
keys_file = "/etc/relayd/agent_keys"
allow_loopback_without_key = false
heartbeat_interval = "500ms"
heartbeat_timeout = "2s"
handshake_timeout = "3s"
max_inflight = 4
max_message = "64KiB"
reconnect_grace = "1m"
max_agents = 7

[requests]
timeout = "90s"
queue_timeout = "10s"
max_queue = 0
max_attempts = 5
wait_for_agent = "1.5s"
max_content = "512B"

[conversations]
ttl = "2h"
max = 10
"""
    config = load_config(write(tmp_path, text))
    assert config.server.listen == (
        "127.0.0.1:9000",
        "[::1]:9001",
        "unix:/run/relayd.sock",
        "fd://3",
    )
    assert config.server.state_dir == Path("/var/lib/relayd")
    assert config.server.max_body == 2 * MiB
    assert config.server.log_level == "debug"
    assert config.server.shutdown_grace == 5.0
    assert config.server.idle_timeout == 30.0
    assert config.auth.admin_key_file == Path("/etc/relayd/admin_key")
    assert config.auth.failure_burst == 5
    assert config.auth.failure_interval == 60.0
    assert config.agents.keys == ("k1", "k2")
    assert config.agents.keys_file == Path("/etc/relayd/agent_keys")
    assert config.agents.allow_loopback_without_key is False
    assert config.agents.heartbeat_interval == 0.5
    assert config.agents.heartbeat_timeout == 2.0
    assert config.agents.handshake_timeout == 3.0
    assert config.agents.max_inflight == 4
    assert config.agents.max_message == 64 * KiB
    assert config.agents.reconnect_grace == 60.0
    assert config.agents.max_agents == 7
    assert config.requests.timeout == 90.0
    assert config.requests.queue_timeout == 10.0
    assert config.requests.max_queue == 0
    assert config.requests.max_attempts == 5
    assert config.requests.wait_for_agent == 1.5
    assert config.requests.max_content == 512
    assert config.conversations.ttl == 7200.0
    assert config.conversations.max == 10


def test_agent_keys_are_not_in_the_repr() -> None:
    config = parse_config({"agents": {"keys": ["very-secret-agent-key"]}})
    assert "very-secret-agent-key" not in repr(config)
    assert "very-secret-agent-key" not in config.summary()


def test_summary_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents]\nkeys = ["a"]\n[requests]\ntimeout = "90s"\n')
    summary = load_config(path).summary()
    assert "\n" not in summary
    assert summary.startswith(f"{path}: listen 127.0.0.1:8080; 1 agent key; ")
    assert "request timeout 90s" in summary
    assert "log level info" in summary


# -- value syntax --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("24h", 86400.0),
        (" 30 s ", 30.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["5 parsecs", "-1s", "30", "s", "1.s", "1e3s", "30S", "1d", "", "1 h 2 m", "+1s"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r'a duration such as "500ms", "30s", "5m" or "24h"'):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512B", 512), ("0B", 0), ("256KiB", 256 * KiB), ("1MiB", MiB), ("2GiB", 2 * 1024**3)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1KB", "1kib", "1MB", "1.5MiB", "-1B", "1024", "MiB", "1 TiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r'a size such as "512B", "256KiB" or "1MiB"'):
        parse_size(text)


@pytest.mark.parametrize("seconds", [0.001, 0.5, 1.0, 30.0, 90.0, 300.0, 3600.0, 86400.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("size", [1, 512, KiB, 1536, MiB, 3 * MiB, 1024**3])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_duration_and_size_in_a_file(tmp_path: Path) -> None:
    text = '[requests]\ntimeout = "250ms"\nmax_content = "3KiB"\n[server]\nmax_body = "2048B"\n'
    config = load_config(write(tmp_path, text))
    assert config.requests.timeout == 0.25
    assert config.requests.max_content == 3 * KiB
    assert config.server.max_body == 2048


# -- errors: structure ----------------------------------------------------------------


def test_unknown_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[sever]\nlisten = []\n")
    assert "sever: unknown section [sever]" in message
    assert "[server], [auth], [agents], [requests], [conversations]" in message


def test_unknown_key_names_file_and_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents]\nmax_inflght = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: agents.max_inflght: unknown key")
    assert "max_inflight" in message  # the valid keys are listed
    assert caught.value.key == "agents.max_inflght"
    assert caught.value.source == str(path)


def test_top_level_key_is_an_unknown_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'listen = "127.0.0.1:80"\n')
    assert "unknown section [listen]" in message


def test_section_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: server: expected a table \[server\]$"):
        parse_config({"server": 5}, source="x.toml")


def test_broken_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlog_level = "info"\nmax_body = \n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message


def test_duplicate_key_is_broken_toml(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[agents]\nmax_inflight = 1\nmax_inflight = 2\n")
    assert "invalid TOML" in message
    assert "line 3" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the file: No such file or directory"


def test_unreadable_file_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_unreadable_file_under_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "") / "relayd.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the file: Not a directory"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\nlog_level = "d\xe9bug"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: the file is not valid UTF-8"


# -- errors: values ---------------------------------------------------------------------


def setting(key: str, value: str, *rest: str) -> tuple[str, ...]:
    """A parametrize case: the TOML that sets ``key`` ("section.name") to ``value`` (TOML
    text), the key, and the rest of the case."""
    section, name = key.split(".")
    return (f"[{section}]\n{name} = {value}", key, *rest)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        setting("requests.max_queue", '"10"', "expected an integer, got a string"),
        setting("agents.max_inflight", "true", "expected an integer, got a boolean"),
        setting("agents.max_inflight", "1.5", "expected an integer, got a number"),
        setting("agents.allow_loopback_without_key", "1", "expected true or false, got an integer"),
        setting(
            "agents.allow_loopback_without_key", '"yes"', "expected true or false, got a string"
        ),
        setting(
            "requests.timeout", "30", 'expected a duration string such as "30s", got an integer'
        ),
        setting(
            "server.max_body", "1048576", 'expected a size string such as "1MiB", got an integer'
        ),
        setting("server.listen", '"127.0.0.1:80"', "expected an array of non-empty strings"),
        setting("server.listen", '[""]', "expected an array of non-empty strings"),
        setting("server.listen", "[80]", "expected an array of non-empty strings"),
        setting("server.state_dir", '""', "expected a non-empty string, got an empty string"),
        setting("server.state_dir", "5", "expected a non-empty string, got an integer"),
        setting("server.log_level", '"verbose"', "expected one of debug, info, warning"),
        setting("auth.admin_key_file", "[]", "expected a non-empty string, got an array"),
        setting("agents.keys", '["a", 1]', "expected an array of non-empty strings"),
        setting(
            "conversations.ttl", "{h = 1}", 'expected a duration string such as "30s", got a table'
        ),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    message = error_of(tmp_path, text + "\n")
    assert f": {key}: {expected}" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        setting("requests.timeout", '"5 parsecs"'),
        setting("requests.queue_timeout", '"-1s"'),
        setting("agents.heartbeat_interval", '"15"'),
        setting("conversations.ttl", '"1d"'),
    ],
)
def test_bad_duration(tmp_path: Path, text: str, key: str) -> None:
    message = error_of(tmp_path, text + "\n")
    assert f": {key}: expected a duration such as " in message
    assert repr(tomllib.loads(text)[key.split(".")[0]][key.split(".")[1]]) in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        setting("server.max_body", '"1MB"'),
        setting("agents.max_message", '"lots"'),
        setting("requests.max_content", '"-5KiB"'),
    ],
)
def test_bad_size(tmp_path: Path, text: str, key: str) -> None:
    message = error_of(tmp_path, text + "\n")
    assert f": {key}: expected a size such as " in message


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        setting("agents.max_inflight", "0", "expected at least 1, got 0"),
        setting("agents.max_inflight", "1001", "expected at most 1000, got 1001"),
        setting("requests.max_queue", "-1", "expected at least 0, got -1"),
        setting("requests.max_attempts", "101", "expected at most 100, got 101"),
        setting("conversations.max", "0", "expected at least 1, got 0"),
        setting("agents.heartbeat_interval", '"0s"', "expected at least 10ms, got '0s'"),
        setting("server.shutdown_grace", '"2h"', "expected at most 1h, got '2h'"),
        setting("server.max_body", '"512B"', "expected at least 1KiB, got '512B'"),
        setting("server.max_body", '"2GiB"', "expected at most 1GiB, got '2GiB'"),
        setting("requests.max_content", '"0B"', "expected at least 1B, got '0B'"),
        setting("conversations.ttl", '"500ms"', "expected at least 1s, got '500ms'"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, key: str, expected: str) -> None:
    message = error_of(tmp_path, text + "\n")
    assert message.endswith(f": {key}: {expected}"), message


def test_range_limits_are_inclusive() -> None:
    config = parse_config(
        {
            "agents": {
                "max_inflight": 1000,
                "heartbeat_interval": "10ms",
                "heartbeat_timeout": "1s",
            },
            "server": {"max_body": "1KiB", "shutdown_grace": "1h"},
            "requests": {"max_queue": 0, "max_content": "1B"},
        }
    )
    assert config.agents.max_inflight == 1000
    assert config.agents.heartbeat_interval == 0.01
    assert config.server.max_body == 1024
    assert config.server.shutdown_grace == 3600.0


@pytest.mark.parametrize(
    ("interval", "timeout"), [("15s", "15s"), ("15s", "10s"), ("1m", "59s"), ("10ms", "10ms")]
)
def test_heartbeat_timeout_must_exceed_interval(
    tmp_path: Path, interval: str, timeout: str
) -> None:
    text = f'[agents]\nheartbeat_interval = "{interval}"\nheartbeat_timeout = "{timeout}"\n'
    message = error_of(tmp_path, text)
    assert message.endswith(
        ": agents.heartbeat_timeout: expected a timeout longer than agents.heartbeat_interval "
        f"({interval}), got {timeout}"
    ), message


def test_heartbeat_interval_above_the_default_timeout(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[agents]\nheartbeat_interval = "50s"\n')
    assert message.endswith(
        ": agents.heartbeat_timeout: expected a timeout longer than agents.heartbeat_interval "
        "(50s), got 45s"
    ), message


def test_heartbeat_timeout_just_above_interval_is_fine() -> None:
    config = parse_config({"agents": {"heartbeat_interval": "15s", "heartbeat_timeout": "15.5s"}})
    assert config.agents.heartbeat_timeout == 15.5


def test_first_problem_is_reported_with_the_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"agents": {"max_inflight": 0}}, source="/etc/relayd/relayd.toml")
    assert (
        str(caught.value)
        == "/etc/relayd/relayd.toml: agents.max_inflight: expected at least 1, got 0"
    )


# -- listen addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:8080",
        "0.0.0.0:80",
        "localhost:65535",
        "[::1]:8080",
        "[::]:0",
        "unix:/run/relayd.sock",
        "fd://3",
    ],
)
def test_good_listen_address(address: str) -> None:
    assert listen_address_problem(address) is None
    assert parse_config({"server": {"listen": [address]}}).server.listen == (address,)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost", "host:port, [v6]:port or unix:/path, got 'localhost'"),
        ("127.0.0.1:http", "host:port, [v6]:port or unix:/path, got '127.0.0.1:http'"),
        ("127.0.0.1:65536", "host:port, [v6]:port or unix:/path, got '127.0.0.1:65536'"),
        ("127.0.0.1:", "host:port, [v6]:port or unix:/path, got '127.0.0.1:'"),
        ("127.0.0.1:-1", "host:port, [v6]:port or unix:/path, got '127.0.0.1:-1'"),
        (":8080", "a host before the port, got ':8080'"),
        ("[::1:8080", "an IPv6 address in brackets, got '[::1:8080'"),
        ("::1]:8080", "an IPv6 address in brackets, got '::1]:8080'"),
        ("unix:", "a socket path after unix:, got 'unix:'"),
        ("fd://", "a file descriptor number after fd://, got 'fd://'"),
        ("fd://three", "a file descriptor number after fd://, got 'fd://three'"),
    ],
)
def test_bad_listen_address(tmp_path: Path, address: str, expected: str) -> None:
    assert listen_address_problem(address) == expected
    message = error_of(tmp_path, f'[server]\nlisten = ["127.0.0.1:1", {json.dumps(address)}]\n')
    assert message.endswith(f": server.listen: expected {expected}"), message


def test_empty_listen_list(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server]\nlisten = []\n")
    assert message.endswith(": server.listen: expected at least one address")


@pytest.mark.parametrize("address", ["127.0.0.1:\u00b3", "127.0.0.1:\u2460", "fd://\u00b2"])
def test_listen_port_made_of_non_decimal_digits(address: str) -> None:
    """``str.isdigit`` accepts superscripts and circled digits, which ``int`` rejects.

    Such an address must be reported as a bad address, like any other, not
    raise ValueError from ``int()`` (which crashes ``relayd --listen``) and not
    be accepted (``fd://²`` would reach Hypercorn).
    """
    problem = listen_address_problem(address)
    assert problem is not None
    assert address in repr(problem) or repr(address) in problem
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"listen": [address]}})
    assert "invalid literal" not in str(caught.value)
    assert repr(address) in str(caught.value)


# -- agent keys file ----------------------------------------------------------------------


def test_read_keys_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# agent keys, one a line\n\nkey-one\n   key-two   \n\t\n  # indented comment\nkey-three\n",
        "agent_keys",
    )
    assert read_keys_file(path) == ("key-one", "key-two", "key-three")


def test_read_keys_file_empty(tmp_path: Path) -> None:
    assert read_keys_file(write(tmp_path, "", "agent_keys")) == ()
    assert read_keys_file(write(tmp_path, "# none yet\n", "agent_keys")) == ()


def test_read_keys_file_key_with_a_space(tmp_path: Path) -> None:
    path = write(tmp_path, "# header\nkey-one\nkey two\n", "agent_keys")
    with pytest.raises(ConfigError) as caught:
        read_keys_file(path)
    assert str(caught.value) == f"{path}: line 3: an agent key has no spaces"


def test_read_keys_file_inline_comment_is_not_a_key(tmp_path: Path) -> None:
    path = write(tmp_path, "key-one # the laptop\n", "agent_keys")
    with pytest.raises(ConfigError, match="line 1: an agent key has no spaces"):
        read_keys_file(path)


def test_read_keys_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(ConfigError) as caught:
        read_keys_file(path)
    assert str(caught.value) == f"{path}: cannot read agent keys: No such file or directory"


def test_read_keys_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent_keys"
    path.write_bytes(b"k\xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        read_keys_file(path)
    assert str(caught.value) == f"{path}: cannot read agent keys: not valid UTF-8"


def test_read_keys_file_path_with_nul(tmp_path: Path) -> None:
    """TOML strings may hold ``\\u0000``, so ``agents.keys_file`` can; the
    documented contract is ConfigError naming the file, not ValueError."""
    with pytest.raises(ConfigError, match=r"agents\.keys_file: expected a string without NUL"):
        parse_config({"agents": {"keys_file": str(tmp_path) + "/keys\x00"}})
    # read_keys_file itself, given such a path by a caller, still names the file.
    with pytest.raises(ConfigError, match="cannot read agent keys"):
        read_keys_file(tmp_path / "keys\x00")


# -- the example file --------------------------------------------------------------------


def test_example_file_parses() -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)


def _sections_of_example() -> dict[str, str]:
    """The example's text by section header, commented headers included."""
    sections: dict[str, str] = {}
    current = ""
    for line in EXAMPLE.read_text("utf-8").splitlines():
        header = re.match(r"^\s*#?\s*\[([a-z_]+)\]\s*$", line)
        if header:
            current = header[1]
            sections.setdefault(current, "")
            continue
        sections[current] = sections.get(current, "") + line + "\n"
    return sections


@pytest.mark.parametrize(
    "dotted", sorted(f"{section}.{name}" for section, keys in SCHEMA.items() for name in keys)
)
def test_example_file_mentions_every_key_in_its_section(dotted: str) -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    section, name = dotted.split(".")
    sections = _sections_of_example()
    assert section in sections, f"no [{section}] in {EXAMPLE}"
    pattern = rf"^\s*#?\s*{re.escape(name)}\s*="
    assert re.search(pattern, sections[section], re.MULTILINE), f"{dotted} not in [{section}]"


def test_example_file_shows_the_defaults() -> None:
    """The example says "every key is shown with its default value": check that
    each commented ``# key = value`` of a key with a default parses to it."""
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    checked = 0
    for section, text in _sections_of_example().items():
        for match in re.finditer(r"^\s*#\s*([a-z0-9_]+)\s*=(.*)$", text, re.MULTILINE):
            name, raw = match[1], match[2]
            dotted = f"{section}.{name}"
            if dotted not in DEFAULTS or DEFAULTS[dotted] is None:
                continue
            value = tomllib.loads(f"v = {raw}")["v"]
            parsed = value_of(parse_config({section: {name: value}}), dotted)
            assert parsed == DEFAULTS[dotted], f"{dotted}: example shows {raw.strip()}"
            checked += 1
    assert checked == sum(1 for value in DEFAULTS.values() if value is not None)


# -- property: nothing but ConfigError ------------------------------------------------------

_all_names = sorted({name for keys in SCHEMA.values() for name in keys})
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "30s",
            "0s",
            "-1s",
            "1.5h",
            "500ms",
            "1MiB",
            "0B",
            "2GiB",
            "info",
            "DEBUG",
            "127.0.0.1:80",
            "[::1]:0",
            "unix:/x",
            "fd://3",
            "fd://",
            ":80",
            "1e999s",
            "9" * 400 + "h",
        ]
    ),
    st.datetimes(timezones=st.one_of(st.none(), st.just(dt.UTC))),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
_tables = st.dictionaries(
    st.one_of(st.sampled_from(_all_names), st.text(max_size=12)), _values, max_size=6
)
_documents = st.dictionaries(
    st.one_of(st.sampled_from(list(SCHEMA)), st.text(max_size=12)),
    st.one_of(_tables, _values),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_documents)
def test_parse_config_raises_only_config_error(document: dict[str, Any]) -> None:
    try:
        config = parse_config(document, source="fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml: ")
        assert error.source == "fuzz.toml"
    else:
        assert isinstance(config, Config)
        assert config.agents.heartbeat_timeout > config.agents.heartbeat_interval


@settings(max_examples=200, deadline=None)
@given(
    document=st.dictionaries(
        st.sampled_from(list(SCHEMA)),
        st.dictionaries(st.sampled_from(_all_names), _scalars, max_size=6),
        max_size=5,
    )
)
def test_parse_config_known_keys_raise_only_config_error(document: dict[str, Any]) -> None:
    try:
        parse_config(document, source="fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml: ")
