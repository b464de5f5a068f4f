"""The agent's settings: an ``[agent]`` table in a TOML file, the command line, or both.

This module owns the schema of ``relayd agent`` (every key, its type, default
and range), its validation, and where the two secrets come from. It never
configures logging and never exits: every problem is a
:class:`~relayd.config.ConfigError` naming the file (or "the command line")
and the key, as the daemon's configuration does.

Invariants:

* :class:`AgentSettings` is immutable; a reload builds a new one.
* Nothing is silently ignored: an unknown section or key is an error, and so
  is a value of the wrong type, naming ``agent.key`` (or ``--option``).
* A secret (the agent key, the backend's API key) never comes from the
  command line and never reaches a log: :class:`Secret` shows only where it
  came from.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relayd.config import (
    ConfigError,
    bound_text,
    convert_scalar,
    read_problem,
    read_toml,
)
from relayd.protocol.v2 import MAX_CAPACITY, MAX_MODEL_ID, MAX_MODELS

__all__ = [
    "AGENT_KEY_CREDENTIAL",
    "BACKEND_KEY_CREDENTIAL",
    "REGISTER_PATH",
    "SCHEMA",
    "AgentSettings",
    "Secret",
    "build_settings",
    "display_url",
    "find_agent_key",
    "find_backend_key",
    "find_state_dir",
    "load_table",
    "register_url",
]

SECTION = "agent"
REGISTER_PATH = "/client/register"
AGENT_KEY_CREDENTIAL = "agent_key"
BACKEND_KEY_CREDENTIAL = "backend_key"


@dataclass(frozen=True)
class Setting:
    """One key of ``[agent]``: how to read it, its default, and its bounds."""

    kind: str  # "duration", "size", "int", "bool", "str", "path", "str-list", "level", "ws", "http"
    default: Any
    minimum: float | None = None
    maximum: float | None = None


SCHEMA: Mapping[str, Setting] = {
    "relay": Setting("ws", None),
    "backend": Setting("http", None),
    "echo": Setting("bool", False),
    "echo_delay": Setting("duration", "50ms", minimum=0, maximum=60),
    "models": Setting("str-list", ()),
    "models_refresh": Setting("duration", "60s", minimum=1, maximum=86400),
    "capacity": Setting("int", 4, minimum=1, maximum=MAX_CAPACITY),
    "name": Setting("str", None),
    "key_file": Setting("path", None),
    "backend_key_file": Setting("path", None),
    "state_dir": Setting("path", None),
    "log_level": Setting("level", "info"),
    "drain_grace": Setting("duration", "30s", minimum=0, maximum=3600),
    "backend_timeout": Setting("duration", "120s", minimum=0.01, maximum=86400),
    "connect_timeout": Setting("duration", "10s", minimum=0.01, maximum=3600),
    "conversations_max": Setting("int", 10000, minimum=1, maximum=100_000_000),
    "conversations_max_bytes": Setting("size", "64MiB", minimum=1024, maximum=64 * 1024**3),
    "conversations_ttl": Setting("duration", "24h", minimum=1, maximum=365 * 86400),
}


@dataclass(frozen=True)
class AgentSettings:
    """One immutable snapshot of the agent's settings (see :data:`SCHEMA`)."""

    relay: str
    backend: str | None
    echo: bool
    echo_delay: float
    models: tuple[str, ...]
    models_refresh: float
    capacity: int
    name: str
    key_file: Path | None
    backend_key_file: Path | None
    state_dir: Path | None
    log_level: str
    drain_grace: float
    backend_timeout: float
    connect_timeout: float
    conversations_max: int
    conversations_max_bytes: int
    conversations_ttl: float
    source: str = "the command line"

    @property
    def register_url(self) -> str:
        """The WebSocket URL the agent dials: the relay's base plus ``/client/register``."""
        return register_url(self.relay)

    def summary(self) -> str:
        """One line for the start-up log and ``--check``; no secret in it."""
        backend = "echo" if self.echo else display_url(self.backend or "")
        models = ", ".join(self.models) if self.models else "discovered from the backend"
        if self.echo and not self.models:
            models = "any"
        return (
            f"{self.source}: relay {display_url(self.relay)}; backend {backend}; "
            f"models {models}; capacity {self.capacity}; name {self.name}; "
            f"log level {self.log_level}"
        )


# -- values ------------------------------------------------------------------------------


def _url(value: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        raise ValueError(f"a URL, got {value!r} ({error})") from None
    if parts.scheme not in schemes or not parts.hostname:
        example = "ws://HOST:PORT or wss://HOST" if "ws" in schemes else "http://HOST:PORT/v1"
        raise ValueError(f"a URL such as {example}, got {value!r}")
    if parts.fragment:
        raise ValueError(f"a URL without a #fragment, got {value!r}")
    return value


def _convert(setting: Setting, value: Any) -> Any:
    """One TOML value in its typed form; ValueError says what was expected."""
    kind = setting.kind
    result: Any
    if kind == "str-list":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("an array of non-empty strings")
        if len(value) > MAX_MODELS:
            raise ValueError(f"at most {MAX_MODELS} models, got {len(value)}")
        for item in value:
            if len(item) > MAX_MODEL_ID or any(not c.isprintable() for c in item):
                raise ValueError(f"model names of at most {MAX_MODEL_ID} printable characters")
        result = tuple(dict.fromkeys(value))  # in order, without repeats
    elif kind in ("ws", "http"):
        text = convert_scalar("str", value)
        result = _url(text, ("ws", "wss") if kind == "ws" else ("http", "https"))
    else:
        result = convert_scalar(kind, value, size_example='"64MiB"')
    if setting.minimum is not None and result < setting.minimum:
        raise ValueError(f"at least {bound_text(setting.kind, setting.minimum)}, got {value!r}")
    if setting.maximum is not None and result > setting.maximum:
        raise ValueError(f"at most {bound_text(setting.kind, setting.maximum)}, got {value!r}")
    return result


def option_name(key: str) -> str:
    """``echo_delay`` → ``--echo-delay``: how a key is spelt on the command line."""
    return "--" + key.replace("_", "-")


# -- the file ----------------------------------------------------------------------------


def load_table(path: Path) -> dict[str, Any]:
    """The ``[agent]`` table of the TOML file at ``path``, its keys not yet checked.

    Raises ConfigError when the file cannot be read, is not TOML, or holds
    anything but an ``[agent]`` table.
    """
    source = str(path)
    document = read_toml(path)
    for name, value in document.items():
        if name != SECTION:
            what = "section" if isinstance(value, dict) else "key"
            raise ConfigError(
                f"unknown {what} {name!r} outside [agent]; the file has one table, [agent]",
                source=source,
                key=name,
            )
    table = document.get(SECTION)
    if table is None:
        raise ConfigError("no [agent] table", source=source)
    if not isinstance(table, dict):
        raise ConfigError("expected a table [agent]", source=source, key=SECTION)
    return table


def _values(table: Mapping[str, Any], source: str, spell: Callable[[str], str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in table.items():
        setting = SCHEMA.get(name)
        if setting is None:
            raise ConfigError(
                f"unknown key; [agent] has {', '.join(SCHEMA)}", source=source, key=spell(name)
            )
        try:
            values[name] = _convert(setting, raw)
        except ValueError as error:
            raise ConfigError(f"expected {error}", source=source, key=spell(name)) from None
    return values


def build_settings(
    table: Mapping[str, Any] | None,
    *,
    source: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    hostname: Callable[[], str] = socket.gethostname,
) -> AgentSettings:
    """Validate the file's ``[agent]`` table (from :func:`load_table`, or None
    without a file) and the command line's ``overrides`` (the same keys, as
    TOML values), which win; fill in the defaults.

    ``--echo`` on the command line replaces a ``backend`` from the file, and
    ``--backend`` an ``echo``. Raises ConfigError naming the file and
    ``agent.key``, or the command line and ``--option``.
    """
    file_source = source or "the command line"
    from_file = _values(table or {}, file_source, lambda name: f"{SECTION}.{name}")
    from_cli = _values(overrides or {}, "the command line", option_name)
    if from_cli.get("echo"):
        from_file.pop("backend", None)
    if from_cli.get("backend") is not None:
        from_file.pop("echo", None)
    merged = {**from_file, **from_cli}
    values: dict[str, Any] = {}
    for name, setting in SCHEMA.items():
        if name in merged:
            values[name] = merged[name]
        elif setting.default is None:
            values[name] = None
        else:
            values[name] = _convert(setting, setting.default)

    def where(name: str) -> tuple[str, str]:
        if name in from_cli:
            return "the command line", option_name(name)
        return file_source, f"{SECTION}.{name}" if table is not None else option_name(name)

    if values["relay"] is None:
        raise ConfigError(
            "missing: the relay's URL, such as ws://127.0.0.1:8080 or wss://relay.example.com",
            source=file_source,
            key=f"{SECTION}.relay" if table is not None else "--relay",
        )
    if values["echo"] and values["backend"] is not None:
        origin, key = where("backend")
        raise ConfigError("give a backend or echo = true, not both", source=origin, key=key)
    if not values["echo"] and values["backend"] is None:
        raise ConfigError(
            "missing: an OpenAI-compatible backend's /v1 URL (such as "
            "http://127.0.0.1:11434/v1), or echo = true (--echo)",
            source=file_source,
            key=f"{SECTION}.backend" if table is not None else "--backend",
        )
    if values["name"] is None:
        values["name"] = hostname() or "relayd-agent"
    return AgentSettings(**values, source=file_source)


def settings_changed(old: AgentSettings, new: AgentSettings) -> list[str]:
    """The names of the keys whose values differ (source aside)."""
    return [
        item.name
        for item in fields(AgentSettings)
        if item.name != "source" and getattr(old, item.name) != getattr(new, item.name)
    ]


# -- URLs --------------------------------------------------------------------------------


def register_url(relay: str) -> str:
    """``ws://host:8080`` → ``ws://host:8080/client/register``; a path prefix (a
    relay behind a proxy at ``wss://example.com/relayd``) is kept, and a URL
    that already ends in ``/client/register`` is taken as it is."""
    parts = urlsplit(relay)
    path = parts.path.rstrip("/")
    if not path.endswith(REGISTER_PATH):
        path += REGISTER_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def display_url(url: str) -> str:
    """A URL for logs: scheme, host and port only. The path and query may hold
    an agent key (``/agent/KEY``, ``?key=``) and the user info a password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "<a malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}"


# -- secrets and the state directory -----------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """A key and where it came from; its text is never in a repr or a log."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"a key from {self.source}"


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(
            f"cannot read the {what}: {read_problem(error)}", source=str(path)
        ) from None
    if not value:
        raise ConfigError(f"the {what} file is empty", source=str(path))
    if any(c.isspace() for c in value):
        raise ConfigError(f"the {what} has no spaces or line breaks", source=str(path))
    return value


def _credential(environ: Mapping[str, str], name: str, what: str) -> Secret | None:
    """``$CREDENTIALS_DIRECTORY/name``; an empty one (the unit's fallback when the
    file under /etc is absent) means "not set"."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        if not path.read_bytes().strip():
            return None
    except OSError:
        return None
    return Secret(_read_secret(path, what), f"credential {name}")


def find_agent_key(settings: AgentSettings, environ: Mapping[str, str]) -> Secret | None:
    """The key the agent presents to the relay (``Authorization: Bearer``), the
    first of: ``key_file``, ``$CREDENTIALS_DIRECTORY/agent_key``,
    ``$RELAYD_AGENT_KEY``; None: no key (enough on the relay's loopback).

    Raises ConfigError naming a file that cannot be read or is empty.
    """
    if settings.key_file is not None:
        return Secret(_read_secret(settings.key_file, "agent key"), str(settings.key_file))
    found = _credential(environ, AGENT_KEY_CREDENTIAL, "agent key")
    if found is not None:
        return found
    if environ.get("RELAYD_AGENT_KEY", "").strip():
        return Secret(environ["RELAYD_AGENT_KEY"].strip(), "$RELAYD_AGENT_KEY")
    return None


def find_backend_key(settings: AgentSettings, environ: Mapping[str, str]) -> Secret | None:
    """The backend's API key, the first of: ``backend_key_file``,
    ``$CREDENTIALS_DIRECTORY/backend_key``, ``$RELAYD_BACKEND_KEY``,
    ``$OPENAI_API_KEY``; None: the backend needs none (Ollama, llama.cpp).
    """
    if settings.backend_key_file is not None:
        path = settings.backend_key_file
        return Secret(_read_secret(path, "backend key"), str(path))
    found = _credential(environ, BACKEND_KEY_CREDENTIAL, "backend key")
    if found is not None:
        return found
    for variable in ("RELAYD_BACKEND_KEY", "OPENAI_API_KEY"):
        if environ.get(variable, "").strip():
            return Secret(environ[variable].strip(), f"${variable}")
    return None


def find_state_dir(settings: AgentSettings, environ: Mapping[str, str]) -> Path:
    """The first of: ``state_dir``, ``$STATE_DIRECTORY`` (systemd),
    ``$XDG_STATE_HOME/relayd-agent``, ``~/.local/state/relayd-agent``."""
    if settings.state_dir is not None:
        return settings.state_dir
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "relayd-agent"
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "relayd-agent"
