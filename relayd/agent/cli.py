"""``relayd agent``: the command line, and one Trio run of the agent.

Exit codes: 0 stopped cleanly (SIGTERM, SIGINT) or ``--check`` passed; 1 an
error the operator must fix (the settings, a key file, the state directory,
a relay that does not speak protocol v2); 2 a usage error.

No option takes a key: a key on the command line is shown by ``ps`` to every
user of the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from relayd import logs
from relayd.agent.config import (
    AgentSettings,
    build_settings,
    find_agent_key,
    find_backend_key,
    find_state_dir,
    load_table,
)
from relayd.agent.history import StoreError
from relayd.agentkit import RelayRefusedV2
from relayd.config import LOG_LEVELS, ConfigError
from relayd.errors import leaf_exceptions
from relayd.locate import prepare_state_dir
from relayd.systemd import Notifier

if TYPE_CHECKING:
    from relayd.agent.service import AgentService

__all__ = ["build_parser", "main"]

log = logging.getLogger("relayd.agent")

EXIT_OK = 0
EXIT_ERROR = 1

USAGE = (
    "relayd agent --relay URL (--backend URL | --echo) [--model NAME]... [--capacity N]\n"
    "                    [--key-file PATH] [--name NAME] [--state-dir DIR]\n"
    "       relayd agent --config PATH [options that override the file]"
)

# Libraries whose chatter is not the operator's business (one line per HTTP request).
QUIET_LOGGERS = ("httpx2", "httpcore2", "httpx", "httpcore", "openai", "trio-websocket", "hpack")

_SECONDS = re.compile(r"^\s*\d+(\.\d+)?\s*$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd agent",
        usage=USAGE,
        # No abbreviations: `--key SECRET` must not be read as `--key-file SECRET`.
        allow_abbrev=False,
        description=(
            "Bring an OpenAI-compatible backend (Ollama, llama.cpp, vLLM, OpenAI...) online "
            "at a relay: dial in over WebSocket (protocol v2), answer its requests with the "
            "backend, keep each conversation's history."
        ),
        epilog=(
            "Keys never come from the command line. The agent key: --key-file, the systemd "
            "credential agent_key, or $RELAYD_AGENT_KEY. The backend's: --backend-key-file, "
            "the credential backend_key, $RELAYD_BACKEND_KEY or $OPENAI_API_KEY. "
            "SIGHUP reloads the settings; SIGTERM drains. See docs/agents.md."
        ),
    )
    parser.add_argument("--config", type=Path, metavar="PATH", help="a TOML file with [agent]")
    parser.add_argument("--relay", metavar="URL", help="the relay, ws://HOST:PORT or wss://HOST")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--backend", metavar="URL", help="an OpenAI-compatible /v1 URL (http://HOST:PORT/v1)"
    )
    source.add_argument(
        "--echo", action="store_true", default=None, help="no backend: answer with the question"
    )
    parser.add_argument(
        "--echo-delay", metavar="SECONDS", help="with --echo, between words (default 0.05)"
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="a model to serve (repeatable; default: the backend's /v1/models)",
    )
    parser.add_argument("--capacity", type=int, metavar="N", help="requests at once (default 4)")
    parser.add_argument("--name", help="shown by the relay (default: the host name)")
    parser.add_argument("--key-file", metavar="PATH", help="the agent key, in a file")
    parser.add_argument("--backend-key-file", metavar="PATH", help="the backend's API key")
    parser.add_argument(
        "--state-dir", metavar="DIR", help="conversations and the agent id (one per agent)"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, metavar="LEVEL", help="default info")
    parser.add_argument(
        "--check", action="store_true", help="validate the settings and key files, then exit"
    )
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings, as the TOML values of the same keys."""
    values: dict[str, Any] = {}
    for name in (
        "relay",
        "backend",
        "echo",
        "capacity",
        "name",
        "key_file",
        "backend_key_file",
        "state_dir",
        "log_level",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.model is not None:
        values["models"] = args.model
    if args.echo_delay is not None:
        delay = args.echo_delay
        values["echo_delay"] = f"{delay.strip()}s" if _SECONDS.match(delay) else delay
    return values


def load_settings(args: argparse.Namespace) -> AgentSettings:
    """The file (if any) with the command line over it; raises ConfigError."""
    table = load_table(args.config) if args.config is not None else None
    source = str(args.config) if args.config is not None else None
    return build_settings(table, source=source, overrides=overrides(args))


def main(argv: Sequence[str]) -> int:
    """``relayd agent`` with ``argv`` (the arguments after ``agent``); the exit code."""
    args = build_parser().parse_args(list(argv))
    environ = dict(os.environ)
    try:
        settings = load_settings(args)
        agent_key = find_agent_key(settings, environ)
        backend_key = find_backend_key(settings, environ)
    except ConfigError as error:
        print(f"relayd agent: {error}", file=sys.stderr)
        return EXIT_ERROR
    if args.check:
        print(f"relayd agent: configuration OK: {settings.summary()}")
        print(f"  agent key: {agent_key.source if agent_key else 'none'}")
        print(f"  backend key: {backend_key.source if backend_key else 'none'}")
        return EXIT_OK
    logs.setup_logging(settings.log_level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    state_dir = find_state_dir(settings, environ)
    try:
        prepare_state_dir(state_dir)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_ERROR

    def reload_settings() -> AgentSettings:
        return load_settings(args)

    # Imported here: --help and --check do without the openai SDK (a second to load).
    from relayd.agent.service import AgentService

    notifier = Notifier.from_environ(environ, unset_environment=True)
    service = AgentService(settings, state_dir, reload_settings, notifier, environ)
    try:
        return _run(service)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        notifier.close()


def _run(service: AgentService) -> int:
    failed = False
    try:
        trio.run(service.run)
    except* (ConfigError, StoreError) as group:
        for error in leaf_exceptions(group):
            log.error("%s", error)
        failed = True
    except* RelayRefusedV2 as group:
        for refusal in leaf_exceptions(group):
            log.error(
                "the relay does not speak protocol v2 (%s); relayd agent needs a newer relayd",
                refusal,
            )
        failed = True
    return EXIT_ERROR if failed else EXIT_OK
