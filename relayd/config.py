"""The configuration: a frozen, typed snapshot of the operator's TOML file.

This module owns the schema (every section and key, with its type, default and
range), parsing and validation. It never configures logging and never exits:
every problem is a :class:`ConfigError` naming the file, the key as
``section.key`` and what was expected, and the caller decides what to do.

Invariants:

* A :class:`Config` is immutable. Reloading builds a new one and the daemon
  swaps it in one assignment, so a request never sees half a reload.
* Nothing is silently ignored: an unknown section or key is an error, because a
  misspelt key that is ignored is a setting the operator believes is in force.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayd.proxies import cidr_problem

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SCHEMA",
    "AgentsConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ConversationsConfig",
    "RequestsConfig",
    "ServerConfig",
    "bound_text",
    "convert_scalar",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "read_problem",
    "read_toml",
]

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.toml")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""

    def __init__(self, message: str, *, source: str = "<defaults>", key: str | None = None):
        self.source = source
        self.key = key
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


# -- value parsers -----------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_duration(text: str) -> float:
    """``"1.5s"`` → 1.5 seconds. Units: ms, s, m, h. Raises ValueError."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f'a duration such as "500ms", "30s", "5m" or "24h", got {text!r}')
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_size(text: str) -> int:
    """``"1MiB"`` → 1048576 bytes. Units: B, KiB, MiB, GiB. Raises ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f'a size such as "512B", "256KiB" or "1MiB", got {text!r}')
    return int(match[1]) * _SIZE_UNITS[match[2]]


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for summaries and docs."""
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= scale and (seconds / scale).is_integer():
            return f"{int(seconds / scale)}{unit}"
    return f"{round(seconds * 1000)}ms"


def plural(count: int, noun: str) -> str:
    """``1 user``, ``2 users``, ``0 agent keys``: for log lines and summaries."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


# -- the schema ----------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One configuration key: how to read it from TOML, and what it means."""

    kind: str  # "duration", "size", "int", "bool", "str", "path", "str-list", "level"
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # may be absent with no default (None)
    check: Callable[[Any], str | None] | None = None  # extra rule; returns a problem or None


def _check_listen(values: Any) -> str | None:
    if not values:
        return "at least one address"
    for value in values:
        problem = listen_address_problem(value)
        if problem:
            return problem
    return None


def _check_cidrs(values: Any) -> str | None:
    for value in values:
        problem = cidr_problem(value)
        if problem:
            return problem
    return None


_DIGITS = re.compile(r"[0-9]+\Z")  # str.isdigit() also accepts "³" and "①"


def listen_address_problem(value: str) -> str | None:
    """Why ``value`` is not a listen address we accept, or None if it is."""
    if value.startswith("unix:"):
        return None if len(value) > len("unix:") else f"a socket path after unix:, got {value!r}"
    if value.startswith("fd://"):
        if _DIGITS.match(value[5:]):
            return None
        return f"a file descriptor number after fd://, got {value!r}"
    host, sep, port = value.rpartition(":")
    if not sep or not _DIGITS.match(port) or not 0 <= int(port) <= 65535:
        return f"host:port, [v6]:port or unix:/path, got {value!r}"
    if host.startswith("[") != host.endswith("]"):
        return f"an IPv6 address in brackets, got {value!r}"
    if not host:
        return f"a host before the port, got {value!r}"
    return None


SCHEMA: Mapping[str, Mapping[str, Key]] = {
    "server": {
        "listen": Key("str-list", ("127.0.0.1:8080",), check=_check_listen),
        "state_dir": Key("path", None, optional=True),
        "max_body": Key("size", "1MiB", minimum=1024, maximum=1024**3),
        "log_level": Key("level", "info"),
        "shutdown_grace": Key("duration", "30s", minimum=0, maximum=3600),
        "idle_timeout": Key("duration", "10s", minimum=0.1, maximum=3600),
        "body_timeout": Key("duration", "60s", minimum=0.1, maximum=3600),
        "tls_certificate": Key("path", None, optional=True),
        "tls_key": Key("path", None, optional=True),
        "trusted_proxies": Key("str-list", (), check=_check_cidrs),
        "proxy_protocol": Key("bool", False),
    },
    "auth": {
        "admin_key_file": Key("path", None, optional=True),
        "failure_burst": Key("int", 10, minimum=1, maximum=1_000_000),
        "failure_interval": Key("duration", "6s", minimum=0, maximum=86400),
        "prefix_failure_burst": Key("int", 40, minimum=1, maximum=1_000_000),
        "ipv4_prefix": Key("int", 24, minimum=8, maximum=32),
        "ipv6_prefix": Key("int", 64, minimum=16, maximum=128),
    },
    "agents": {
        "keys": Key("str-list", ()),
        "keys_file": Key("path", None, optional=True),
        "allow_loopback_without_key": Key("bool", True),
        "heartbeat_interval": Key("duration", "15s", minimum=0.01, maximum=3600),
        "heartbeat_timeout": Key("duration", "45s", minimum=0.01, maximum=86400),
        "handshake_timeout": Key("duration", "10s", minimum=0.01, maximum=3600),
        "max_inflight": Key("int", 1, minimum=1, maximum=1000),
        "max_message": Key("size", "1MiB", minimum=1024, maximum=1024**3),
        "reconnect_grace": Key("duration", "30s", minimum=0, maximum=86400),
        "startup_grace": Key("duration", "15s", minimum=0, maximum=3600),
        "max_agents": Key("int", 20000, minimum=1, maximum=1_000_000),
        "v1_model": Key("str", None, optional=True),
    },
    "requests": {
        "timeout": Key("duration", "120s", minimum=0.01, maximum=86400),
        "queue_timeout": Key("duration", "30s", minimum=0, maximum=86400),
        "max_queue": Key("int", 1000, minimum=0, maximum=1_000_000),
        "max_attempts": Key("int", 3, minimum=1, maximum=100),
        "wait_for_agent": Key("duration", "0s", minimum=0, maximum=86400),
        "max_content": Key("size", "256KiB", minimum=1, maximum=1024**3),
        "max_response": Key("size", "1MiB", minimum=1024, maximum=1024**3),
        "idempotency_ttl": Key("duration", "24h", minimum=1, maximum=30 * 86400),
        "idempotency_max": Key("int", 10000, minimum=1, maximum=10_000_000),
    },
    "conversations": {
        "ttl": Key("duration", "24h", minimum=1, maximum=365 * 86400),
        "max": Key("int", 100000, minimum=1, maximum=100_000_000),
    },
}


# -- the typed result ----------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...]
    state_dir: Path | None
    max_body: int
    log_level: str
    shutdown_grace: float
    idle_timeout: float
    body_timeout: float
    tls_certificate: Path | None
    tls_key: Path | None
    trusted_proxies: tuple[str, ...]
    proxy_protocol: bool


@dataclass(frozen=True)
class AuthConfig:
    admin_key_file: Path | None
    failure_burst: int
    failure_interval: float
    prefix_failure_burst: int
    ipv4_prefix: int
    ipv6_prefix: int


@dataclass(frozen=True)
class AgentsConfig:
    keys: tuple[str, ...] = field(repr=False)
    keys_file: Path | None
    allow_loopback_without_key: bool
    heartbeat_interval: float
    heartbeat_timeout: float
    handshake_timeout: float
    max_inflight: int
    max_message: int
    reconnect_grace: float
    startup_grace: float
    max_agents: int
    v1_model: str | None


@dataclass(frozen=True)
class RequestsConfig:
    timeout: float
    queue_timeout: float
    max_queue: int
    max_attempts: int
    wait_for_agent: float
    max_content: int
    max_response: int
    idempotency_ttl: float
    idempotency_max: int


@dataclass(frozen=True)
class ConversationsConfig:
    ttl: float
    max: int


@dataclass(frozen=True)
class Config:
    """One immutable snapshot of the whole configuration."""

    server: ServerConfig
    auth: AuthConfig
    agents: AgentsConfig
    requests: RequestsConfig
    conversations: ConversationsConfig
    source: str = "<defaults>"

    def replace_server(self, **changes: Any) -> Config:
        """A copy with some ``[server]`` values changed (command-line overrides)."""
        return dataclasses.replace(self, server=dataclasses.replace(self.server, **changes))

    def summary(self) -> str:
        """One line for ``relayd check-config`` and the start-up log."""
        keys = len(self.agents.keys)
        return (
            f"{self.source}: listen {', '.join(self.server.listen)}; "
            f"{plural(keys, 'agent key')}"
            f"{' + ' + str(self.agents.keys_file) if self.agents.keys_file else ''}; "
            f"request timeout {format_duration(self.requests.timeout)}; "
            f"log level {self.server.log_level}"
        )


_SECTION_TYPES: Mapping[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "agents": AgentsConfig,
    "requests": RequestsConfig,
    "conversations": ConversationsConfig,
}


_TOML_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _type_name(value: Any) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


def convert_scalar(kind: str, value: Any, *, size_example: str = '"1MiB"') -> Any:
    """One TOML value of a scalar kind (duration, size, int, bool, or a string:
    str, path, level) in its typed form; ValueError says what was expected.

    Shared by relayd's config and ``relayd agent``'s, so that both files
    refuse the same mistakes with the same words.
    """
    if kind in ("duration", "size"):
        if not isinstance(value, str):
            unit = '"30s"' if kind == "duration" else size_example
            raise ValueError(f"a {kind} string such as {unit}, got {_type_name(value)}")
        return parse_duration(value) if kind == "duration" else parse_size(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"an integer, got {_type_name(value)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"true or false, got {_type_name(value)}")
        return value
    if not isinstance(value, str) or not value:
        shown = "an empty string" if value == "" else _type_name(value)
        raise ValueError(f"a non-empty string, got {shown}")
    if "\x00" in value:
        raise ValueError("a string without NUL characters")
    if kind == "level":
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.lower()
    return Path(value) if kind == "path" else value


def bound_text(kind: str, bound: float) -> str:
    """A minimum or maximum as the config file would write it."""
    if kind == "duration":
        return format_duration(bound)
    if kind == "size":
        return format_size(int(bound))
    return str(int(bound))


def _convert(key: Key, value: Any) -> Any:
    """Turn one TOML value into its typed form; raise ValueError with what was expected."""
    if key.kind == "str-list":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("an array of non-empty strings")
        result: Any = tuple(value)
    else:
        result = convert_scalar(key.kind, value)
    if key.minimum is not None and result < key.minimum:
        raise ValueError(f"at least {bound_text(key.kind, key.minimum)}, got {value!r}")
    if key.maximum is not None and result > key.maximum:
        raise ValueError(f"at most {bound_text(key.kind, key.maximum)}, got {value!r}")
    if key.check is not None:
        problem = key.check(result)
        if problem:
            raise ValueError(problem)
    return result


def parse_config(document: Mapping[str, Any], *, source: str = "<defaults>") -> Config:
    """Validate a parsed TOML document against :data:`SCHEMA`.

    Raises :class:`ConfigError` for the first problem found, naming ``source``
    and the key.
    """
    for section, table in document.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"unknown section [{section}]; expected one of "
                + ", ".join(f"[{name}]" for name in SCHEMA),
                source=source,
                key=section,
            )
        if not isinstance(table, dict):
            raise ConfigError(f"expected a table [{section}]", source=source, key=section)
    sections: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        table = document.get(section, {})
        for name in table:
            if name not in keys:
                raise ConfigError(
                    f"unknown key; [{section}] has {', '.join(keys)}",
                    source=source,
                    key=f"{section}.{name}",
                )
        values: dict[str, Any] = {}
        for name, key in keys.items():
            dotted = f"{section}.{name}"
            raw = table.get(name, key.default)
            if raw is None:
                values[name] = None
                continue
            try:
                values[name] = _convert(key, raw)
            except ValueError as error:
                raise ConfigError(f"expected {error}", source=source, key=dotted) from None
        sections[section] = _SECTION_TYPES[section](**values)
    config = Config(**sections, source=source)
    _check_relations(config)
    return config


def _check_relations(config: Config) -> None:
    """Rules that involve more than one key."""
    server = config.server
    if server.proxy_protocol and not server.trusted_proxies:
        raise ConfigError(
            "expected server.trusted_proxies to name the proxies that send the PROXY header",
            source=config.source,
            key="server.proxy_protocol",
        )
    if (server.tls_certificate is None) != (server.tls_key is None):
        missing = "server.tls_key" if server.tls_key is None else "server.tls_certificate"
        raise ConfigError(
            "expected server.tls_certificate and server.tls_key together",
            source=config.source,
            key=missing,
        )
    agents = config.agents
    if agents.heartbeat_timeout <= agents.heartbeat_interval:
        raise ConfigError(
            "expected a timeout longer than agents.heartbeat_interval "
            f"({format_duration(agents.heartbeat_interval)}), got "
            f"{format_duration(agents.heartbeat_timeout)}",
            source=config.source,
            key="agents.heartbeat_timeout",
        )


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; ``None`` means the embedded defaults.

    Raises :class:`ConfigError` when the file cannot be read, is not TOML (the
    message has the line), or fails validation.
    """
    if path is None:
        return parse_config({})
    source = str(path)
    return parse_config(read_toml(path), source=source)


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document in ``path``; ConfigError (naming the file) when it cannot
    be read, is not UTF-8, or is not TOML (tomllib's message has the line)."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the file is not valid UTF-8", source=source) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the file: {read_problem(error)}", source=source) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML: {error}", source=source) from None


def read_problem(error: Exception) -> str:
    """What went wrong reading a file, in a few words."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, UnicodeDecodeError):
        return "not valid UTF-8"
    return str(error)  # ValueError: a NUL in the path


def read_keys_file(path: Path) -> tuple[str, ...]:
    """Agent keys from ``path``: one a line; blank lines and ``#`` comments skipped.

    Raises :class:`ConfigError` naming the file when it cannot be read.
    """
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(
            f"cannot read agent keys: {read_problem(error)}", source=str(path)
        ) from None
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if any(c.isspace() for c in text):
            raise ConfigError(f"line {number}: an agent key has no spaces", source=str(path))
        keys.append(text)
    return tuple(keys)
